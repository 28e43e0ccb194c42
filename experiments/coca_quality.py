"""CoCa against the separately trained CLIP and BLIP of the same size, on the shapes world.

Each of `configs/clip-tiny.yaml`, `configs/blip-tiny.yaml` and `configs/coca-tiny.yaml` (the same
image tower, text width, tokenizer size and image size) is trained from scratch for the same steps and
batch, then scored on what its users judge it by: zero-shot classification (shape, and colour + shape),
zero-shot retrieval R@1 on the test split, and greedy-captioning CIDEr on the test split (the two
captioners). Training wall time is recorded too; `make bench` measures step time side by side.
Each seed (`train.seed`: initialisation, data order, augmentation) trains the three anew on the same
world; the table gives each cell's mean and range over seeds. Runs on disk are reused, a killed one
resumed.

    .venv/bin/python experiments/coca_quality.py --out runs/coca-quality --seeds 0 1   (~25 min a seed)
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

from vlp.config import ConfigError
from vlp.convert import load_pretrained
from vlp.generation import GenerationConfig
from vlp.report import mean_range
from vlp.shapes import ShapesWorldConfig, make_shapes_world
from vlp.tasks import GivenFunctions, predict_functions
from vlp.tasks.captioning import CaptioningEvalConfig, CaptionPredictor, evaluate_captioning
from vlp.tasks.retrieval import RetrievalEvalConfig, evaluate_retrieval
from vlp.tasks.zeroshot import ZeroShotEvalConfig, evaluate_zeroshot
from vlp.train.config import load_run_config
from vlp.train.loop import train

log = logging.getLogger("coca_quality")
MODELS = {"clip": "configs/clip-tiny.yaml", "blip": "configs/blip-tiny.yaml", "coca": "configs/coca-tiny.yaml"}
METRICS = {"shape_acc1": "shape acc1 (5)", "color_shape_acc1": "colour+shape acc1 (30)",
           "image_retrieval_recall@1": "T→I R@1", "text_retrieval_recall@1": "I→T R@1", "bleu4": "BLEU-4",
           "cider": "CIDEr"}  # fmt: skip


def evaluate(checkpoint: Path, data: Path, captions: bool) -> dict[str, float]:
    embedder = predict_functions(load_pretrained(checkpoint))
    zeroshot = data / "zeroshot"
    metrics = {}
    for task in ("shape", "color_shape"):
        result = evaluate_zeroshot(embedder, ZeroShotEvalConfig(
            str(zeroshot / f"{task}.csv"), str(zeroshot / f"{task}_classnames.txt"), str(zeroshot / "templates.txt")))
        metrics[f"{task}_acc1"] = result.metrics["acc1"]
    retrieval = evaluate_retrieval(embedder, RetrievalEvalConfig(str(data / "test.csv"))).metrics
    metrics.update({k: v for k, v in retrieval.items() if k.endswith("recall@1")})
    if captions:
        captioner = CaptionPredictor.from_checkpoint(checkpoint, generation=GenerationConfig(method="greedy"))
        scores = evaluate_captioning(GivenFunctions(caption=captioner.caption),
                                     CaptioningEvalConfig(str(data / "captions_test.json"), meteor=False)).metrics
        metrics.update({"bleu4": scores["bleu4"], "cider": scores["cider"]})
    return metrics


def table(per_seed: dict[str, dict]) -> str:
    """Markdown: one row per model, each cell the mean (min-max) over seeds."""
    seeds = list(per_seed.values())
    lines = ["| model | " + " | ".join(METRICS.values()) + " |", "|---|" + "---|" * len(METRICS)]
    for name in MODELS:
        rows = [seed[name] for seed in seeds if name in seed]
        cells = [mean_range([row[key] for row in rows]) if rows and key in rows[0] else "–" for key in METRICS]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/coca-quality")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--results", default="experiments/results-coca-quality.json")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    out = Path(args.out)
    data = out / "shapes"
    if not (data / "train.csv").is_file():
        make_shapes_world(data, ShapesWorldConfig())
    # Every run's config is built (and its ranges checked) before anything trains: a bad --seeds or
    # --steps is one line, not a traceback after the first model's training.
    try:
        configs = {
            (seed, name): load_run_config(config, [
                f"data.train={data / 'train.csv'}",
                f"train.steps={args.steps}",
                f"train.batch_size={args.batch_size}",
                f"train.save_every={args.steps}",
                f"train.seed={seed}",
                "train.progress=false",
            ])
            for seed in args.seeds for name, config in MODELS.items()
        }  # fmt: skip
    except ConfigError as err:
        parser.error(str(err))
    results = {"steps": args.steps, "batch_size": args.batch_size, "seeds": {}}
    for (seed, name), cfg in configs.items():
        per_model = results["seeds"].setdefault(f"seed{seed}", {})
        start = time.perf_counter()
        checkpoint = train(cfg, out / f"seed{seed}" / name, resume="latest")
        # A reused run's time is this call's (near zero), not its training's.
        row = {"config": MODELS[name], "train_seconds": round(time.perf_counter() - start, 1)}
        row.update(evaluate(checkpoint, data, captions=name != "clip"))
        per_model[name] = row
        log.info("seed %d %s: %s", seed, name, row)
        Path(args.results).write_text(json.dumps(results, indent=1) + "\n")
    print(table(results["seeds"]))


if __name__ == "__main__":
    main()
