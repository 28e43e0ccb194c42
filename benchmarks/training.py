"""Training throughput, vlp vs open_clip, from the same initial weights on the same batches.

Each contender is a model, its optimiser and one training step as its users run it: open_clip as
`open_clip_train` steps (autocast, `ClipLoss`, AdamW, logit-scale clamp), vlp through its trainer's
`TrainStep`. vlp's weights are converted from open_clip's, so the loss curves are comparable step
for step. No gradient clipping, no schedule: the step itself is measured.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from typing import Any

import open_clip
import torch
from common import interleaved_times
from torch.utils.flop_counter import FlopCounterMode

from vlp.convert.keymap import to_vlp
from vlp.convert.open_clip import IGNORED_KEYS, config_from_open_clip, open_clip_rules
from vlp.distributed import ParallelModel
from vlp.models.clip import DualEncoder
from vlp.objectives.contrastive import ContrastiveObjective, ContrastiveObjectiveConfig
from vlp.train.optim import make_optimizer
from vlp.train.step import TrainStep

CPU = torch.device("cpu")
# The tiny CLIP: 64 px, patch 8, width 256, 6 + 6 layers, CLIP's vocabulary and context.
TINY_CLIP = {
    "embed_dim": 256,
    "vision_cfg": {"image_size": 64, "patch_size": 8, "width": 256, "layers": 6, "head_width": 64},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 256, "heads": 4, "layers": 6},
}
LR, WEIGHT_DECAY, BETAS, EPS = 5e-4, 0.2, (0.9, 0.98), 1e-6

Batch = tuple[torch.Tensor, torch.Tensor]


def model_config(name: str) -> dict[str, Any]:
    return TINY_CLIP if name == "tiny" else open_clip.get_model_config(name)


def open_clip_model(config: dict[str, Any], seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return open_clip.CLIP(**config, output_dict=True)


def vlp_model_from(reference: torch.nn.Module, config: dict[str, Any]) -> DualEncoder:
    """vlp's dual encoder holding open_clip's weights."""
    cfg = config_from_open_clip(config)
    model = DualEncoder(cfg)
    state = to_vlp(
        reference.state_dict(),
        open_clip_rules(cfg, custom_text=False),
        model.state_dict(),
        source="open_clip",
        ignore=IGNORED_KEYS,
    )
    model.load_state_dict(state)
    return model


def open_clip_step(model: torch.nn.Module, precision: str, device: torch.device) -> Callable[[Batch], float]:
    """open_clip_train's step: its parameter groups, default AdamW, autocast as `--precision amp_bf16`."""
    exempt = [
        p for n, p in model.named_parameters() if p.ndim < 2 or any(k in n for k in ("bn", "ln", "bias", "logit_scale"))
    ]
    decayed = [p for p in model.parameters() if all(p is not q for q in exempt)]
    groups = [{"params": exempt, "weight_decay": 0.0}, {"params": decayed, "weight_decay": WEIGHT_DECAY}]
    optimizer = torch.optim.AdamW(groups, lr=LR, betas=BETAS, eps=EPS)
    loss_fn = open_clip.ClipLoss()
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")
    model.train()

    def step(batch: Batch) -> float:
        images, texts = batch
        with autocast:
            out = model(images, texts)
            loss = loss_fn(out["image_features"], out["text_features"], out["logit_scale"])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        return loss.item()

    return step


def vlp_step(
    model: DualEncoder, precision: str, device: torch.device, compile_model: bool = False
) -> Callable[[Batch], float]:
    """vlp's trainer step (`train.compile` compiles the forward pass; the first steps pay the compile)."""
    parallel = ParallelModel(model.train(), "ddp", device)
    forward_model = torch.compile(model) if compile_model else model
    objective = ContrastiveObjective(forward_model, ContrastiveObjectiveConfig(loss="clip"))
    optimizer = make_optimizer(model, lr=LR, weight_decay=WEIGHT_DECAY, betas=BETAS, eps=EPS)
    train_step = TrainStep(parallel, objective, optimizer, precision=precision, device_type=device.type)

    def step(batch: Batch) -> float:
        images, texts = batch
        result = train_step({"image": images, "text": texts, "text_mask": (texts != 0).long(), "size": len(images)})
        return result.loss.item()

    return step


def step_flops(model: DualEncoder, batch: Batch) -> int:
    """FLOPs of one vlp forward and backward on `batch`, as run (padding past the last caption skipped).
    Attention runs through the math kernel here: the counter has no formula for the fused CPU one."""
    images, texts = batch
    objective = ContrastiveObjective(copy.deepcopy(model), ContrastiveObjectiveConfig(loss="clip"))
    counter = FlopCounterMode(display=False)
    with counter, torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
        objective({"image": images, "text": texts, "text_mask": (texts != 0).long()})["contrastive_loss"].backward()
    return counter.get_total_flops()


def measure(
    name: str,
    batches: list[Batch],
    *,
    steps: int,
    warmup: int,
    precisions: tuple[str, ...] = ("fp32", "bf16"),
    compiled: bool = False,
    device: torch.device = CPU,
) -> dict[str, Any]:
    """pairs/s and the loss curve of every contender; all contenders step in turn on the same batches."""
    config = model_config(name)
    reference = open_clip_model(config)
    vlp_reference = vlp_model_from(reference, config)
    reference, vlp_reference = reference.to(device), vlp_reference.to(device)
    batches = [(images.to(device), texts.to(device)) for images, texts in batches]
    contenders: dict[str, Callable[[Batch], float]] = {}
    for precision in precisions:
        contenders[f"open_clip {precision}"] = open_clip_step(copy.deepcopy(reference), precision, device)
        contenders[f"vlp {precision}"] = vlp_step(copy.deepcopy(vlp_reference), precision, device)
    if compiled:
        contenders["vlp bf16 compiled"] = vlp_step(copy.deepcopy(vlp_reference), "bf16", device, compile_model=True)
    losses: dict[str, list[float]] = {key: [] for key in contenders}

    def runner(key: str) -> Callable[[int], None]:
        return lambda step: losses[key].append(contenders[key](batches[step % len(batches)]))

    seconds = interleaved_times({key: runner(key) for key in contenders}, steps=steps, warmup=warmup)
    batch_size = len(batches[0][0])
    flops = step_flops(vlp_reference, batches[0])
    tokens = [int((texts != 0).sum(1).float().mean()) for _, texts in batches]
    result: dict[str, Any] = {
        "batch_size": batch_size,
        "steps_timed": steps,
        "mean_caption_tokens": sum(tokens) / len(tokens),
        "context_length": config["text_cfg"].get("context_length", 77),
        "pairs_per_s": {key: batch_size / value for key, value in seconds.items()},
        "losses": losses,
        "vlp_step_gflop": flops / 1e9,
    }
    for precision in precisions:
        result[f"max_loss_gap_{precision}"] = max(
            abs(a - b) for a, b in zip(losses[f"vlp {precision}"], losses[f"open_clip {precision}"], strict=True)
        )
    result["vlp_achieved_gflop_per_s"] = {
        precision: flops / 1e9 * result["pairs_per_s"][f"vlp {precision}"] / batch_size for precision in precisions
    }
    return result


def tokenize(captions: list[str]) -> torch.Tensor:
    return open_clip.tokenize(captions)
