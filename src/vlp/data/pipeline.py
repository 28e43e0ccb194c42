"""One training pipeline for every source: images decoded and augmented in worker processes,
captions tokenised per batch, bad samples skipped and counted.

Map-style sources (CSV, COCO) are read in a seeded order that depends only on (seed, epoch), and
each sample's augmentation only on (seed, epoch, index), so a resumed run sees the same batches.
WebDataset shards stream in an order that depends only on (seed, epoch, rank, worker); a resumed run
skips what it had consumed.
"""

from __future__ import annotations

import itertools
import logging
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import braceexpand
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info

from vlp.assets.image import ImageTransform
from vlp.assets.tokenizer import Tokenizer
from vlp.config import Fraction, NonNegativeInt, PositiveInt
from vlp.data.batches import CaptionBatch
from vlp.data.sources import (
    BadSamples,
    DataError,
    ImageCaptions,
    Skipped,
    decode_webdataset_sample,
    detect_format,
    load_image,
    read_captions,
    skipped,
)

log = logging.getLogger("vlp.data")


@dataclass
class DataConfig:
    train: str | None = None  # CSV, COCO captions JSON, or WebDataset shards ("a-{000..009}.tar::b.tar")
    images: str | None = None  # folder that relative image paths resolve against
    image_key: str = "filepath"  # CSV column of the image path
    caption_key: str = "title"  # CSV column of the caption
    num_workers: NonNegativeInt = 2
    # The run stops when more than this share of the data is bad (unreadable, empty, undecodable)...
    max_bad_fraction: Fraction = 0.05
    # ... judged on the rows of a caption file as soon as it is read, and on loaded samples once this
    # many were drawn, so a few bad samples early on do not stop a run.
    bad_fraction_min_samples: PositiveInt = 2000
    shuffle_buffer: PositiveInt = 1000  # WebDataset sample shuffle
    samples_per_epoch: PositiveInt | None = None  # WebDataset epoch length; None = one pass over the shards

    def check(self) -> None:
        """Refuse, before any work, training data that is not given or not there."""
        check_training_data(self)


def flatten_pairs(items: list[ImageCaptions]) -> list[tuple[Path, str]]:
    """Every (image, caption) pair, as open_clip's CSV reader sees them."""
    return [(item.path, caption) for item in items for caption in item.captions]


class PairDataset(Dataset):
    """(index, epoch) -> one transformed image with its caption, or a `bad` reason."""

    def __init__(self, pairs: list[tuple[Path, str]], transform: ImageTransform, seed: int):
        self.pairs = pairs
        self.transform = transform
        self.seed = seed

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, item: tuple[int, int]) -> dict[str, Any]:
        index, epoch = item
        path, caption = self.pairs[index]
        try:
            image = load_image(path)
        except DataError as err:
            return {"bad": skipped(err)}
        rng = random.Random(f"{self.seed}-{epoch}-{index}")
        return {"image": self.transform(image, rng), "caption": caption}


class Collate:
    """Stack images, tokenise captions as one batch, pass the skipped samples through."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer

    def __call__(self, items: list[dict[str, Any]]) -> CaptionBatch:
        good = [i for i in items if "bad" not in i]
        bad = [i["bad"] for i in items if "bad" in i]
        if not good:
            return {"bad": bad, "size": 0}
        text, text_mask = self.tokenizer([i["caption"] for i in good])
        return {
            "image": torch.stack([i["image"] for i in good]),
            "text": text,
            "text_mask": text_mask,
            "bad": bad,
            "size": len(good),
        }


class EpochBatchSampler:
    """Endless batches of (index, epoch): a fresh permutation per epoch, sliced by process rank.

    Starting at `start_step` reproduces exactly the batches an uninterrupted run would have drawn.
    """

    def __init__(self, num_samples: int, batch_size: int, *, seed: int, rank: int = 0, world_size: int = 1,
                 start_step: int = 0):
        self.global_batch = batch_size * world_size
        if num_samples < self.global_batch:
            raise DataError(f"{num_samples} training pairs are fewer than one global batch of {self.global_batch}")
        self.num_samples, self.batch_size = num_samples, batch_size
        self.seed, self.rank, self.start_step = seed, rank, start_step
        self.batches_per_epoch = num_samples // self.global_batch

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        step = self.start_step
        order, order_epoch = None, -1
        while True:
            epoch, position = divmod(step, self.batches_per_epoch)
            if epoch != order_epoch:
                order = torch.randperm(self.num_samples, generator=torch.Generator().manual_seed(self.seed + epoch))
                order_epoch = epoch
            start = position * self.global_batch + self.rank * self.batch_size
            yield [(int(i), epoch) for i in order[start:start + self.batch_size]]
            step += 1


def expand_shards(spec: str) -> list[str]:
    """'a-{000..009}.tar::b.tar' -> the list of shard paths, each checked to exist."""
    urls = [url for part in spec.split("::") for url in braceexpand.braceexpand(part)]
    missing = [u for u in urls if "://" not in u and not u.startswith("pipe:") and not Path(u).exists()]
    if missing:
        raise DataError(f"WebDataset shard not found: {missing[0]} ({len(missing)} of {len(urls)} missing)")
    return urls


class WebDatasetStream(IterableDataset):
    """Batches from WebDataset shards, in an order fixed by (seed, epoch, rank, worker).

    Every pass (epoch) each process shuffles the shard list alike by (seed, epoch), takes its share by
    rank and then by DataLoader worker, reads the samples with webdataset, shuffles them in a buffer seeded
    by (seed, epoch, rank, worker), and decodes and batches them; sample n's augmentation depends on
    (seed, epoch, rank, worker, n) alone. Started at `start_epoch` with `skip_batches`, each worker first
    passes over that many batches of raw samples without decoding them: what a run had consumed before it
    was stopped. A shard that breaks off is reported with the next batch, as a `truncated_shard`.
    """

    def __init__(self, urls: list[str], transform: ImageTransform, collate: Collate, *, batch_size: int,
                 shuffle_buffer: int, seed: int, rank: int, world_size: int, start_epoch: int = 0,
                 skip_batches: int = 0):
        self.urls, self.transform, self.collate = urls, transform, collate
        self.batch_size, self.shuffle_buffer, self.seed = batch_size, shuffle_buffer, seed
        self.rank, self.world_size = rank, world_size
        self.start_epoch, self.skip_batches = start_epoch, skip_batches
        self.epoch = start_epoch - 1  # each pass starts by counting one up, in the worker that runs it
        self.errors: list[Skipped] = []

    def _shard_error(self, err: Exception) -> bool:
        """webdataset's handler: note the broken shard and go on with the next one."""
        self.errors.append(Skipped("truncated_shard", f"unreadable WebDataset data: {err}"))
        return _warn_and_continue(err)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        self.epoch += 1
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        shards = list(self.urls)
        random.Random(f"{self.seed}-{self.epoch}").shuffle(shards)  # alike on every process
        mine = shards[self.rank :: self.world_size][worker::workers]
        stream = f"{self.seed}-{self.epoch}-{self.rank}-{worker}"
        import webdataset as wds  # imported here: only a shard stream needs it

        samples = wds.tariterators.tarfile_samples(({"url": url} for url in mine), handler=self._shard_error)
        samples = wds.filters._shuffle(samples, self.shuffle_buffer, initial=self.shuffle_buffer,
                                       rng=random.Random(stream))
        first = self.skip_batches * self.batch_size if self.epoch == self.start_epoch else 0
        numbered = itertools.islice(enumerate(samples), first, None)
        while True:
            chunk = list(itertools.islice(numbered, self.batch_size))
            if len(chunk) < self.batch_size:  # whole batches only
                return
            batch = self.collate([self._decode(sample, random.Random(f"{stream}-{n}")) for n, sample in chunk])
            batch["bad"] += self.errors
            self.errors = []
            batch["stream"] = (self.epoch, worker)
            yield batch

    def _decode(self, sample: dict, rng: random.Random) -> dict[str, Any]:
        try:
            image, caption = decode_webdataset_sample(sample)
        except DataError as err:
            return {"bad": skipped(err)}
        return {"image": self.transform(image, rng), "caption": caption}


class StreamBatches:
    """Endless batches of a `WebDatasetStream` through a DataLoader, an epoch being one pass over the
    shards or `samples_per_epoch` samples. `position()` says how far the current epoch got: each
    worker's batches consumed so far, in the DataLoader's strict round-robin order.

    Resuming at a position: every worker skips (undecoded) the batches of the rounds all workers had
    completed, and the few batches consumed beyond those are drawn and dropped here, so the stream
    continues exactly as the stopped run's would have.
    """

    def __init__(self, stream: WebDatasetStream, num_workers: int, samples_per_epoch: int | None,
                 position: dict[str, Any] | None = None):
        self.samples_per_epoch = samples_per_epoch
        workers = max(num_workers, 1)
        consumed = list((position or {}).get("consumed", [0] * workers))
        if position is not None and len(consumed) != workers:
            log.warning("the WebDataset stream restarts epoch %d from its start: the checkpoint was written "
                        "with %d loader workers per process, this run has %d", position["epoch"], len(consumed),
                        workers)
            consumed = [0] * workers
        self.epoch = (position or {}).get("epoch", 0)
        rounds = min(consumed)
        stream.start_epoch, stream.epoch, stream.skip_batches = self.epoch, self.epoch - 1, rounds
        self.loader = DataLoader(stream, batch_size=None, num_workers=num_workers,
                                 persistent_workers=num_workers > 0, pin_memory=torch.cuda.is_available(),
                                 generator=loader_generator())
        self.batch_size = stream.batch_size
        self.consumed = consumed
        self.iterator = self._batches(drop=sum(consumed) - rounds * workers)

    def position(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "consumed": list(self.consumed)}

    def __iter__(self) -> StreamBatches:
        return self

    def __next__(self) -> dict[str, Any]:
        return next(self.iterator)

    def close(self) -> None:
        """Stop the loader's workers now. The batch generator refers back to this object, so without it
        they would live on until Python's cycle collector, which cannot signal them (10 s of join time-outs
        for 2 workers)."""
        self.iterator.close()
        self.loader = None

    def _batches(self, drop: int) -> Iterator[dict[str, Any]]:
        resumed = sum(self.consumed) > 0
        while True:
            seen = sum(self.consumed) * self.batch_size  # a resumed epoch counts what it had consumed
            produced = 0
            for batch in self.loader:
                epoch, worker = batch.pop("stream")
                if epoch != self.epoch:
                    self.epoch, self.consumed, seen = epoch, [0] * len(self.consumed), 0
                self.consumed[worker] += 1
                produced += 1
                if drop:
                    drop -= 1
                    continue
                yield batch
                seen += self.batch_size
                if self.samples_per_epoch and seen >= self.samples_per_epoch:
                    break
            if not produced and not resumed:
                raise DataError("the WebDataset shards yielded no complete batch")
            resumed = False


def train_batches(
    cfg: DataConfig,
    transform: ImageTransform,
    tokenizer: Tokenizer,
    *,
    batch_size: int,
    seed: int,
    start_step: int = 0,
    rank: int = 0,
    world_size: int = 1,
    bad: BadSamples | None = None,
    position: dict[str, Any] | None = None,
) -> GoodBatches:
    """Endless training batches from `cfg.train`; bad samples are dropped and counted in `bad`.
    `position` is where a WebDataset stream stopped (`GoodBatches.position()` of the stopped run)."""
    check_training_data(cfg)
    bad = bad or bad_samples(cfg)
    collate = Collate(tokenizer)
    if detect_format(cfg.train) == "webdataset":
        stream = WebDatasetStream(expand_shards(cfg.train), transform, collate, batch_size=batch_size,
                                  shuffle_buffer=cfg.shuffle_buffer, seed=seed, rank=rank, world_size=world_size)
        if len(stream.urls) < world_size * max(cfg.num_workers, 1):
            log.warning("%d shards for %d processes x %d workers: some get no data", len(stream.urls), world_size,
                        max(cfg.num_workers, 1))
        return GoodBatches(StreamBatches(stream, cfg.num_workers, cfg.samples_per_epoch, position), bad)
    items = read_captions(cfg.train, images_dir=cfg.images, image_key=cfg.image_key,
                          caption_key=cfg.caption_key, bad=bad)
    return map_style_batches(PairDataset(flatten_pairs(items), transform, seed), collate, cfg, batch_size=batch_size,
                             seed=seed, start_step=start_step, rank=rank, world_size=world_size, bad=bad)


def bad_samples(cfg: DataConfig) -> BadSamples:
    """A counter of skipped samples with the data config's limits."""
    return BadSamples(max_fraction=cfg.max_bad_fraction, min_samples=cfg.bad_fraction_min_samples)


def check_training_data(cfg: DataConfig) -> None:
    """Refuse, before any work, training data that is not given or not there."""
    if not cfg.train:
        raise DataError("no training data: pass --data or set data.train")
    if detect_format(cfg.train) == "webdataset":
        expand_shards(cfg.train)
    elif not Path(cfg.train).is_file():
        raise DataError(f"training data not found: {cfg.train}")


def loader_generator() -> torch.Generator:
    """The generator a DataLoader draws its workers' seeds from: its own, so that starting the loader takes
    nothing from the global random state, which a resumed run restores to continue exactly (every sample's
    randomness is seeded by run seed, epoch and index already)."""
    return torch.Generator().manual_seed(0)


def map_style_batches(dataset: Dataset, collate: Any, cfg: DataConfig, *, batch_size: int, seed: int,
                      start_step: int = 0, rank: int = 0, world_size: int = 1,
                      bad: BadSamples | None = None, sampler: Any = None) -> GoodBatches:
    """Endless batches of a map-style dataset indexed by (index, epoch), in the resumable seeded order (or
    a task's own resumable `sampler` of such batches), with skipped samples counted in `bad`: every task that
    reads a file of samples loads through this."""
    if sampler is None:
        sampler = EpochBatchSampler(len(dataset), batch_size, seed=seed, rank=rank, world_size=world_size,
                                    start_step=start_step)
    loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=collate, num_workers=cfg.num_workers,
                        persistent_workers=cfg.num_workers > 0, prefetch_factor=4 if cfg.num_workers > 0 else None,
                        pin_memory=torch.cuda.is_available(), generator=loader_generator())
    return GoodBatches(iter(loader), bad or bad_samples(cfg))


class GoodBatches:
    """The batches of a source with their skipped samples counted in `bad` (which stops the run past the
    allowed share) and batches left empty dropped. `position()` is the source's, for sources that stream."""

    def __init__(self, batches: Iterator[dict[str, Any]], bad: BadSamples):
        self.batches, self.bad = batches, bad

    def __iter__(self) -> GoodBatches:
        return self

    def __next__(self) -> dict[str, Any]:
        while True:
            batch = next(self.batches)
            self.bad.update(batch["size"], batch.pop("bad"))
            if batch["size"]:
                return batch

    def position(self) -> dict[str, Any] | None:
        return self.batches.position() if isinstance(self.batches, StreamBatches) else None

    def close(self) -> None:
        """Stop the source's loader workers (a WebDataset stream's; a map-style loader's stop when dropped)."""
        if isinstance(self.batches, StreamBatches):
            self.batches.close()


def _warn_and_continue(err: Exception) -> bool:
    log.warning("skipped unreadable WebDataset data: %s", err)
    return True


def training_captions(cfg: DataConfig, limit: int = 200_000) -> Iterator[str]:
    """Captions of the training data, for training a tokenizer."""
    if detect_format(cfg.train) == "webdataset":
        import webdataset as wds

        dataset = wds.WebDataset(expand_shards(cfg.train), handler=_warn_and_continue, shardshuffle=False,
                                 empty_check=False)
        count = 0
        for sample in dataset:
            text = sample.get("txt")
            if text:
                yield text.decode("utf-8", errors="replace")
                count += 1
                if count >= limit:
                    return
        return
    items = read_captions(cfg.train, images_dir=cfg.images, image_key=cfg.image_key, caption_key=cfg.caption_key)
    yield from (caption for _, caption in flatten_pairs(items)[:limit])


@dataclass(frozen=True)
class TrainingData:
    """A kind of training data, as a task reads it and a family's recipe trains on it: `batches(data config,
    transform, tokenizer, batch_size=, seed=, start_step=, rank=, world_size=, bad=, position=, and
    <name>_tokenizer= for each further tokenizer) -> GoodBatches`, the texts a new tokenizer is trained on,
    and its data section's config (DataConfig, or a subclass with the kind's own settings)."""

    batches: Callable[..., GoodBatches]
    texts: Callable[[Any], Iterator[str]]
    config: type[DataConfig] = DataConfig


# Image-text pairs: CSV, COCO captions JSON or WebDataset shards.
IMAGE_TEXT_PAIRS = TrainingData(train_batches, training_captions)

