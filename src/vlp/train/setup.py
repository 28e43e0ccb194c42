"""Everything a training run needs before its first step: the device, the named assets (tokenizers and image
preprocessing), the model (from its sources, a checkpoint it starts from, or the one it resumes), the
objective, the optimiser and schedule, and the data stream. The family's recipe (`vlp.objectives.recipes`)
says what is family-specific; nothing here names a family."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from vlp.assets import IMAGE, TEXT, TOKENIZERS_DIR, Assets, read_tokenizer
from vlp.assets.image import ImageTransform
from vlp.assets.tokenizer import Tokenizer, train_tokenizer
from vlp.checkpoint import (
    OPTIMIZER_FILE,
    STATE_FILE,
    WEIGHTS_FILE,
    Pretrained,
    build_model,
    load_weights,
    read_json,
    read_torch_file,
    remove_unfinished,
)
from vlp.config import ConfigError, to_dict
from vlp.data.pipeline import GoodBatches, bad_samples
from vlp.data.sources import BadSamples
from vlp.distributed import ParallelModel, barrier, is_distributed, rank, world_size
from vlp.model_size import TRAIN_BYTES_PER_PARAMETER
from vlp.objectives.recipes import Recipe, recipe_of
from vlp.objectives.sources import load_sources, resolve_sources
from vlp.outputs import write_text
from vlp.precision import default_device
from vlp.registry import Family
from vlp.train.config import RunConfig, TrainConfig
from vlp.train.optim import make_optimizer, warmup_cosine
from vlp.train.run_folder import METRICS_FILE, RUN_CONFIG_FILE, truncate_metrics
from vlp.train.step import TrainStep

log = logging.getLogger("vlp.train")


@dataclass
class Run:
    """A run ready to step: what `setup` built, and where it starts."""

    cfg: RunConfig
    family: Family
    model_cfg: Any
    out: Path
    device: torch.device
    model: torch.nn.Module  # the family's model itself, unwrapped
    parallel: ParallelModel
    optimizer: torch.optim.Optimizer
    schedule: torch.optim.lr_scheduler.LambdaLR
    train_step: TrainStep
    assets: Assets
    batches: GoodBatches
    bad: BadSamples
    start_step: int
    saved_state: dict[str, Any]  # the resumed checkpoint's state.json ({} for a new run)

    @property
    def carried_failures(self) -> dict[str, int]:
        """Samples that failed to load in the run's earlier legs, by cause (a resumed run carries them on)."""
        return self.saved_state.get("failed_samples", {})

    def pretrained(self) -> Pretrained:
        """The model being trained with its assets, for the predict functions of evaluations."""
        return Pretrained(self.family, self.model_cfg, self.model, self.assets, self.out)


def device_for(name: str) -> torch.device:
    if name == "auto":
        name = default_device().type
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"config key 'train.device': {name!r}, but this machine has no CUDA device")
    if name == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("config key 'train.device': 'mps', but this machine has no MPS device")
    if name == "cuda" and is_distributed():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device(name)


def _text_tokenizer(cfg: RunConfig, recipe: Recipe, model_cfg: Any, out: Path, initial: Pretrained | None) -> Tokenizer:
    """The `text` tokenizer of a new run: the one `tokenizer.path` names, the checkpoint's it starts from, or
    one trained on the training texts (by one process; the others read what it wrote)."""
    if cfg.tokenizer.path:
        path = Path(cfg.tokenizer.path)
        if (path / "config.json").is_file():  # a Hugging Face model's folder (a language model's tokenizer)
            from vlp.convert.tokenizers import tokenizer_from_path

            tokenizer = tokenizer_from_path(path, context_length=cfg.tokenizer.context_length)
            # Tokens the model writes itself that the folder's tokenizer lacks (a decoder's start token).
            tokenizer.backend.add_special_tokens([t for t in cfg.tokenizer.extra_tokens if tokenizer.token_id(t) is None])
            return tokenizer
        return read_tokenizer(path)
    if initial is not None:
        tokenizer = initial.tokenizer
        context = getattr(getattr(model_cfg, "text", None), "context_length", None)
        if context is not None and context < tokenizer.context_length:
            # A model with a shorter text context than its source's (a detector's 16-token queries from 77).
            tokenizer = tokenizer.with_context_length(context)
        return tokenizer
    folder = out / TOKENIZERS_DIR / TEXT
    if rank() == 0:
        log.info("training a %s tokenizer on the training texts", cfg.tokenizer.kind)
        folder.mkdir(parents=True, exist_ok=True)
        train_tokenizer(recipe.data.texts(cfg.data), cfg.tokenizer).save(folder)
    barrier()
    return Tokenizer.from_file(folder)


def prepare_assets(cfg: RunConfig, recipe: Recipe, model_cfg: Any, out: Path, resume_from: Path | None,
                   initial: Pretrained | None) -> Assets:
    """The run's named assets, each checked against the part of the model that reads it: those of the
    checkpoint it resumes; else the text tokenizer, the recipe's other tokenizers (from the checkpoint the
    run starts from when it has them, else made from the model's sources) and the run's image preprocessing."""
    if resume_from is not None:
        assets = Assets.load(resume_from)
        assets.image_processors[IMAGE] = cfg.image  # the run's own, which a resumed run may change
        assets.prompts = list(getattr(cfg.data, "prompts", assets.prompts))
    else:
        tokenizers = {TEXT: _text_tokenizer(cfg, recipe, model_cfg, out, initial)}
        for asset in recipe.tokenizers:
            have = initial.assets.tokenizers.get(asset.name) if initial is not None else None
            tokenizers[asset.name] = have if have is not None else asset.build(model_cfg)
        # Data that prompts its text (a detector's queries) hands its templates on, for predictions to use.
        assets = Assets(tokenizers, {IMAGE: cfg.image}, list(getattr(cfg.data, "prompts", ())))
    check_tokenizer_fits(assets.tokenizer(TEXT, where=resume_from or "the run"), model_cfg)
    for asset in recipe.tokenizers:
        tokenizer = assets.tokenizer(asset.name, where=resume_from or "the run")
        check_text_tokenizer(tokenizer, getattr(model_cfg, asset.section), f"model.{asset.section}")
    return assets


def check_text_tokenizer(tokenizer: Tokenizer, text: Any, section: str) -> None:
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


def check_tokenizer_fits(tokenizer: Tokenizer, model_cfg: Any) -> None:
    text = getattr(model_cfg, "text", None)
    if text is None:
        return
    check_text_tokenizer(tokenizer, text, "model.text")
    # A model that generates from the start token to the end token must use the tokenizer's own.
    for key, actual in zip(("bos_token_id", "eos_token_id"), tokenizer.framing_ids(), strict=True):
        expected = getattr(model_cfg, key, actual)
        if expected != actual:
            raise ConfigError(f"config key 'model.{key}': {expected}, but the tokenizer's is {actual}")


def initialise(model: torch.nn.Module, family: Family, initial: Pretrained) -> None:
    """Copy a pre-trained model's weights into a new one: the same family loads them whole; a family the
    recipe says it starts from goes through the new model's `init_from`."""
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


def setup(cfg: RunConfig, family: Family, model_cfg: Any, objective_cfg: Any, out: Path, resume_from: Path | None,
          device: torch.device) -> Run:
    """Build the run (collective: every process calls it)."""
    tc = cfg.train
    world, is_main = world_size(), rank() == 0
    if tc.threads:
        torch.set_num_threads(tc.threads)
    torch.manual_seed(tc.seed)
    recipe = recipe_of(family)
    model_cfg = resolve_sources(model_cfg)

    initial = None
    if tc.init_from and resume_from is None:
        from vlp.convert import load_pretrained

        initial = load_pretrained(tc.init_from)
    saved_state: dict[str, Any] = read_json(resume_from / STATE_FILE) if resume_from is not None else {}
    assets = prepare_assets(cfg, recipe, model_cfg, out, resume_from, initial)
    model = build_model(family, model_cfg, bytes_per_parameter=TRAIN_BYTES_PER_PARAMETER, what="config section 'model'")
    start_step = 0
    if resume_from is None:
        load_sources(model, model_cfg)
    if initial is not None:
        initialise(model, family, initial)
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
        saved = read_torch_file(resume_from / OPTIMIZER_FILE)
        parallel.load_optimizer_state(optimizer, saved["optimizer"])
        schedule.load_state_dict(saved["schedule"])
        if "rng" in saved:  # checkpoints before the random state was saved resume from the seed
            torch.set_rng_state(saved["rng"])
        _apply_optimizer_settings(optimizer, schedule, tc)
        if is_main:
            _report_changes(saved_state.get("run", {}), cfg, start_step)
    train_step = TrainStep(parallel, objective, optimizer, schedule, accum_steps=tc.accum_steps,
                           grad_clip=tc.grad_clip, precision=tc.precision, device_type=device.type,
                           family=family.name)
    if is_main:
        log.info("computing in %s on %s (train.precision: %s)", train_step.precision, device, tc.precision)
        write_text(out / RUN_CONFIG_FILE, yaml.safe_dump(to_dict(cfg), sort_keys=False))
        truncate_metrics(out / METRICS_FILE, start_step)
        remove_unfinished(out)

    bad = bad_samples(cfg.data)
    positions = saved_state.get("data_position")
    extra = {f"{asset.name}_tokenizer": assets.tokenizers[asset.name] for asset in recipe.tokenizers}
    batches = recipe.data.batches(cfg.data, ImageTransform(cfg.image, train=True), assets.tokenizers[TEXT],
                             batch_size=tc.batch_size // world, seed=tc.seed, start_step=start_step, rank=rank(),
                             world_size=world, bad=bad,
                             position=positions[rank()] if positions and len(positions) == world else None, **extra)
    if positions and len(positions) != world:
        log.warning("the data stream restarts its epoch: the checkpoint was written by %d process(es), this run "
                    "has %d", len(positions), world)
    return Run(cfg, family, model_cfg, out, device, model, parallel, optimizer, schedule, train_step, assets,
               batches, bad, start_step, saved_state)
