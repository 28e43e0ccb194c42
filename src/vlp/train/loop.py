"""The generic training loop: the family's objective returns named losses; the loop sums, steps, logs
and checkpoints. It knows nothing else about the model."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import torch
import yaml
from tqdm import tqdm

from vlp.assets.image import ImageConfig, ImageTransform
from vlp.assets.tokenizer import Tokenizer, TokenizerConfig, train_tokenizer
from vlp.checkpoint import (
    CHECKPOINTS_DIR,
    OPTIMIZER_FILE,
    QFORMER_TOKENIZER_DIR,
    STATE_FILE,
    WEIGHTS_FILE,
    CheckpointError,
    Pretrained,
    build_model,
    first_nonfinite,
    list_checkpoints,
    load_weights,
    read_json,
    remove_unfinished,
    resolve_checkpoint,
    save_checkpoint,
)
from vlp.config import (
    ConfigError,
    Fraction,
    NonNegativeFloat,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    Range,
    apply_overrides,
    from_dict,
    merge,
    read_mapping,
    to_dict,
)
from vlp.data.pipeline import DataConfig, bad_samples
from vlp.data.sources import CAUSES, BadSamples
from vlp.distributed import (
    ParallelModel,
    Strategy,
    all_gather_objects,
    all_processes_agree,
    all_reduce_mean,
    all_reduce_sum,
    barrier,
    is_distributed,
    process_group,
    rank,
    world_size,
)
from vlp.errors import TrainingError
from vlp.model_size import TRAIN_BYTES_PER_PARAMETER
from vlp.precision import Precision, default_device, resolve_precision
from vlp.registry import Family, parse_model_config
from vlp.train.families import parse_data_config, parse_objective_config, recipe_of
from vlp.train.optim import make_optimizer, warmup_cosine
from vlp.train.run_folder import METRICS_FILE, RunFolderInUse, RunLock, truncate_metrics
from vlp.train.sources import load_sources, resolve_sources

log = logging.getLogger("vlp.train")

AdamBeta = Annotated[float, Range(min=0, max=1, exclusive_max=True)]


@dataclass
class TrainConfig:
    steps: PositiveInt = 1000
    # The global batch: split evenly across processes, then into `accum_steps` micro-batches each.
    batch_size: PositiveInt = 64
    # >1: the contrastive loss still sees the whole batch; micro-batch features are cached and recomputed.
    accum_steps: PositiveInt = 1
    lr: NonNegativeFloat = 5e-4
    # Parameter-name prefix -> multiple of `lr` ({text: 0.01}: OWL-ViT's text tower and projection; 0 freezes).
    lr_scales: dict[str, NonNegativeFloat] = field(default_factory=dict)
    weight_decay: NonNegativeFloat = 0.2
    betas: tuple[AdamBeta, AdamBeta] = (0.9, 0.98)
    eps: PositiveFloat = 1e-6
    warmup_steps: NonNegativeInt = 100
    min_lr_ratio: Fraction = 0.0
    grad_clip: PositiveFloat | None = 1.0
    # bf16: autocast; auto: bf16 where the device has bf16 arithmetic, fp32 where it would be emulated.
    precision: Precision = "auto"
    # ddp: the whole model on every process; fsdp: parameters, gradients and optimiser state sharded.
    strategy: Strategy = "ddp"
    compile: bool = False  # torch.compile the model's forward pass
    device: str = "auto"  # auto = cuda when present, else cpu; or cpu, cuda, cuda:N, mps
    seed: NonNegativeInt = 0
    # CPU threads per process for intra-op work (None: torch's default, one per core). CPU reductions split
    # by thread count, so a fixed count is what makes a CPU run repeat bit for bit on another machine.
    threads: PositiveInt | None = None
    # A checkpoint (vlp, Hugging Face or open_clip folder) to start from: its weights, and its tokenizer
    # unless tokenizer.path is set. Another family starts through the model's `init_from` (BLIP -> VQA).
    init_from: str | None = None
    log_every: PositiveInt = 10
    save_every: PositiveInt = 500
    keep_checkpoints: PositiveInt = 2
    # A step whose loss or gradient norm is not finite is skipped (no update); this many in a row stop
    # the run with an error, since the model has diverged.
    max_nonfinite_steps: PositiveInt = 10
    progress: bool = True

    def __post_init__(self) -> None:
        if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", self.device):
            raise ValueError(f"device {self.device!r} is not one of auto, cpu, cuda, cuda:N, mps")


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
        objective_cfg = parse_objective_config(family, self.objective)
        patch = getattr(getattr(model_cfg, "vision", None), "patch_size", None)
        if patch and self.image.size % patch:
            # The patch embedding would silently drop the border pixels past the last whole patch.
            raise ConfigError(f"config key 'image.size': {self.image.size} is not a multiple of "
                              f"model.vision.patch_size {patch}")
        return family, model_cfg, objective_cfg


def load_run_config(
    path: str | Path | None, overrides: list[str] = (), *, base: dict[str, Any] | None = None
) -> RunConfig:
    """Read a run config file with `a.b=value` overrides; every key is checked before any work.

    `base` (a resumed run's saved configuration) supplies every key the file and the overrides leave out."""
    data = merge(base or {}, read_mapping(path) if path else {})
    apply_overrides(data, list(overrides))
    if "model" not in data:
        raise ConfigError("missing config key 'model'" + ("" if path else ": give --config"))
    sections = dict(data)
    data_section = sections.pop("data", {})
    cfg = from_dict(RunConfig, sections)
    family, _, _ = cfg.family_configs()
    cfg.data = parse_data_config(family, data_section)  # the family's data task may add its own settings
    return cfg


def saved_run_config(out: str | Path, resume: str) -> dict[str, Any] | None:
    """The configuration of the run `--resume` continues (from its checkpoint), or None when
    `--resume latest` finds no checkpoint in `out`."""
    if resume == "latest" and not list_checkpoints(out):
        return None  # train() says that it starts from scratch
    folder = _find_resume(Path(out), resume)
    state = read_json(folder / STATE_FILE)
    if not isinstance(state, dict) or not isinstance(state.get("run"), dict):
        raise CheckpointError(f"{folder / STATE_FILE} holds no run configuration to resume with")
    return state["run"]


def _device(name: str) -> torch.device:
    if name == "auto":
        name = default_device().type
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"config key 'train.device': {name!r}, but this machine has no CUDA device")
    if name == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("config key 'train.device': 'mps', but this machine has no MPS device")
    if name == "cuda" and is_distributed():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device(name)


def _prepare_tokenizer(cfg: RunConfig, family: Family, model_cfg: Any, out: Path, resume_from: Path | None,
                       initial: Pretrained | None) -> Tokenizer:
    if resume_from is not None:
        return Tokenizer.from_file(resume_from)
    if cfg.tokenizer.path:
        path = Path(cfg.tokenizer.path)
        if (path / "config.json").is_file():  # a Hugging Face model's folder (a language model's tokenizer)
            from vlp.convert.tokenizers import tokenizer_from_path

            tokenizer = tokenizer_from_path(path, context_length=cfg.tokenizer.context_length)
            # Tokens the model writes itself that the folder's tokenizer lacks (BLIP-2's [DEC] after BERT's).
            tokenizer.backend.add_special_tokens([t for t in cfg.tokenizer.extra_tokens if tokenizer.token_id(t) is None])
            return tokenizer
        return Tokenizer.from_file(path)
    if initial is not None:
        tokenizer = initial.tokenizer
        context = getattr(getattr(model_cfg, "text", None), "context_length", None)
        if context is not None and context < tokenizer.context_length:
            # A model with a shorter text context than its source's (OWL-ViT's 16-token queries from CLIP's 77).
            tokenizer = tokenizer.with_context_length(context)
        tokenizer.save(out)
        return tokenizer
    if rank() == 0:  # one process trains it; the others read what it wrote
        log.info("training a %s tokenizer on the training texts", cfg.tokenizer.kind)
        train_tokenizer(recipe_of(family).texts(cfg.data), cfg.tokenizer).save(out)
    barrier()
    return Tokenizer.from_file(out)


def _prepare_qformer_tokenizer(model_cfg: Any, resume_from: Path | None, initial: Pretrained | None) -> Tokenizer:
    """The tokenizer of the Q-Former's instructions (InstructBLIP): the resumed checkpoint's, the InstructBLIP
    checkpoint's it starts from, or the one of the Q-Former's source (a stage-1 checkpoint, a BERT folder)."""
    if resume_from is not None:
        return Tokenizer.from_file(resume_from / QFORMER_TOKENIZER_DIR)
    if initial is not None and initial.qformer_tokenizer is not None:
        return initial.qformer_tokenizer
    source = getattr(getattr(model_cfg, "sources", None), "qformer", None)
    if source is None:
        raise ConfigError("config key 'model.sources.qformer': the Q-Former reads instructions in its own vocabulary; "
                          "name a BLIP-2 stage-1 checkpoint or a BERT folder (or start from an InstructBLIP "
                          "checkpoint with train.init_from)")
    if (Path(source) / "config.json").is_file():  # a BERT folder
        from vlp.convert.tokenizers import tokenizer_from_path

        tokenizer = tokenizer_from_path(source, context_length=min(model_cfg.qformer.context_length, 128))
        tokenizer.backend.add_special_tokens(["[DEC]"] if tokenizer.token_id("[DEC]") is None else [])
        return tokenizer
    from vlp.train.sources import stage1_qformer

    return stage1_qformer(source).tokenizer


def _initialise(model: torch.nn.Module, family: Family, initial: Pretrained) -> None:
    """Copy a pre-trained model's weights into a new one: the same family loads them whole; a family the
    recipe says it starts from goes through the new model's `init_from` (BLIP-VQA from BLIP)."""
    if initial.family == family:
        model.load_state_dict(initial.model.state_dict())
    elif initial.family.name in recipe_of(family).starts_from:
        skipped = model.init_from(initial.model)
        if skipped:
            log.warning("not initialised from %s (it has none of them, or of another shape): %s", initial.path,
                        ", ".join(skipped))
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


def _total_loss(values: dict[str, torch.Tensor], family: str) -> torch.Tensor:
    losses = {k: v for k, v in values.items() if k.endswith("_loss")}
    if not losses:
        raise RuntimeError(f"{family} objective returned no '*_loss' value: {sorted(values)}")
    return sum(losses.values())


def accumulated_backward(
    objective: Any, micro_batches: list[dict[str, Any]], *, no_sync: Any, autocast: Any, family: str
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
            loss = _total_loss(values, family)
        loss.backward()
    return loss, values


@dataclass
class StepResult:
    loss: torch.Tensor
    values: dict[str, torch.Tensor]  # the objective's named values
    grad_norm: torch.Tensor  # before clipping
    skipped: bool  # the loss or the gradient norm was not finite: no update was made


class TrainStep:
    """One optimiser step on one batch: forward and backward (over micro-batches when accumulating),
    gradient clipping, the optimiser, the schedule and the objective's after-step hook. The trainer
    and the benchmarks run the same step.

    A step whose loss or gradient norm is not finite on any process makes no update (the schedule still
    advances, so the run stays on its step count); the caller counts such steps."""

    def __init__(
        self,
        parallel: ParallelModel,
        objective: Any,
        optimizer: torch.optim.Optimizer,
        schedule: torch.optim.lr_scheduler.LRScheduler | None = None,
        *,
        accum_steps: int = 1,
        grad_clip: float | None = None,
        precision: Precision = "auto",
        device_type: str = "cpu",
        family: str = "model",
    ):
        if accum_steps > 1 and not objective.accumulates:
            raise ConfigError(f"config key 'train.accum_steps': the {family} objective cannot accumulate yet")
        self.parallel, self.objective, self.optimizer, self.schedule = parallel, objective, optimizer, schedule
        self.accum_steps, self.grad_clip, self.family = accum_steps, grad_clip, family
        self.precision = resolve_precision(precision, device_type)
        self.autocast = torch.autocast(device_type, dtype=torch.bfloat16, enabled=self.precision == "bf16")

    def __call__(self, batch: dict[str, Any]) -> StepResult:
        self.optimizer.zero_grad(set_to_none=True)
        if self.accum_steps > 1:
            loss, values = accumulated_backward(
                self.objective, _split_batch(batch, self.accum_steps), no_sync=self.parallel.no_sync,
                autocast=self.autocast, family=self.family,
            )
        else:
            with self.autocast:
                values = self.objective(batch)
            loss = _total_loss(values, self.family)
            loss.backward()
        self.parallel.sync_gradients()
        # The total norm is always measured (an infinite clip leaves the gradients as they are): it decides
        # whether the step is taken.
        grad_norm = self.parallel.clip_grad_norm(self.grad_clip or math.inf)
        finite = bool(torch.isfinite(loss.detach()) & torch.isfinite(grad_norm))
        skipped = not all_processes_agree(finite)
        if skipped:
            self.optimizer.zero_grad(set_to_none=True)
        else:
            self.optimizer.step()
        if self.schedule is not None:
            self.schedule.step()
        if not skipped:
            self.objective.after_step()
        return StepResult(loss, values, grad_norm, skipped)


def _check_text_tokenizer(tokenizer: Tokenizer, text: Any, section: str) -> None:
    """The text side of config section `section` reads what the tokenizer writes."""
    if tokenizer.vocab_size > text.vocab_size:
        raise ConfigError(
            f"config key '{section}.vocab_size': {text.vocab_size} is smaller than the tokenizer's "
            f"vocabulary of {tokenizer.vocab_size}"
        )
    if tokenizer.context_length > text.context_length:
        raise ConfigError(
            f"config key '{section}.context_length': {text.context_length} is shorter than the tokenizer's "
            f"context length {tokenizer.context_length}"
        )
    for key, (token, expected) in text.special_tokens().items():
        if tokenizer.token_id(token) != expected:
            raise ConfigError(
                f"config key '{section}.{key}': {expected}, but the tokenizer's {token} is {tokenizer.token_id(token)}"
            )


def _check_tokenizer_fits(tokenizer: Tokenizer, model_cfg: Any) -> None:
    text = getattr(model_cfg, "text", None)
    if text is None:
        return
    _check_text_tokenizer(tokenizer, text, "model.text")
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


def _flatten(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in config.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _report_changes(saved: dict[str, Any], cfg: RunConfig, step: int) -> None:
    """Say which settings a resumed run changes: they apply from the next step (the optimiser's and the
    schedule's saved values are replaced by the new ones)."""
    before, after = _flatten(saved), _flatten(to_dict(cfg))
    changed = [f"{key} {before.get(key)!r} -> {after.get(key)!r}" for key in after if before.get(key) != after.get(key)]
    if changed:
        log.warning("resuming at step %d with changed settings, applied from step %d on: %s", step, step + 1,
                    "; ".join(changed))


def _apply_optimizer_settings(optimizer: torch.optim.Optimizer, schedule: torch.optim.lr_scheduler.LambdaLR,
                              tc: TrainConfig) -> None:
    """The run's learning rate, weight decay, betas and eps over the values a resumed optimizer restored."""
    schedule.base_lrs = [tc.lr * group.get("lr_scale", 1.0) for group in optimizer.param_groups]
    factor = schedule.lr_lambdas[0](schedule.last_epoch)
    for group, base in zip(optimizer.param_groups, schedule.base_lrs, strict=True):
        group.update(initial_lr=base, lr=base * factor, betas=tc.betas, eps=tc.eps)
        if group["weight_decay"]:  # the group of weight matrices; the other never decays
            group["weight_decay"] = tc.weight_decay
    schedule._last_lr = [group["lr"] for group in optimizer.param_groups]


def train(cfg: RunConfig, out: str | Path, *, resume: str | None = None) -> Path:
    """Train as `cfg` says, writing checkpoints and metrics under `out`. Returns the last checkpoint.

    Everything that can be checked is checked before anything is written; the run folder is locked
    against a second run while this one writes to it."""
    out = Path(out)
    with process_group():
        family, model_cfg, objective_cfg = cfg.family_configs()
        cfg.data.check()
        world = world_size()
        if cfg.train.batch_size % (world * cfg.train.accum_steps):
            raise ConfigError(
                f"config key 'train.batch_size': {cfg.train.batch_size} does not split into {world} process(es) x "
                f"{cfg.train.accum_steps} accumulation step(s)"
            )
        resume_from = _find_resume(out, resume)
        device = _device(cfg.train.device)
        new_folder = not out.exists()
        lock, refusal = None, None
        try:
            if rank() == 0:
                out.mkdir(parents=True, exist_ok=True)
                try:
                    lock = RunLock(out).acquire()
                except RunFolderInUse as err:
                    refusal = str(err)
            if not all_processes_agree(refusal is None):
                raise TrainingError(refusal or f"run folder {out} is in use by another vlp run")
            return _train(cfg, family, model_cfg, objective_cfg, out, resume_from, device)
        finally:
            if lock is not None:
                lock.release()
            if new_folder and rank() == 0 and out.is_dir() and not any(out.iterdir()):
                out.rmdir()  # a run that failed before writing anything leaves no empty folder behind


def _skipped_totals(bad: BadSamples, carried: dict[str, int]) -> tuple[dict[str, int], dict[str, int]]:
    """Skipped samples by cause over every process and every resumed leg of the run (collective):
    (all, those that failed to load). Rows dropped when a file is read count once, since every process
    reads the whole file; samples that failed to load are summed over processes and carried across legs."""
    loaded = all_reduce_sum(torch.tensor([bad.failed[c] for c in CAUSES], dtype=torch.float64)).tolist()
    failed = {c: int(n) + carried.get(c, 0) for c, n in zip(CAUSES, loaded, strict=True)}
    failed = {cause: n for cause, n in failed.items() if n}
    totals = {c: bad.dropped[c] + failed.get(c, 0) for c in CAUSES if bad.dropped[c] + failed.get(c, 0)}
    return totals, failed


def _train(cfg: RunConfig, family: Family, model_cfg: Any, objective_cfg: Any, out: Path, resume_from: Path | None,
           device: torch.device) -> Path:
    tc = cfg.train
    world, is_main = world_size(), rank() == 0
    if tc.threads:
        torch.set_num_threads(tc.threads)
    torch.manual_seed(tc.seed)
    model_cfg = resolve_sources(model_cfg)

    initial = None
    if tc.init_from and resume_from is None:
        from vlp.convert import load_pretrained

        initial = load_pretrained(tc.init_from)
    saved_state: dict[str, Any] = read_json(resume_from / STATE_FILE) if resume_from is not None else {}
    tokenizer = _prepare_tokenizer(cfg, family, model_cfg, out, resume_from, initial)
    _check_tokenizer_fits(tokenizer, model_cfg)
    recipe = recipe_of(family)
    qformer_tokenizer = None
    if recipe.reads_instructions:
        qformer_tokenizer = _prepare_qformer_tokenizer(model_cfg, resume_from, initial)
        _check_text_tokenizer(qformer_tokenizer, model_cfg.qformer, "model.qformer")
    model = build_model(family, model_cfg, bytes_per_parameter=TRAIN_BYTES_PER_PARAMETER, what="config section 'model'")
    start_step = 0
    if resume_from is None:
        load_sources(model, model_cfg)
    if initial is not None:
        _initialise(model, family, initial)
        log.info("initialised from %s", initial.path)
        del initial
    if resume_from is not None:
        load_weights(model, resume_from / WEIGHTS_FILE)
        start_step = saved_state["step"]
        log.info("resuming from %s at step %d", resume_from, start_step)
    model.to(device).train()
    recipe.objective_cls.prepare(model, objective_cfg)  # before wrapping: DDP registers the trainable parameters
    parallel = ParallelModel(model, tc.strategy, device)
    forward_model = torch.compile(parallel.module) if tc.compile else parallel.module
    objective = recipe.objective_cls(forward_model, objective_cfg)
    optimizer = make_optimizer(model, lr=tc.lr, weight_decay=tc.weight_decay, betas=tc.betas, eps=tc.eps,
                               lr_scales=tc.lr_scales)
    schedule = warmup_cosine(optimizer, warmup_steps=tc.warmup_steps, total_steps=tc.steps,
                             min_lr_ratio=tc.min_lr_ratio)
    if resume_from is not None:
        saved = torch.load(resume_from / OPTIMIZER_FILE, map_location="cpu", weights_only=True)
        parallel.load_optimizer_state(optimizer, saved["optimizer"])
        schedule.load_state_dict(saved["schedule"])
        _apply_optimizer_settings(optimizer, schedule, tc)
        if is_main:
            _report_changes(saved_state.get("run", {}), cfg, start_step)
    train_step = TrainStep(parallel, objective, optimizer, schedule, accum_steps=tc.accum_steps,
                           grad_clip=tc.grad_clip, precision=tc.precision, device_type=device.type,
                           family=family.name)
    metrics_path = out / METRICS_FILE
    if is_main:
        log.info("computing in %s on %s (train.precision: %s)", train_step.precision, device, tc.precision)
        (out / "run.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
        truncate_metrics(metrics_path, start_step)
        remove_unfinished(out)

    bad = bad_samples(cfg.data)
    positions = saved_state.get("data_position")
    batches = recipe.batches(cfg.data, ImageTransform(cfg.image, train=True), tokenizer,
                             batch_size=tc.batch_size // world, seed=tc.seed, start_step=start_step, rank=rank(),
                             world_size=world, bad=bad,
                             position=positions[rank()] if positions and len(positions) == world else None,
                             **({"qformer_tokenizer": qformer_tokenizer} if recipe.reads_instructions else {}))
    if positions and len(positions) != world:
        log.warning("the data stream restarts its epoch: the checkpoint was written by %d process(es), this run "
                    "has %d", len(positions), world)
    carried = saved_state.get("failed_samples", {})  # samples that failed to load in the run's earlier legs
    skipped_steps = saved_state.get("skipped_steps", 0)
    nonfinite_in_a_row = 0

    def run_state(step: int) -> dict[str, Any]:
        """What a checkpoint records beside the weights (collective: every process calls it)."""
        position = batches.position()  # every family's batches are `GoodBatches`
        gathered = all_gather_objects(position)
        totals, failed = _skipped_totals(bad, carried)
        state = {"step": step, "run": to_dict(cfg), "skipped_samples": totals, "failed_samples": failed,
                 "skipped_steps": skipped_steps}
        if position is not None:
            state["data_position"] = gathered
        return state

    def checkpoint(step: int) -> Path:
        folder = out / CHECKPOINTS_DIR / f"step_{step:08d}"
        weights, optimizer_state = parallel.state_dict(), parallel.optimizer_state(optimizer)
        state = run_state(step)
        bad_weight = first_nonfinite(weights) if is_main else None
        if not all_processes_agree(bad_weight is None):
            raise TrainingError(
                f"step {step}: weight '{bad_weight}' is not finite, so no checkpoint was written; the last one is "
                f"{last}. Lower train.lr ({tc.lr:g}) or keep train.grad_clip set"
            )
        if not is_main:  # one writer; the others took part in gathering the shards
            return folder
        folder = save_checkpoint(
            folder, family=family, model_config=model_cfg, model=weights, image_config=cfg.image,
            tokenizer=tokenizer, qformer_tokenizer=qformer_tokenizer, state=state,
            optimizer_state={"optimizer": optimizer_state, "schedule": schedule.state_dict()},
        )
        for old in list_checkpoints(out)[:-tc.keep_checkpoints]:
            shutil.rmtree(old)
        return folder

    last = resume_from
    # Summed on the device and read at log steps only, so steps do not wait for the accelerator.
    sums: dict[str, torch.Tensor] = {}
    logged_steps, interval_skipped = 0, 0
    interval_samples, interval_start, run_start = 0, time.perf_counter(), time.perf_counter()
    # Redrawn less often when stderr is a log file rather than a terminal.
    bar = tqdm(total=tc.steps, initial=start_step, disable=not (tc.progress and is_main), unit="step",
               dynamic_ncols=True, mininterval=0.1 if sys.stderr.isatty() else 10.0)
    with (
        metrics_path.open("a") if is_main else contextlib.nullcontext() as metrics_file,
        contextlib.closing(batches),  # a WebDataset stream's workers stop with the run, not at a later GC
    ):
        for step in range(start_step + 1, tc.steps + 1):
            batch = {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in next(batches).items()}
            result = train_step(batch)
            interval_samples += batch["size"] * world
            if result.skipped:
                skipped_steps += 1
                interval_skipped += 1
                nonfinite_in_a_row += 1
                terms = ", ".join(f"{k} {v.item():.4g}" for k, v in result.values.items() if k.endswith("_loss"))
                log.warning("step %d skipped: the loss or the gradient norm is not finite (%s; gradient norm "
                            "%.4g); %d in a row", step, terms, result.grad_norm.item(), nonfinite_in_a_row)
                if nonfinite_in_a_row >= tc.max_nonfinite_steps:
                    before = f"the last checkpoint, written before them, is {last}" if last else "no checkpoint was written"
                    raise TrainingError(
                        f"training diverged: {nonfinite_in_a_row} steps in a row (steps {step - nonfinite_in_a_row + 1}"
                        f" to {step}) had a non-finite loss or gradient norm (train.max_nonfinite_steps) and made no "
                        f"update; {before}. Lower train.lr ({tc.lr:g}) or keep train.grad_clip set"
                    )
            else:
                nonfinite_in_a_row = 0
                logged_steps += 1
                for key, value in {"loss": result.loss, **result.values, "grad_norm": result.grad_norm}.items():
                    sums[key] = sums.get(key, 0) + value.detach().double()
            bar.update(1)
            if step % tc.log_every == 0 or step == tc.steps:
                elapsed = time.perf_counter() - interval_start
                record: dict[str, Any] = {"step": step, "lr": schedule.get_last_lr()[0]}
                if sums:
                    means = all_reduce_mean(torch.stack(list(sums.values()))).tolist()
                    record.update({k: v / logged_steps for k, v in zip(sums, means, strict=True)})
                record["samples_per_s"] = interval_samples / max(elapsed, 1e-9)
                record["elapsed_s"] = time.perf_counter() - run_start
                totals, _ = _skipped_totals(bad, carried)
                record["skipped_samples"] = sum(totals.values())
                record.update({f"skipped/{cause}": n for cause, n in totals.items()})
                if interval_skipped:
                    record["skipped_steps"] = interval_skipped
                if is_main:
                    try:
                        metrics_file.write(json.dumps(record) + "\n")
                        metrics_file.flush()
                    except OSError as err:
                        raise OSError(err.errno, err.strerror, str(metrics_path)) from err
                if "loss" in record:
                    bar.set_postfix(loss=f"{record['loss']:.4f}", samples_s=f"{record['samples_per_s']:.0f}")
                sums, logged_steps, interval_skipped = {}, 0, 0
                interval_samples, interval_start = 0, time.perf_counter()
            if step == tc.steps or (step % tc.save_every == 0 and not nonfinite_in_a_row):
                # In a run of skipped steps the model may have diverged: its checkpoint would become
                # `latest` for resuming and evaluation, so it waits for a step that updates again.
                last = checkpoint(step)
            elif step % tc.save_every == 0:
                log.warning("step %d: no checkpoint while steps are skipped for a non-finite loss", step)
    bar.close()
    if last is None:
        raise CheckpointError(f"no training steps were run: train.steps is {tc.steps}")
    totals, _ = _skipped_totals(bad, carried)
    if is_main:
        summary = ", ".join(f"{cause} {n}" for cause, n in totals.items()) or "none"
        if start_step >= tc.steps:
            log.info("nothing to train: the checkpoint is at step %d, train.steps is %d", start_step, tc.steps)
        log.info("run ended at step %d; skipped samples: %s; skipped steps (non-finite loss or gradient): %d",
                 max(start_step, tc.steps), summary, skipped_steps)
    return last
