"""A training run's configuration: the typed sections of a run config file, read with its overrides and
checked before any work; the saved configuration a resumed run continues from."""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

from vlp.assets.image import ImageConfig
from vlp.assets.tokenizer import TokenizerConfig
from vlp.checkpoint import CHECKPOINTS_DIR, STATE_FILE, list_checkpoints, read_json, resolve_checkpoint
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
)
from vlp.data.pipeline import DataConfig
from vlp.distributed import Strategy
from vlp.errors import CheckpointError
from vlp.objectives.recipes import parse_data_config, parse_objective_config
from vlp.precision import Precision
from vlp.registry import Family, parse_model_config
from vlp.train.evals import parse_evals

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
    # Parameter-name prefix -> multiple of `lr` ({text: 0.01}: a detector's text tower and projection; 0 freezes).
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
    # unless tokenizer.path is set. Another family starts through the model's `init_from` (a VQA model from a captioner).
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
    # Evaluations during training and after the last step, by name (`vlp.train.evals`).
    evals: dict[str, Any] = field(default_factory=dict)

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
    parse_evals(cfg.evals, family, cfg.train.strategy)
    return cfg


def saved_run_config(out: str | Path, resume: str) -> dict[str, Any] | None:
    """The configuration of the run `--resume` continues (from its checkpoint), or None when
    `--resume latest` finds no checkpoint in `out`."""
    if resume == "latest" and not list_checkpoints(out):
        return None  # train() says that it starts from scratch
    folder = find_resume(Path(out), resume)
    state = read_json(folder / STATE_FILE)
    if not isinstance(state, dict) or not isinstance(state.get("run"), dict):
        raise CheckpointError(f"{folder / STATE_FILE} holds no run configuration to resume with")
    return state["run"]


def find_resume(out: Path, resume: str | None) -> Path | None:
    """The checkpoint `--resume` names: `latest` in `out` (None when there is none), or a checkpoint folder
    that holds a training state."""
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
