"""The generic training loop: the family's objective returns named losses; the loop sums, steps, logs
and checkpoints. It knows nothing else about the model."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import yaml
from tqdm import tqdm

from vlp.checkpoint import (
    CHECKPOINTS_DIR,
    OPTIMIZER_FILE,
    STATE_FILE,
    WEIGHTS_FILE,
    CheckpointError,
    Pretrained,
    list_checkpoints,
    load_weights,
    resolve_checkpoint,
    save_checkpoint,
)
from vlp.config import ConfigError, apply_overrides, from_dict, read_mapping, to_dict
from vlp.data.pipeline import DataConfig
from vlp.data.tokenizer import Tokenizer, TokenizerConfig, train_tokenizer
from vlp.data.transforms import ImageConfig, ImageTransform
from vlp.distributed import (
    ParallelModel,
    Strategy,
    all_reduce_mean,
    barrier,
    is_distributed,
    rank,
    setup_from_environment,
    world_size,
)
from vlp.families import Family, parse_model_config
from vlp.train.optim import make_optimizer, warmup_cosine

log = logging.getLogger("vlp.train")


@dataclass
class TrainConfig:
    steps: int = 1000
    # The global batch: split evenly across processes, then into `accum_steps` micro-batches each.
    batch_size: int = 64
    # >1: the contrastive loss still sees the whole batch; micro-batch features are cached and recomputed.
    accum_steps: int = 1
    lr: float = 5e-4
    weight_decay: float = 0.2
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-6
    warmup_steps: int = 100
    min_lr_ratio: float = 0.0
    grad_clip: float | None = 1.0
    precision: Literal["fp32", "bf16"] = "bf16"  # bf16 autocast; measured faster on this project's CPUs
    # ddp: the whole model on every process; fsdp: parameters, gradients and optimiser state sharded.
    strategy: Strategy = "ddp"
    compile: bool = False  # torch.compile the model's forward pass
    device: str = "auto"  # auto = cuda when present, else cpu
    seed: int = 0
    # A checkpoint (vlp, Hugging Face or open_clip folder) to start from: its weights, and its tokenizer
    # unless tokenizer.path is set. Another family starts through the model's `init_from` (BLIP -> VQA).
    init_from: str | None = None
    log_every: int = 10
    save_every: int = 500
    keep_checkpoints: int = 2
    progress: bool = True


@dataclass
class RunConfig:
    """Everything one training run needs: architecture, objective, preprocessing, data and schedule."""

    model: dict[str, Any]
    objective: dict[str, Any] = field(default_factory=dict)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    image: ImageConfig = field(default_factory=ImageConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def family_configs(self) -> tuple[Family, Any, Any]:
        """Validate the family-specific sections: (family, model config, objective config)."""
        family, model_cfg = parse_model_config(self.model)
        objective_cfg = from_dict(family.objective_config_cls, self.objective, prefix="objective")
        return family, model_cfg, objective_cfg


def load_run_config(path: str | Path | None, overrides: list[str] = ()) -> RunConfig:
    """Read a run config file with `a.b=value` overrides; every key is checked before any work."""
    data = read_mapping(path) if path else {}
    apply_overrides(data, list(overrides))
    if "model" not in data:
        raise ConfigError("missing config key 'model'")
    cfg = from_dict(RunConfig, data)
    cfg.family_configs()
    return cfg


def _device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and is_distributed():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device(name)


def _prepare_tokenizer(cfg: RunConfig, family: Family, out: Path, resume_from: Path | None,
                       initial: Pretrained | None) -> Tokenizer:
    if resume_from is not None:
        return Tokenizer.from_file(resume_from)
    if cfg.tokenizer.path:
        return Tokenizer.from_file(cfg.tokenizer.path)
    if initial is not None:
        initial.tokenizer.save(out)
        return initial.tokenizer
    if rank() == 0:  # one process trains it; the others read what it wrote
        log.info("training a %s tokenizer on the training texts", cfg.tokenizer.kind)
        train_tokenizer(family.texts(cfg.data), cfg.tokenizer).save(out)
    barrier()
    return Tokenizer.from_file(out)


def _initialise(model: torch.nn.Module, initial: Pretrained) -> None:
    """Copy a pre-trained model's weights into a new one: the same family loads them whole; another
    goes through the new model's `init_from` (BLIP-VQA from BLIP)."""
    if type(initial.model) is type(model):
        model.load_state_dict(initial.model.state_dict())
    elif hasattr(model, "init_from"):
        skipped = model.init_from(initial.model)
        if skipped:
            log.warning("not initialised from %s (shapes differ): %s", initial.path, ", ".join(skipped))
    else:
        raise ConfigError(
            f"config key 'train.init_from': a {type(model).__name__} cannot start from a "
            f"{type(initial.model).__name__} checkpoint ({initial.path})"
        )


def _split_batch(batch: dict[str, Any], parts: int) -> list[dict[str, Any]]:
    """Cut a batch into `parts` micro-batches along the sample dimension."""
    tensors = {k: v.tensor_split(parts) for k, v in batch.items() if torch.is_tensor(v)}
    micro = []
    for i in range(parts):
        part = {k: v[i] for k, v in tensors.items()}
        part["size"] = len(next(iter(part.values())))
        micro.append(part)
    return micro


def _total_loss(values: dict[str, torch.Tensor], family: str, step: int) -> torch.Tensor:
    losses = {k: v for k, v in values.items() if k.endswith("_loss")}
    if not losses:
        raise RuntimeError(f"{family} objective returned no '*_loss' value: {sorted(values)}")
    loss = sum(losses.values())
    if not torch.isfinite(loss):
        terms = ", ".join(f"{k}={v.item():.4g}" for k, v in losses.items())
        raise FloatingPointError(f"step {step}: the loss is not finite ({terms})")
    return loss


def accumulated_backward(
    objective: Any, micro_batches: list[dict[str, Any]], *, no_sync: Any, autocast: Any, family: str, step: int
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One optimiser step's gradients from k micro-batches, the loss seeing all of them (open_clip's
    --accum-freq): features of every micro-batch are computed without gradient, then each micro-batch
    is recomputed with gradient and its fresh features replace its cached ones in the full loss.

    Model-level scalars (the logit scale and bias) take their gradient from the last pass only, so
    they are not counted k times. `no_sync` suspends gradient reduction until that last pass.
    """
    with torch.no_grad(), autocast:
        cached = [objective.embed(m) for m in micro_batches]
    last = len(micro_batches) - 1
    for j, micro in enumerate(micro_batches):
        with no_sync() if j < last else contextlib.nullcontext(), autocast:
            fresh = objective.embed(micro)
            merged: dict[str, torch.Tensor | None] = {}
            for key, value in fresh.items():
                if value is None or value.dim() == 0:
                    merged[key] = value if value is None or j == last else value.detach()
                else:
                    merged[key] = torch.cat([value if i == j else c[key] for i, c in enumerate(cached)])
            values = objective.losses(merged)
            loss = _total_loss(values, family, step)
        loss.backward()
    return loss, values


class TrainStep:
    """One optimiser step on one batch: forward and backward (over micro-batches when accumulating),
    gradient clipping, the optimiser, the schedule and the objective's after-step hook. The trainer
    and the benchmarks run the same step."""

    def __init__(
        self,
        parallel: ParallelModel,
        objective: Any,
        optimizer: torch.optim.Optimizer,
        schedule: torch.optim.lr_scheduler.LRScheduler | None = None,
        *,
        accum_steps: int = 1,
        grad_clip: float | None = None,
        precision: Literal["fp32", "bf16"] = "bf16",
        device_type: str = "cpu",
        family: str = "model",
    ):
        if accum_steps > 1 and not hasattr(objective, "embed"):
            raise ConfigError(f"config key 'train.accum_steps': the {family} objective cannot accumulate yet")
        self.parallel, self.objective, self.optimizer, self.schedule = parallel, objective, optimizer, schedule
        self.accum_steps, self.grad_clip, self.family = accum_steps, grad_clip, family
        self.autocast = torch.autocast(device_type, dtype=torch.bfloat16, enabled=precision == "bf16")

    def __call__(self, batch: dict[str, Any], step: int) -> tuple[torch.Tensor, dict[str, torch.Tensor], Any]:
        """Returns (total loss, the objective's named values, gradient norm or None)."""
        self.optimizer.zero_grad(set_to_none=True)
        if self.accum_steps > 1:
            loss, values = accumulated_backward(
                self.objective, _split_batch(batch, self.accum_steps), no_sync=self.parallel.no_sync,
                autocast=self.autocast, family=self.family, step=step,
            )
        else:
            with self.autocast:
                values = self.objective(batch)
            loss = _total_loss(values, self.family, step)
            loss.backward()
        self.parallel.sync_gradients()
        grad_norm = None
        if self.grad_clip:
            grad_norm = torch.nn.utils.clip_grad_norm_(self.parallel.model.parameters(), self.grad_clip)
        self.optimizer.step()
        if self.schedule is not None:
            self.schedule.step()
        if hasattr(self.objective, "after_step"):
            self.objective.after_step()
        return loss, values, grad_norm


def _check_tokenizer_fits(tokenizer: Tokenizer, model_cfg: Any) -> None:
    text = getattr(model_cfg, "text", None)
    if text is None:
        return
    if tokenizer.vocab_size > text.vocab_size:
        raise ConfigError(
            f"config key 'model.text.vocab_size': {text.vocab_size} is smaller than the tokenizer's "
            f"vocabulary of {tokenizer.vocab_size}"
        )
    length_key = "context_length" if hasattr(text, "context_length") else "max_positions"
    if tokenizer.context_length > getattr(text, length_key):
        raise ConfigError(
            f"config key 'model.text.{length_key}': {getattr(text, length_key)} is shorter than the tokenizer's "
            f"context length {tokenizer.context_length}"
        )
    for key, (token, expected) in (text.special_tokens() if hasattr(text, "special_tokens") else {}).items():
        if tokenizer.token_id(token) != expected:
            raise ConfigError(
                f"config key 'model.text.{key}': {expected}, but the tokenizer's {token} is {tokenizer.token_id(token)}"
            )
    # A model that generates from the start token to the end token (CoCa) must use the tokenizer's own.
    for key, actual in zip(("bos_token_id", "eos_token_id"), tokenizer.framing_ids(), strict=True):
        expected = getattr(model_cfg, key, actual)
        if expected != actual:
            raise ConfigError(f"config key 'model.{key}': {expected}, but the tokenizer's is {actual}")


def _find_resume(out: Path, resume: str | None) -> Path | None:
    if resume is None:
        return None
    if resume == "latest":
        found = list_checkpoints(out)
        if not found:
            log.warning("--resume latest: no checkpoint in %s, starting from scratch", out / CHECKPOINTS_DIR)
            return None
        return found[-1]
    folder = resolve_checkpoint(resume)
    if not (folder / STATE_FILE).is_file():
        raise CheckpointError(f"{folder} has no {STATE_FILE}: it is not a training checkpoint to resume")
    return folder


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop log lines a killed run wrote after its last checkpoint, so the curve continues cleanly."""
    if not path.is_file():
        return
    kept = [line for line in path.read_text().splitlines() if line and json.loads(line).get("step", 0) <= step]
    path.write_text("".join(line + "\n" for line in kept))


def train(cfg: RunConfig, out: str | Path, *, resume: str | None = None) -> Path:
    """Train as `cfg` says, writing checkpoints and metrics under `out`. Returns the last checkpoint."""
    created_group = not torch.distributed.is_initialized()
    setup_from_environment()
    try:
        return _train(cfg, Path(out), resume)
    finally:
        if created_group and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def _train(cfg: RunConfig, out: Path, resume: str | None) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    family, model_cfg, objective_cfg = cfg.family_configs()
    tc = cfg.train
    world, is_main = world_size(), rank() == 0
    if tc.batch_size % (world * tc.accum_steps):
        raise ConfigError(
            f"config key 'train.batch_size': {tc.batch_size} does not split into {world} process(es) x "
            f"{tc.accum_steps} accumulation step(s)"
        )
    resume_from = _find_resume(out, resume)
    torch.manual_seed(tc.seed)
    device = _device(tc.device)

    initial = None
    if tc.init_from and resume_from is None:
        from vlp.convert import load_pretrained

        initial = load_pretrained(tc.init_from)
    tokenizer = _prepare_tokenizer(cfg, family, out, resume_from, initial)
    _check_tokenizer_fits(tokenizer, model_cfg)
    model = family.model_cls(model_cfg)
    start_step = 0
    if initial is not None:
        _initialise(model, initial)
        log.info("initialised from %s", initial.path)
        del initial
    if resume_from is not None:
        load_weights(model, resume_from / WEIGHTS_FILE)
        start_step = json.loads((resume_from / STATE_FILE).read_text())["step"]
        log.info("resuming from %s at step %d", resume_from, start_step)
    model.to(device).train()
    if hasattr(family.objective_cls, "prepare"):  # before wrapping: DDP registers the trainable parameters
        family.objective_cls.prepare(model, objective_cfg)
    parallel = ParallelModel(model, tc.strategy, device)
    forward_model = torch.compile(parallel.module) if tc.compile else parallel.module
    objective = family.objective_cls(forward_model, objective_cfg)
    optimizer = make_optimizer(model, lr=tc.lr, weight_decay=tc.weight_decay, betas=tc.betas, eps=tc.eps)
    schedule = warmup_cosine(optimizer, warmup_steps=tc.warmup_steps, total_steps=tc.steps,
                             min_lr_ratio=tc.min_lr_ratio)
    if resume_from is not None:
        saved = torch.load(resume_from / OPTIMIZER_FILE, map_location="cpu", weights_only=True)
        parallel.load_optimizer_state(optimizer, saved["optimizer"])
        schedule.load_state_dict(saved["schedule"])
    train_step = TrainStep(parallel, objective, optimizer, schedule, accum_steps=tc.accum_steps,
                           grad_clip=tc.grad_clip, precision=tc.precision, device_type=device.type,
                           family=family.name)
    metrics_path = out / "metrics.jsonl"
    if is_main:
        (out / "run.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
        _truncate_metrics(metrics_path, start_step)

    batches = family.batches(cfg.data, ImageTransform(cfg.image, train=True), tokenizer,
                            batch_size=tc.batch_size // world, seed=tc.seed, start_step=start_step, rank=rank(),
                            world_size=world)

    def checkpoint(step: int) -> Path:
        folder = out / CHECKPOINTS_DIR / f"step_{step:08d}"
        weights, optimizer_state = parallel.state_dict(), parallel.optimizer_state(optimizer)
        if not is_main:  # one writer; the others took part in gathering the shards
            return folder
        folder = save_checkpoint(
            folder, family=family, model_config=model_cfg, model=weights, image_config=cfg.image,
            tokenizer=tokenizer, state={"step": step, "run": to_dict(cfg)},
            optimizer_state={"optimizer": optimizer_state, "schedule": schedule.state_dict()},
        )
        for old in list_checkpoints(out)[:-tc.keep_checkpoints]:
            shutil.rmtree(old)
        return folder

    last = resume_from
    # Summed on the device and read at log steps only, so steps do not wait for the accelerator.
    sums: dict[str, torch.Tensor] = {}
    interval_samples, interval_start, run_start = 0, time.perf_counter(), time.perf_counter()
    # Redrawn less often when stderr is a log file rather than a terminal.
    bar = tqdm(total=tc.steps, initial=start_step, disable=not (tc.progress and is_main), unit="step",
               dynamic_ncols=True, mininterval=0.1 if sys.stderr.isatty() else 10.0)
    with metrics_path.open("a") if is_main else contextlib.nullcontext() as metrics_file:
        for step in range(start_step + 1, tc.steps + 1):
            batch = {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in next(batches).items()}
            loss, values, grad_norm = train_step(batch, step)

            interval_samples += batch["size"] * world
            logged = {"loss": loss, **values}
            if grad_norm is not None:
                logged["grad_norm"] = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
            for key, value in logged.items():
                sums[key] = sums.get(key, 0) + value.detach().double()
            bar.update(1)
            if step % tc.log_every == 0 or step == tc.steps:
                elapsed = time.perf_counter() - interval_start
                count = tc.log_every if step % tc.log_every == 0 else step % tc.log_every
                record = {"step": step, "lr": schedule.get_last_lr()[0]}
                means = all_reduce_mean(torch.stack(list(sums.values()))).tolist()
                record.update({k: v / count for k, v in zip(sums, means, strict=True)})
                record["samples_per_s"] = interval_samples / max(elapsed, 1e-9)
                record["elapsed_s"] = time.perf_counter() - run_start
                if is_main:
                    metrics_file.write(json.dumps(record) + "\n")
                    metrics_file.flush()
                bar.set_postfix(loss=f"{record['loss']:.4f}", samples_s=f"{record['samples_per_s']:.0f}")
                sums, interval_samples, interval_start = {}, 0, time.perf_counter()
            if step % tc.save_every == 0 or step == tc.steps:
                last = checkpoint(step)
    bar.close()
    if last is None:
        raise CheckpointError(f"no training steps were run: train.steps is {tc.steps}")
    return last

