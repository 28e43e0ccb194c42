"""CoCa's efficiency, measured side by side in one run.

- Training step time of CoCa vs BLIP at matched widths and depths, through vlp's trainer step on the
  same batches: BLIP runs its text transformer three times per step (ITC encoder, ITM encoder on
  positives and hard negatives, LM decoder), CoCa one unimodal and one multimodal pass. CoCa appears
  twice: with BLIP's text depth split into halves (3 + 3 for BLIP's 6), and with open_clip's rule
  (a unimodal half as deep as the CLIP text tower, as many multimodal layers again: 6 + 6).
- Greedy and beam-search generation of vlp's CoCa (key/value caches) vs open_clip's CoCa (which re-runs
  the text tower and decoder over the whole prefix for every token), from the same `coca_ViT-B-32`
  weights; the greedy tokens are checked equal.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import open_clip
import torch
from common import interleaved_times
from safetensors.torch import save_file

import vlp
from vlp.distributed import ParallelModel
from vlp.generation import GenerationConfig, generate
from vlp.models.blip import Blip, BlipConfig
from vlp.models.coca import Coca, CocaConfig
from vlp.objectives.blip import BlipObjective, BlipObjectiveConfig
from vlp.objectives.coca import CocaObjective, CocaObjectiveConfig
from vlp.towers import BertTextConfig, TextConfig, VisionConfig
from vlp.train.optim import make_optimizer
from vlp.train.step import TrainStep

WIDTH, HEADS, DEPTH, IMAGE, PATCH = 256, 4, 6, 64, 8
VOCAB, SOT, EOT = 49408, 49406, 49407


def _vision(**extra: Any) -> VisionConfig:
    return VisionConfig(image_size=IMAGE, patch_size=PATCH, width=WIDTH, layers=DEPTH, heads=HEADS, **extra)


def _blip() -> Blip:
    text = BertTextConfig(
        vocab_size=VOCAB,
        context_length=77,
        width=WIDTH,
        layers=DEPTH,
        heads=HEADS,
        pad_token_id=0,
        eos_token_id=EOT,
        enc_token_id=VOCAB - 3,
        dec_token_id=VOCAB - 4,
    )
    return Blip(BlipConfig(vision=_vision(), text=text, embed_dim=WIDTH))


def _coca(unimodal: int, multimodal: int) -> Coca:
    text = TextConfig(vocab_size=VOCAB, context_length=77, width=WIDTH, layers=unimodal, heads=HEADS)
    grid = (IMAGE // PATCH) ** 2
    return Coca(
        CocaConfig(
            embed_dim=WIDTH,
            vision=_vision(ln_post=False),
            text=text,
            multimodal_layers=multimodal,
            caption_queries=grid,
            pooler_heads=HEADS,
            bos_token_id=SOT,
            eos_token_id=EOT,
        )
    )


def step_times(images: torch.Tensor, texts: torch.Tensor, *, steps: int, warmup: int) -> dict[str, Any]:
    """pairs/s of one training step (bf16 autocast, as the trainer runs) of each model on the same batch."""
    torch.manual_seed(0)
    contenders = {
        f"blip {DEPTH} layers (ITC + ITM + LM)": (_blip(), BlipObjective, BlipObjectiveConfig()),
        f"coca {DEPTH // 2} + {DEPTH // 2} layers": (
            _coca(DEPTH // 2, DEPTH // 2),
            CocaObjective,
            CocaObjectiveConfig(),
        ),
        f"coca {DEPTH} + {DEPTH} layers": (_coca(DEPTH, DEPTH), CocaObjective, CocaObjectiveConfig()),
    }
    batch = {"image": images, "text": texts, "text_mask": (texts != 0).long(), "size": len(images)}
    runners, parameters = {}, {}
    for name, (model, objective_cls, objective_cfg) in contenders.items():
        parameters[name] = sum(p.numel() for p in model.parameters() if p.requires_grad)
        parallel = ParallelModel(model.train(), "ddp", torch.device("cpu"))
        optimizer = make_optimizer(model, lr=1e-4, weight_decay=0.05, betas=(0.9, 0.98), eps=1e-6)
        train_step = TrainStep(parallel, objective_cls(model, objective_cfg), optimizer, precision="bf16")
        runners[name] = lambda step, train_step=train_step: train_step(batch)
    seconds = interleaved_times(runners, steps=steps, warmup=warmup)
    pairs = {name: len(images) / value for name, value in seconds.items()}
    blip = next(iter(pairs))
    return {
        "batch_size": len(images),
        "image": f"{IMAGE} px, patch {PATCH}",
        "width": WIDTH,
        "parameters": parameters,
        "pairs_per_s": pairs,
        "speedup_over_blip": {name: value / pairs[blip] for name, value in pairs.items()},
    }


def _open_clip_coca(folder: Path) -> tuple[torch.nn.Module, Any]:
    """coca_ViT-B-32 with random weights (its decoder projection is left uninitialised by open_clip), saved
    and loaded into vlp."""
    torch.manual_seed(0)
    reference = open_clip.create_model("coca_ViT-B-32").eval()
    projection = reference.text_decoder.text_projection
    with torch.no_grad():
        torch.nn.init.normal_(projection, std=projection.shape[0] ** -0.5)
        projection[:, EOT] = -100.0  # never end early: every contender generates the whole budget
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "coca_ViT-B-32.json").write_text(json.dumps(open_clip.get_model_config("coca_ViT-B-32")))
    save_file(reference.state_dict(), str(folder / "weights.safetensors"))
    return reference, vlp.load(folder / "weights.safetensors", config=folder / "coca_ViT-B-32.json")


def generation_speed(folder: Path, images: torch.Tensor, *, new_tokens: int, steps: int, warmup: int) -> dict[str, Any]:
    reference, pretrained = _open_clip_coca(folder)
    model = pretrained.model.eval()
    empty = torch.zeros(len(images), 0, dtype=torch.long)
    seq_len = new_tokens + 2  # open_clip counts the start token and forces end-of-text at the last position
    outputs: dict[str, Any] = {}

    def open_clip_run(method: str) -> Any:
        kwargs = (
            {"generation_type": "top_k", "top_k": 1}
            if method == "greedy"
            else {"generation_type": "beam_search", "num_beams": 3, "num_beam_groups": 1}
        )
        return lambda step: outputs.__setitem__(
            f"open_clip {method}", reference.generate(images, seq_len=seq_len, min_seq_len=1, **kwargs)
        )

    def vlp_run(method: str) -> Any:
        cfg = GenerationConfig(method=method, max_new_tokens=new_tokens + 1, min_new_tokens=0, num_beams=3)

        def run(step: int) -> None:
            with torch.inference_mode():
                tokens = model.encode_image_tokens(images)[1]
                outputs[f"vlp {method}"] = generate(model.caption_decoder(tokens), empty, cfg)

        return run

    runners = {
        f"{who} {method}": (vlp_run if who == "vlp" else open_clip_run)(method)
        for method in ("greedy", "beam")
        for who in ("vlp", "open_clip")
    }
    seconds = interleaved_times(runners, steps=steps, warmup=warmup)
    tokens_per_s = {name: len(images) * new_tokens / value for name, value in seconds.items()}
    greedy_reference = outputs["open_clip greedy"][:, 1 : 1 + new_tokens].tolist()
    return {
        "model": "coca_ViT-B-32 (random weights, end-of-text suppressed)",
        "images": len(images),
        "new_tokens": new_tokens,
        "tokens_per_s": tokens_per_s,
        "vlp_over_open_clip": {
            m: tokens_per_s[f"vlp {m}"] / tokens_per_s[f"open_clip {m}"] for m in ("greedy", "beam")
        },
        "greedy_tokens_equal": [row[:new_tokens] for row in outputs["vlp greedy"]] == greedy_reference,
    }


def measure(data: Path, quick: bool) -> dict[str, Any]:
    from common import shapes_pairs

    batch = 8 if quick else 32
    images, captions = shapes_pairs(data / "shapes64", batch, IMAGE)
    # Padded to the full context: both objectives cut the text to the batch's longest caption themselves.
    texts = open_clip.tokenize(captions)
    result = {"train_step": step_times(images, texts, steps=2 if quick else 10, warmup=1 if quick else 2)}
    images224, _ = shapes_pairs(data / "shapes224", 4 if quick else 8, 224)
    result["generation"] = generation_speed(
        data / "coca-b32", images224, new_tokens=8 if quick else 30, steps=1 if quick else 3, warmup=1
    )
    return result
