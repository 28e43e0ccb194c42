"""What every task module declares, and what its predict functions share.

A task (`Task`) declares the abilities a model needs for it, its predict functions, its typed request and
response (what an HTTP route takes and gives) with the function that answers one, its evaluation (`vlp eval NAME`
and a run config's `evals:` entries: a config dataclass whose fields are the flags, and
`evaluate(functions, config) -> EvalResult`), its predict commands (`vlp NAME ...`), and the kind of
training data it reads. The command line and the trainer's evaluations loop over the task table
(`vlp.tasks.TASKS`); neither knows a task or a family by name.

Predict functions are methods of predictors: a `Predictor` holds the model on its device in eval mode,
its named assets, batching, bf16 autocast as an option and progress bars as another.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
from PIL import Image
from tqdm import tqdm

from vlp.abilities import Ability
from vlp.checkpoint import Pretrained
from vlp.data.pipeline import TrainingData
from vlp.data.sources import as_rgb, load_image
from vlp.errors import UnsupportedTask
from vlp.evals import EvalResult
from vlp.precision import Precision, default_device, resolve_precision
from vlp.registry import Family

ImageInput = Image.Image | str | Path


def open_image(image: ImageInput) -> Image.Image:
    """A PIL image, or the image file a path names, upright in 8-bit RGB (an unreadable file is a `DataError`)."""
    return as_rgb(image) if isinstance(image, Image.Image) else load_image(Path(image))


F = TypeVar("F", bound=Callable[..., Any])


def per_item(count: int) -> Callable[[F], F]:
    """Marks a predict function whose first `count` arguments are sequences with one entry per item (images,
    their questions) and whose output has one entry per item: calls with the same other arguments can be
    joined into one and their outputs split again (the service's dynamic batching)."""

    def mark(function: F) -> F:
        function.per_item_args = count  # type: ignore[attr-defined]
        return function

    return mark


def batch_starts(total: int, batch_size: int, progress: str | None = None) -> Iterable[int]:
    """The first index of every batch; with `progress`, under a progress bar of that name when there is
    more than one batch."""
    starts = range(0, total, batch_size)
    return tqdm(starts, desc=progress, unit="batch", leave=False, disable=progress is None or len(starts) < 2)


class Predictor:
    """What every predictor shares: the model on its device in eval mode, its preprocessing and
    tokenizers, batching, bf16 autocast as an option and progress bars as another.

    `abilities` are what the model must be able to do (its family declares them in the registry) and
    `task` what the predictor does, for the error a checkpoint of another kind gets.
    """

    abilities: tuple[type[Ability], ...] = ()
    task: str = ""
    default_batch_size: int = 32

    def __init__(
        self,
        pretrained: Pretrained,
        *,
        batch_size: int | None = None,
        device: str | None = None,
        precision: Precision = "fp32",
        progress: bool = False,
    ):
        missing = self.missing_ability(pretrained)
        if missing:
            raise UnsupportedTask(f"{pretrained.path}: {pretrained.family.name} models cannot {self.task} ({missing})")
        self.pretrained = pretrained
        self.device = torch.device(device) if device else default_device()
        self.model = pretrained.model.to(self.device).eval()
        self.transform = pretrained.image_transform()
        self.tokenizer = pretrained.tokenizer
        self.batch_size = batch_size or self.default_batch_size
        self.progress = progress
        # bf16 runs the model under bf16 autocast: about twice as fast on CPUs with bf16 matmuls. Predictors
        # run under no_grad, not inference_mode: autocast keeps one bf16 copy of each weight per call only
        # outside inference mode, and without it a decoder re-casts every weight for every token.
        self.autocast = torch.autocast(self.device.type, dtype=torch.bfloat16,
                                       enabled=resolve_precision(precision, self.device) == "bf16")

    @classmethod
    def missing_ability(cls, pretrained: Pretrained) -> str | None:
        """None when the model can do this predictor's task, else what it lacks."""
        missing = [ability.__name__ for ability in cls.abilities if not pretrained.family.can(ability)]
        return f"its family does not declare {', '.join(missing)}" if missing else None

    @classmethod
    def from_checkpoint(cls, path: str | Path, **kwargs: Any) -> Predictor:
        """Any checkpoint `vlp.load` reads: vlp, Hugging Face or open_clip folders."""
        from vlp.convert import load_pretrained

        return cls(load_pretrained(path), **kwargs)

    def pixels(self, items: Sequence[ImageInput | Sequence[ImageInput]]) -> torch.Tensor:
        """Preprocessed images on the device: [b, 3, S, S], or [b, F, 3, S, S] when every item is a list of F
        images (an image pair, a sequence of frames)."""
        sets = [isinstance(item, (list, tuple)) for item in items]
        if not any(sets):
            return torch.stack([self.transform(open_image(item)) for item in items]).to(self.device)
        if not all(sets) or len({len(item) for item in items}) > 1:
            raise ValueError("every item of a batch needs the same number of images")
        return torch.stack([torch.stack([self.transform(open_image(image)) for image in item])
                            for item in items]).to(self.device)

    def pixel_batches(self, images: Sequence[ImageInput], what: str) -> Iterator[torch.Tensor]:
        """Preprocessed pixel batches of `batch_size` images [b, 3, S, S], under a progress bar named `what`
        when the predictor shows progress."""
        for start in batch_starts(len(images), self.batch_size, what if self.progress else None):
            yield self.pixels(images[start : start + self.batch_size])


@dataclass(frozen=True)
class PredictFunction:
    """A predict function: the method `name` of a predictor, and the abilities it needs beyond the
    predictor's (`vlp.abilities`). `example(functions, images)` calls it on a few images and texts of its
    own: what the registry sweep runs for every family that can (a saved and reloaded model must give the
    same output), and a usage example."""

    name: str
    predictor: type[Predictor]
    example: Callable[[Any, list[Image.Image]], Any]
    extra_abilities: tuple[type[Ability], ...] = ()

    @property
    def abilities(self) -> tuple[type[Ability], ...]:
        return (*self.predictor.abilities, *self.extra_abilities)


# The predict functions a command or an evaluation gets: `functions(options)` loads them once, with
# `options` for the predictors that take any ({PredictorClass: {option: value}}).
FunctionsFactory = Callable[[dict[type[Predictor], dict[str, Any]]], Any]


@dataclass(frozen=True)
class Evaluation:
    """`vlp eval NAME` and a run config's `evals:` entries: `config` is a dataclass whose fields are the
    command's flags and the entry's keys; `evaluate(functions, config)` scores a model through its predict
    functions; `options(config)` are the predictor options the functions are made with."""

    name: str
    help: str
    config: type
    evaluate: Callable[[Any, Any], EvalResult]
    options: Callable[[Any], dict[type[Predictor], dict[str, Any]]] = lambda config: {}


@dataclass(frozen=True)
class Command:
    """`vlp NAME ...`, a predict command: `options` is a dataclass whose fields are its flags;
    `run(functions, options)` prints or writes what it predicts."""

    name: str
    help: str
    options: type
    run: Callable[[FunctionsFactory, Any], None]


@dataclass(frozen=True)
class Task:
    """One task, declared once. A model can do it when its family declares every ability of one of the sets
    in `abilities`. `request` / `response` are its typed request and response: `respond(functions, request)
    -> response` answers one, with functions made with `request_options(request)` (the predictor options a
    request sets); `training` is the kind of training data it reads."""

    name: str
    abilities: tuple[tuple[type[Ability], ...], ...]
    functions: tuple[PredictFunction, ...] = ()
    request: type | None = None
    response: type | None = None
    respond: Callable[[Any, Any], Any] | None = None
    request_options: Callable[[Any], dict[type[Predictor], dict[str, Any]]] = lambda request: {}
    # The service's route for the request, a verb: POST /v1/<route>.
    route: str | None = None
    # A request about the given image files: what the registry sweep answers for every family that can.
    example_request: Callable[[list[str]], Any] | None = None
    evaluation: Evaluation | None = None
    commands: tuple[Command, ...] = ()
    training: TrainingData | None = None

    def can(self, family: Family) -> bool:
        return any(all(family.can(ability) for ability in needed) for needed in self.abilities)
