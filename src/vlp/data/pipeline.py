"""One training pipeline for every source: images decoded and augmented in worker processes,
captions tokenised per batch, bad samples skipped and counted.

Map-style sources (CSV, COCO) are read in a seeded order that depends only on (seed, epoch), and
each sample's augmentation only on (seed, epoch, index), so a resumed run sees the same batches.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import braceexpand
import torch
import webdataset as wds
from torch.utils.data import DataLoader, Dataset

from vlp.data.sources import (
    BadSamples, DataError, ImageCaptions, decode_webdataset_sample, detect_format, load_image, read_captions,
)
from vlp.data.tokenizer import Tokenizer
from vlp.data.transforms import ImageTransform

log = logging.getLogger("vlp.data")


@dataclass
class DataConfig:
    train: str | None = None  # CSV, COCO captions JSON, or WebDataset shards ("a-{000..009}.tar::b.tar")
    images: str | None = None  # folder that relative image paths resolve against
    image_key: str = "filepath"  # CSV column of the image path
    caption_key: str = "title"  # CSV column of the caption
    num_workers: int = 2
    max_bad_fraction: float = 0.05
    shuffle_buffer: int = 1000  # WebDataset sample shuffle
    samples_per_epoch: int | None = None  # WebDataset epoch length; None = one pass over the shards
    # VQA (family blip_vqa): `train` is a VQAv2 questions file, `annotations` its answers file; image
    # paths are `images` / image_pattern with {image_id} and {data_subtype}; None = VQAv2's COCO names.
    annotations: str | None = None
    image_pattern: str | None = None


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
            return {"bad": str(err)}
        rng = random.Random(f"{self.seed}-{epoch}-{index}")
        return {"image": self.transform(image, rng), "caption": caption}


class Collate:
    """Stack images, tokenise captions as one batch, pass bad-sample reasons through."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, Any]:
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


def _log_and_continue(err: Exception) -> bool:
    log.warning("skipped unreadable WebDataset data: %s", err)
    return True


class _DecodeSample:
    def __init__(self, transform: ImageTransform, seed: int):
        self.transform = transform
        self.rng = random.Random(seed)

    def __call__(self, sample: dict) -> dict[str, Any]:
        try:
            image, caption = decode_webdataset_sample(sample)
        except DataError as err:
            return {"bad": str(err)}
        return {"image": self.transform(image, self.rng), "caption": caption}


def expand_shards(spec: str) -> list[str]:
    """'a-{000..009}.tar::b.tar' -> the list of shard paths, each checked to exist."""
    urls = [url for part in spec.split("::") for url in braceexpand.braceexpand(part)]
    missing = [u for u in urls if "://" not in u and not u.startswith("pipe:") and not Path(u).exists()]
    if missing:
        raise DataError(f"WebDataset shard not found: {missing[0]} ({len(missing)} of {len(urls)} missing)")
    return urls


def _webdataset_loader(spec: str, transform: ImageTransform, collate: Collate, batch_size: int,
                       cfg: DataConfig, seed: int) -> DataLoader:
    urls = expand_shards(spec)
    workers = max(cfg.num_workers, 1)
    if len(urls) < workers:
        log.warning("%d shards for %d workers: some workers get no data", len(urls), workers)
    dataset = (
        wds.WebDataset(urls, handler=_log_and_continue, shardshuffle=len(urls), seed=seed,
                       nodesplitter=wds.split_by_node, workersplitter=wds.split_by_worker, empty_check=False)
        .shuffle(cfg.shuffle_buffer)
        .map(_DecodeSample(transform, seed))
        .batched(batch_size, collation_fn=collate, partial=False)
    )
    return DataLoader(dataset, batch_size=None, num_workers=cfg.num_workers,
                      persistent_workers=cfg.num_workers > 0, pin_memory=torch.cuda.is_available())


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
) -> Iterator[dict[str, Any]]:
    """Endless training batches from `cfg.train`; bad samples are dropped and counted in `BadSamples`."""
    if not cfg.train:
        raise DataError("no training data: pass --data or set data.train")
    bad = BadSamples(max_fraction=cfg.max_bad_fraction)
    collate = Collate(tokenizer)
    if detect_format(cfg.train) == "webdataset":
        loader = _webdataset_loader(cfg.train, transform, collate, batch_size, cfg, seed)
        batches = _repeat(loader, cfg.samples_per_epoch, batch_size)
    else:
        items = read_captions(cfg.train, images_dir=cfg.images, image_key=cfg.image_key,
                              caption_key=cfg.caption_key, bad=bad)
        batches = map_style_batches(PairDataset(flatten_pairs(items), transform, seed), collate, cfg,
                                    batch_size=batch_size, seed=seed, start_step=start_step, rank=rank,
                                    world_size=world_size)
    yield from counted_good_batches(batches, bad)


def map_style_batches(dataset: Dataset, collate: Any, cfg: DataConfig, *, batch_size: int, seed: int,
                      start_step: int, rank: int, world_size: int) -> Iterator[dict[str, Any]]:
    """Endless batches of a map-style dataset indexed by (index, epoch), in the resumable seeded order."""
    sampler = EpochBatchSampler(len(dataset), batch_size, seed=seed, rank=rank, world_size=world_size,
                                start_step=start_step)
    return iter(DataLoader(dataset, batch_sampler=sampler, collate_fn=collate, num_workers=cfg.num_workers,
                           persistent_workers=cfg.num_workers > 0,
                           prefetch_factor=4 if cfg.num_workers > 0 else None,
                           pin_memory=torch.cuda.is_available()))


def counted_good_batches(batches: Iterator[dict[str, Any]], bad: BadSamples) -> Iterator[dict[str, Any]]:
    """Batches with their `bad` reasons counted (stopping past the allowed share) and empty ones dropped."""
    for batch in batches:
        bad.update(batch["size"], batch.pop("bad"))
        if batch["size"]:
            yield batch


def _repeat(loader: DataLoader, samples_per_epoch: int | None, batch_size: int) -> Iterator[dict[str, Any]]:
    while True:
        seen = 0
        for batch in loader:
            yield batch
            seen += batch_size
            if samples_per_epoch and seen >= samples_per_epoch:
                break
        if seen == 0:
            raise DataError("the WebDataset shards yielded no complete batch")


def training_captions(cfg: DataConfig, limit: int = 200_000) -> Iterator[str]:
    """Captions of the training data, for training a tokenizer."""
    if detect_format(cfg.train) == "webdataset":
        dataset = wds.WebDataset(expand_shards(cfg.train), handler=_log_and_continue, shardshuffle=False,
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
