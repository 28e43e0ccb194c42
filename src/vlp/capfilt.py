"""CapFilt (BLIP §3.3): bootstrap a cleaner dataset from noisy web image-text pairs.

1. From one pre-trained BLIP, fine-tune a captioner (LM loss) and, separately, a filter (ITC + ITM) on
   the human-annotated pairs.
2. Caption every web image once with nucleus sampling.
3. Keep a web or synthetic caption only when the filter's ITM head says it matches (p(match) >= 0.5).
4. Write human + kept web + kept synthetic pairs in the web data's format, each with its provenance
   and ITM score, and a summary of what was kept.
5. Optionally pre-train a new model on the result (a new model, not the old one continued).

Every step is resumable: finished fine-tunes are skipped and killed ones resume from their last
checkpoint; web images are scored in chunks written atomically, and a re-run scores only the chunks
that are missing. Under torchrun the fine-tunes train data-parallel and the chunks are split across
processes.
"""

from __future__ import annotations

import csv
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from vlp.assets import Assets
from vlp.checkpoint import ARCH_FILE, STATE_FILE, list_checkpoints, resolve_checkpoint
from vlp.config import ConfigError, Fraction, NonNegativeFloat, NonNegativeInt, PositiveFloat, PositiveInt, to_dict
from vlp.data.sources import DataError, detect_format, read_captions
from vlp.distributed import barrier, process_group, rank, world_size
from vlp.generation import GenerationConfig
from vlp.outputs import write_text
from vlp.precision import Precision

log = logging.getLogger("vlp.capfilt")

Source = Literal["human", "web", "synthetic"]


@dataclass
class CapFiltConfig:
    # Fine-tuning of the captioner and of the filter (each), on the human-annotated pairs.
    steps: PositiveInt = 1000
    batch_size: PositiveInt = 64
    lr: NonNegativeFloat = 1e-5  # BLIP's caption and retrieval fine-tuning rate
    warmup_steps: NonNegativeInt = 100
    weight_decay: NonNegativeFloat = 0.05
    precision: Precision = "auto"
    save_every: PositiveInt = 500
    num_workers: NonNegativeInt = 2
    # Captioning: nucleus sampling as the paper found best, one caption per web image.
    top_p: Fraction = 0.9
    max_new_tokens: PositiveInt = 30
    min_new_tokens: NonNegativeInt = 5
    repetition_penalty: PositiveFloat = 1.0
    # Filtering: keep a caption when the ITM head's p(match) reaches this (0.5 = its argmax says "match").
    threshold: Fraction = 0.5
    # The filter's ITM negatives: BLIP's hard ones (drawn by ITC similarity), or uniform ones (its ablation).
    hard_negatives: bool = True
    chunk_size: PositiveInt = 256  # web images per resumable unit of work
    batch_size_inference: PositiveInt = 64
    seed: NonNegativeInt = 0
    # Step 5: a run config to pre-train a new model on the bootstrapped data, with overrides.
    pretrain_config: str | None = None
    pretrain_overrides: list[str] = field(default_factory=list)
    images_human: str | None = None  # folders relative image paths resolve against
    images_web: str | None = None


def _finished(run: Path, steps: int) -> Path | None:
    found = list_checkpoints(run)
    if found and json.loads((found[-1] / STATE_FILE).read_text())["step"] >= steps:
        return found[-1]
    return None


def finetune(role: Literal["captioner", "filter"], model: Path, human: str, out: Path, cfg: CapFiltConfig) -> Path:
    """Fine-tune the pre-trained BLIP at `model` on the human pairs as captioner (LM) or filter (ITC + ITM);
    a finished run is reused, a killed one resumed."""
    from vlp.train.config import load_run_config
    from vlp.train.loop import train

    done = _finished(out, cfg.steps)
    if done is not None:
        log.info("%s: already fine-tuned (%s), skipped", role, done)
        return done
    folder = resolve_checkpoint(model)
    if role == "captioner":
        objective = {"itc_weight": 0.0, "itm_weight": 0.0}
    else:
        objective = {"lm_weight": 0.0, "hard_negatives": cfg.hard_negatives}
    run = {
        "model": json.loads((folder / ARCH_FILE).read_text()),
        "objective": objective,
        "image": to_dict(Assets.load(folder).image_config(where=folder)),
        "data": {"train": human, "images": cfg.images_human, "num_workers": cfg.num_workers},
        "train": {
            "steps": cfg.steps, "batch_size": cfg.batch_size, "lr": cfg.lr, "warmup_steps": cfg.warmup_steps,
            "weight_decay": cfg.weight_decay, "precision": cfg.precision, "save_every": cfg.save_every,
            "init_from": str(folder), "seed": cfg.seed, "progress": False,
        },
    }  # fmt: skip
    if run["model"].get("family") != "blip":
        raise ConfigError(f"CapFilt starts from a BLIP checkpoint; {folder} holds a '{run['model'].get('family')}'")
    path = out / "run_request.json"
    if rank() == 0:
        out.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(run, indent=1))
    barrier()
    log.info("%s: fine-tuning %s for %d steps on %s", role, folder, cfg.steps, human)
    return train(load_run_config(path), out, resume="latest")


def _chunk_file(folder: Path, index: int) -> Path:
    return folder / f"chunk-{index:06d}.jsonl"


def score_web(
    captioner: Path, filter_model: Path, web: Sequence[tuple[Path, str]], folder: Path, cfg: CapFiltConfig
) -> None:
    """Caption every web image and score web and synthetic captions with the filter, chunk by chunk;
    chunks already written are skipped, the rest are split across processes."""
    from vlp.convert import load_pretrained
    from vlp.tasks import predict_functions

    folder.mkdir(parents=True, exist_ok=True)
    images = list(dict.fromkeys(path for path, _ in web))
    captions: dict[Path, list[str]] = {}
    for path, caption in web:
        captions.setdefault(path, []).append(caption)
    chunks = range(0, len(images), cfg.chunk_size)
    todo = [
        (i, start)
        for i, start in enumerate(chunks)
        if i % world_size() == rank() and not _chunk_file(folder, i).is_file()
    ]
    log.info("web scoring: %d of %d chunks to do on this process", len(todo), len(chunks))
    if not todo:
        return
    batch_size = cfg.batch_size_inference
    match = predict_functions(load_pretrained(filter_model), batch_size=batch_size).require("match_probabilities")
    caption = predict_functions(load_pretrained(captioner), batch_size=batch_size).require("caption")
    for index, start in todo:
        chunk = images[start : start + cfg.chunk_size]
        generation = GenerationConfig(
            method="nucleus", top_p=cfg.top_p, max_new_tokens=cfg.max_new_tokens,
            min_new_tokens=cfg.min_new_tokens, repetition_penalty=cfg.repetition_penalty,
            seed=cfg.seed + index,  # the same captions whichever process, and however often, it runs
        )  # fmt: skip
        synthetic = caption(chunk, generation=generation)
        pairs = [(path, c, "web") for path in chunk for c in captions[path]]
        pairs += [(path, c, "synthetic") for path, c in zip(chunk, synthetic, strict=True)]
        scores = match([p for p, _, _ in pairs], [c for _, c, _ in pairs]).tolist()
        records = [
            {"image": str(path), "caption": caption, "source": source, "itm_score": round(score, 6)}
            for (path, caption, source), score in zip(pairs, scores, strict=True)
        ]
        target = _chunk_file(folder, index)
        partial = target.with_suffix(".partial")
        partial.write_text("".join(json.dumps(r) + "\n" for r in records))
        os.replace(partial, target)  # a killed run never leaves a half-written chunk
        log.info("web scoring: chunk %d written (%d images)", index, len(chunk))


def _write_dataset(out: Path, kind: str, records: list[dict[str, Any]]) -> Path:
    """The bootstrapped pairs in the web data's format, with provenance and ITM score per caption."""
    if kind == "csv":
        path = out / "bootstrapped.csv"
        with path.open("w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["filepath", "title", "source", "itm_score"])
            for r in records:
                writer.writerow(
                    [r["image"], r["caption"], r["source"], "" if r["itm_score"] is None else r["itm_score"]]
                )
        return path
    path = out / "bootstrapped.json"
    ids = {image: i + 1 for i, image in enumerate(dict.fromkeys(r["image"] for r in records))}
    data = {
        "info": {"description": "CapFilt-bootstrapped pairs (vlp capfilt)"},
        "images": [{"id": i, "file_name": image} for image, i in ids.items()],
        "annotations": [
            {"id": n + 1, "image_id": ids[r["image"]], "caption": r["caption"], "source": r["source"],
             "itm_score": r["itm_score"]}
            for n, r in enumerate(records)
        ],
    }  # fmt: skip
    path.write_text(json.dumps(data))
    return path


def filter_quality(web_records: list[dict[str, Any]], truth_file: str | Path) -> dict[str, float]:
    """Precision and recall of the filter at flagging noisy web captions, against a truth file (a JSON
    list of {file_name, caption, noisy}, file names relative to the truth file, as the shapes world writes)."""
    truth_file = Path(truth_file)
    try:
        truth = {
            (str((truth_file.parent / t["file_name"]).resolve()), t["caption"]): bool(t["noisy"])
            for t in json.loads(truth_file.read_text())
        }
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as err:
        raise DataError(f"{truth_file} is not a truth file (list of file_name, caption, noisy): {err}") from err
    flagged_noisy = flagged = noisy = 0
    for r in web_records:
        key = (str(Path(r["image"]).resolve()), r["caption"])
        if key not in truth:
            raise DataError(f"{truth_file} has no entry for web pair {key}")
        is_flagged, is_noisy = not r["kept"], truth[key]
        flagged += is_flagged
        noisy += is_noisy
        flagged_noisy += is_flagged and is_noisy
    return {
        "precision": flagged_noisy / flagged if flagged else 0.0,
        "recall": flagged_noisy / noisy if noisy else 0.0,
        "flagged": flagged,
        "noisy": noisy,
    }


def assemble(
    out: Path, human: str, web_spec: str, scored: Path, cfg: CapFiltConfig, truth: str | Path | None = None
) -> dict[str, Any]:
    """Human pairs + kept web + kept synthetic, written in the web data's format; returns the summary."""
    human_pairs = [(item.path, c) for item in read_captions(human, images_dir=cfg.images_human) for c in item.captions]
    scored_records = [
        json.loads(line) for path in sorted(scored.glob("chunk-*.jsonl")) for line in path.read_text().splitlines()
    ]
    for r in scored_records:
        r["kept"] = r["itm_score"] >= cfg.threshold
    records = [{"image": str(p), "caption": c, "source": "human", "itm_score": None} for p, c in human_pairs]
    records += [{k: r[k] for k in ("image", "caption", "source", "itm_score")} for r in scored_records if r["kept"]]
    dataset = _write_dataset(out, detect_format(web_spec), records)
    summary: dict[str, Any] = {"dataset": str(dataset), "threshold": cfg.threshold, "human": len(human_pairs)}
    for source in ("web", "synthetic"):
        group = [r for r in scored_records if r["source"] == source]
        kept = sum(r["kept"] for r in group)
        summary[source] = {"total": len(group), "kept": kept, "removed_share": 1 - kept / max(1, len(group))}
    summary["pairs"] = len(records)
    if truth is not None:
        summary["filter_quality"] = filter_quality([r for r in scored_records if r["source"] == "web"], truth)
    write_text(out / "summary.json", json.dumps(summary, indent=1))
    return summary


def run_capfilt(
    model: str | Path, human: str, web: str, out: str | Path, cfg: CapFiltConfig, *, truth: str | None = None
) -> dict[str, Any]:
    """All CapFilt steps, resumable; under torchrun every process runs this and rank 0 writes the data."""
    out = Path(out)
    for spec, name in ((human, "--human"), (web, "--web")):
        if detect_format(spec) == "webdataset":
            raise DataError(
                f"{name} {spec}: CapFilt reads CSV or COCO captions JSON; WebDataset input is not supported"
            )
    web_pairs = [(item.path, c) for item in read_captions(web, images_dir=cfg.images_web) for c in item.captions]
    with process_group():
        return _run(Path(model), human, web, web_pairs, out, cfg, truth)


def _run(
    model: Path,
    human: str,
    web: str,
    web_pairs: list[tuple[Path, str]],
    out: Path,
    cfg: CapFiltConfig,
    truth: str | None,
) -> dict[str, Any]:
    captioner = finetune("captioner", model, human, out / "captioner", cfg)
    barrier()  # rank 0 writes the checkpoints the others read next
    filter_model = finetune("filter", model, human, out / "filter", cfg)
    barrier()
    score_web(captioner, filter_model, web_pairs, out / "scored", cfg)
    barrier()
    summary = None
    if rank() == 0:
        summary = assemble(out, human, web, out / "scored", cfg, truth)
        log.info("CapFilt: %s", json.dumps({k: summary[k] for k in ("human", "web", "synthetic", "pairs")}))
    barrier()
    if summary is None:
        summary = json.loads((out / "summary.json").read_text())
    if cfg.pretrain_config:
        from vlp.train.config import load_run_config
        from vlp.train.loop import train

        overrides = [f"data.train={summary['dataset']}", *cfg.pretrain_overrides]
        run_cfg = load_run_config(cfg.pretrain_config, overrides)
        if _finished(out / "pretrained", run_cfg.train.steps) is None:
            train(run_cfg, out / "pretrained", resume="latest")
        summary["pretrained"] = str(out / "pretrained")
    return summary
