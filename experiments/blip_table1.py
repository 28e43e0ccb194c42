"""BLIP's Table 1 on the shapes world: pre-training on noisy web pairs vs on CapFilt-bootstrapped pairs.

The shapes world stands in for the paper's data: 1,000 train images with 3 clean captions each are the
human-annotated pairs (COCO), the 3,000-image web split with 40% of its captions replaced by junk
alt-text or another image's caption is the web data. Every row pre-trains a new tiny BLIP from scratch
for the same number of steps on:

  web      human + web                      (no CapFilt)
  C        human + web + synthetic          (captioner only: every caption kept)
  F        human + filtered web             (filter only)
  C+F      human + filtered web + filtered synthetic
  web, random negatives: the first row with ITM negatives drawn uniformly instead of by similarity

The captioner and filter are fine-tuned by `vlp capfilt` from the first row's model. Each model is
scored on the test split: zero-shot retrieval R@1 both ways and greedy-captioning CIDEr. The filter's
precision and recall at flagging the noisy web captions come from `web_truth.json`. Each seed re-runs every
row (pre-training init and data order, both fine-tunes, nucleus sampling) on the same world; the table
gives each cell's mean and range over seeds. Runs on disk are reused, a killed one resumed.

    .venv/bin/python experiments/blip_table1.py --out runs/blip-table1 --seeds 0 1 2
        (~25 min per seed on 2 CPU cores; --filter-negatives hard trains the filter as BLIP does)
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import logging
import re
from pathlib import Path

from vlp.capfilt import CapFiltConfig, run_capfilt
from vlp.config import ConfigError, from_dict
from vlp.convert import load_pretrained
from vlp.generation import GenerationConfig
from vlp.report import mean_range
from vlp.shapes import ShapesWorldConfig, make_shapes_world
from vlp.tasks import GivenFunctions, predict_functions
from vlp.tasks.captioning import CaptioningEvalConfig, CaptionPredictor, evaluate_captioning
from vlp.tasks.retrieval import RetrievalEvalConfig, evaluate_retrieval
from vlp.train.config import load_run_config
from vlp.train.loop import train

log = logging.getLogger("blip_table1")


def model_overrides(image_size: int) -> list[str]:
    return [
        "model.family=blip",
        "model.embed_dim=64",
        f"model.vision={{kind: convnet, image_size: {image_size}, channels: [16, 32, 64, 64]}}",
        f"image.size={image_size}",
        *TEXT_AND_TRAINING,
    ]


TEXT_AND_TRAINING = [
    (
        "model.text={vocab_size: 512, context_length: 24, width: 64, layers: 2, heads: 2, pad_token_id: 0, "
        "eos_token_id: 3, enc_token_id: 4, dec_token_id: 5}"
    ),
    "tokenizer.kind=wordpiece",
    "tokenizer.vocab_size=512",
    "tokenizer.context_length=24",
    "tokenizer.pad_token='[PAD]'",
    "tokenizer.unk_token='[UNK]'",
    "tokenizer.bos_token='[CLS]'",
    "tokenizer.eos_token='[SEP]'",
    "tokenizer.extra_tokens=['[ENC]', '[DEC]']",
    "data.num_workers=2",
    "train.batch_size=64",
    "train.lr=2e-3",
    "train.warmup_steps=50",
    "train.weight_decay=0.05",
    "train.log_every=50",
    "train.progress=false",
    "train.precision=fp32",
]


def _write_csv(path: Path, rows: list[tuple[str, str]]) -> str:
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["filepath", "title"])
        writer.writerows(rows)
    return str(path)


def _pairs(path: Path) -> list[tuple[str, str]]:
    with path.open() as f:
        return [(str((path.parent / r["filepath"]).resolve()), r["title"]) for r in csv.DictReader(f)]


def synthetic_accuracy(records: list[dict], world: Path, threshold: float) -> dict[str, dict[str, float]]:
    """How many synthetic captions are true of their image: every '[size] colour shape' a caption names is
    an object of the scene (instances_web.json); one that names none is 'vague'. For all synthetic
    captions, those the filter kept and those it removed."""
    manifest = json.loads((world / "manifest.json").read_text())
    mention = re.compile(rf"(?:(small|large) )?({'|'.join(manifest['colors'])}) ({'|'.join(manifest['shapes'])})")
    instances = json.loads((world / "instances_web.json").read_text())
    paths = {im["id"]: str((world / im["file_name"]).resolve()) for im in instances["images"]}
    objects: dict[str, list[tuple[str, str, str]]] = {}
    for a in instances["annotations"]:
        objects.setdefault(paths[a["image_id"]], []).append((a["size"], a["color"], a["name"].split()[-1]))

    def verdict(caption: str, image: str) -> str:
        named = mention.findall(caption)
        if not named:
            return "vague"
        present = objects.get(str(Path(image).resolve()), [])
        true = all(
            any(c == color and s == shape and size in ("", z) for z, c, s in present) for size, color, shape in named
        )
        return "true" if true else "false"

    synthetic = [r for r in records if r["source"] == "synthetic"]
    groups = {
        "all": synthetic,
        "kept": [r for r in synthetic if r["itm_score"] >= threshold],
        "removed": [r for r in synthetic if r["itm_score"] < threshold],
    }
    result = {}
    for name, group in groups.items():
        verdicts = [verdict(r["caption"], r["image"]) for r in group]
        result[name] = {k: verdicts.count(k) / max(len(verdicts), 1) for k in ("true", "false", "vague")}
    return result


def _score(run: Path, world: Path) -> dict[str, float]:
    test = world / "captions_test.json"
    retrieval = evaluate_retrieval(predict_functions(load_pretrained(run)), RetrievalEvalConfig(str(test))).metrics
    greedy = GenerationConfig(method="greedy", max_new_tokens=20, min_new_tokens=2)
    captioning = evaluate_captioning(
        GivenFunctions(caption=CaptionPredictor.from_checkpoint(run, generation=greedy).caption),
        CaptioningEvalConfig(str(test), meteor=False),
    ).metrics
    return {
        "text_to_image_r1": retrieval["image_retrieval_recall@1"],
        "image_to_text_r1": retrieval["text_retrieval_recall@1"],
        "bleu4": captioning["bleu4"],
        "cider": captioning["cider"],
    }


ROWS = ("web", "web, random ITM negatives", "C", "F", "C+F")


def run_seed(out: Path, world: Path, seed: int, capfilt: CapFiltConfig, args: argparse.Namespace) -> dict[str, object]:
    """Every row of the table for one seed (pre-training init and data order, the fine-tunes, nucleus
    sampling); the world is the same for every seed. Runs already on disk are reused."""
    out.mkdir(parents=True, exist_ok=True)
    human = _pairs(world / "train.csv")
    web = _pairs(world / "web.csv")
    human_csv = _write_csv(out / "human.csv", human)

    def pretrain(name: str, rows: list[tuple[str, str]], *extra: str) -> Path:
        data = _write_csv(out / f"{name}.csv", rows)
        overrides = [
            *model_overrides(args.image_size),
            f"data.train={data}",
            f"train.steps={args.steps}",
            f"train.seed={seed}",
            *extra,
        ]
        run = out / "runs" / name
        train(load_run_config(None, overrides), run, resume="latest")  # a finished run is reused, a killed one goes on
        return run

    runs: dict[str, Path] = {"web": pretrain("web", human + web)}
    if "web, random ITM negatives" in args.rows:
        runs["web, random ITM negatives"] = pretrain("web_random", human + web, "objective.hard_negatives=false")
    capfilt = dataclasses.replace(capfilt, seed=seed)
    summary = run_capfilt(runs["web"], human_csv, str(world / "web.csv"), out / "capfilt", capfilt,
                          truth=str(world / "web_truth.json"))  # fmt: skip
    scored = [
        json.loads(line)
        for path in sorted((out / "capfilt" / "scored").glob("chunk-*.jsonl"))
        for line in path.read_text().splitlines()
    ]
    kept = [(r["image"], r["caption"]) for r in scored if r["itm_score"] >= capfilt.threshold]
    web_kept = [
        (r["image"], r["caption"]) for r in scored if r["source"] == "web" and r["itm_score"] >= capfilt.threshold
    ]
    synthetic = [(r["image"], r["caption"]) for r in scored if r["source"] == "synthetic"]
    if "C" in args.rows:
        runs["C"] = pretrain("captioner_only", human + web + synthetic)
    if "F" in args.rows:
        runs["F"] = pretrain("filter_only", human + web_kept)
    if "C+F" in args.rows:
        runs["C+F"] = pretrain("capfilt", human + kept)
    scores = {}
    for name, run in runs.items():
        if name in args.rows:
            scores[name] = _score(run, world)
            log.info("seed %d, %s: %s", seed, name, scores[name])
    captions = synthetic_accuracy(scored, world, capfilt.threshold)
    log.info("seed %d, synthetic captions true of their image: %s", seed, captions)
    return {
        "capfilt": {k: summary[k] for k in ("web", "synthetic", "filter_quality")},
        "synthetic_true": captions,
        "rows": scores,
    }


def table(per_seed: dict[str, dict]) -> str:
    """Markdown: one row per pre-training data, each cell the mean (min-max) over seeds."""
    seeds = list(per_seed.values())
    lines = ["| pre-training data | T→I R@1 | I→T R@1 | BLEU-4 | CIDEr |", "|---|---|---|---|---|"]
    for name in seeds[0]["rows"]:
        cells = [
            mean_range([s["rows"][name][k] for s in seeds])
            for k in ("text_to_image_r1", "image_to_text_r1", "bleu4", "cider")
        ]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    quality = [s["capfilt"]["filter_quality"] for s in seeds]
    lines.append("")
    lines.append(
        f"filter precision {mean_range([q['precision'] for q in quality])}, recall {mean_range([q['recall'] for q in quality])}, "
        f"synthetic removed {mean_range([s['capfilt']['synthetic']['removed_share'] for s in seeds])}, "
        f"synthetic captions true of their image: kept {mean_range([s['synthetic_true']['kept']['true'] for s in seeds])}, "
        f"removed {mean_range([s['synthetic_true']['removed']['true'] for s in seeds])}"
    )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="runs/blip-table1")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=2000, help="pre-training steps of every row")
    parser.add_argument("--capfilt-steps", type=int, default=300, help="fine-tuning steps of captioner and filter")
    # Uniform: on this world BLIP's similarity-drawn negatives are often true of the text (captions name
    # some of a scene's objects), and a filter this small trained on them flags most captions (docs/results/blip.md).
    parser.add_argument("--filter-negatives", choices=("hard", "uniform"), default="uniform",
                        help="the filter's ITM negatives while it is fine-tuned")  # fmt: skip
    parser.add_argument("--threshold", type=float, default=0.5, help="the filter's p(match) to keep a caption")
    parser.add_argument("--image-size", type=int, default=32, help="pixels the tiny BLIPs see")
    parser.add_argument("--rows", nargs="+", choices=ROWS, default=list(ROWS))
    parser.add_argument("--web-vague", type=float, default=0.0,
                        help="share of web captions cut to true but vague alt-text (a world of its own: use "
                             "another --out)")  # fmt: skip
    parser.add_argument("--results", type=Path,
                        help="default: experiments/results-blip-table1.json, -vague.json with --web-vague")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    # Checked as the CLI checks it (a threshold outside [0, 1] is refused) before anything is trained.
    try:
        capfilt = from_dict(CapFiltConfig, {
            "steps": args.capfilt_steps, "batch_size": 64, "lr": 3e-4, "warmup_steps": 20, "precision": "fp32",
            "chunk_size": 500, "hard_negatives": args.filter_negatives == "hard", "threshold": args.threshold,
        })  # fmt: skip
        world_cfg = from_dict(ShapesWorldConfig, {
            "seed": 0, "train": 1000, "test": 500, "web": 3000, "classify": 10, "web_vague": args.web_vague,
        })  # fmt: skip
    except ConfigError as err:
        parser.error(str(err))
    out = Path(args.out)
    world = out / "shapes"
    # Every row of every seed is trained on one world: refuse an --out whose world was made otherwise.
    # A world without world.json beside it was made before --web-vague existed, so without vague captions.
    settings_file = out / "world.json"
    wanted = dataclasses.asdict(world_cfg)
    if (world / "manifest.json").is_file():
        made = json.loads(settings_file.read_text()) if settings_file.is_file() else {**wanted, "web_vague": 0.0}
        if made != wanted:
            parser.error(f"{out} holds a world made with other settings ({settings_file}); use another --out")
    else:
        make_shapes_world(world, world_cfg)
    settings_file.write_text(json.dumps(wanted, indent=1))
    per_seed = {f"seed{seed}": run_seed(out / f"seed{seed}", world, seed, capfilt, args) for seed in args.seeds}
    settings = {k: getattr(args, k)
                for k in ("steps", "capfilt_steps", "filter_negatives", "threshold", "image_size", "web_vague")}
    results = args.results or Path(__file__).with_name(
        "results-blip-table1-vague.json" if args.web_vague else "results-blip-table1.json")
    results.write_text(json.dumps({"settings": settings, "seeds": per_seed}, indent=1))
    print(table(per_seed))


if __name__ == "__main__":
    main()
