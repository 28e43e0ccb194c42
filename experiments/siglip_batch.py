"""SigLIP's headline on the shapes world: the sigmoid loss against the softmax one at small batch sizes.

    .venv/bin/vlp data shapes --out data/shapes
    .venv/bin/python experiments/siglip_batch.py --world data/shapes --runs runs/siglip-batch \
        --batch-sizes 16 32 64 128 --seeds 0 1 2

Both arms are `configs/clip-tiny.yaml`'s towers, pooling, tokenizer and schedule; the only differences are
the loss and what it learns besides the towers (CLIP: the log-temperature from log(1/0.07); SigLIP: the
log-temperature from log 10 and the bias, as `configs/siglip-tiny.yaml` sets them). Every run sees the same
number of training pairs (`--examples`), so a smaller batch takes more steps; warm-up is the same share
of the steps. Scored by zero-shot shape accuracy (5 classes) on the test images. A run already on disk is
evaluated again, not retrained. Writes experiments/results-siglip-batch.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VLP = str(Path(sys.executable).with_name("vlp"))
SIGLIP = ["objective.loss=siglip", "model.init_logit_scale=2.302585", "model.init_logit_bias=-10"]
LOSSES = {"clip": [], "siglip": SIGLIP}


def run(loss: str, batch_size: int, seed: int, args: argparse.Namespace) -> dict:
    folder = args.runs / f"{loss}-b{batch_size}-seed{seed}"
    steps = args.examples // batch_size
    if not list((folder / "checkpoints").glob("step_*")):
        command = [VLP, "train", "--config", str(ROOT / "configs" / "clip-tiny.yaml"),
                   "--data", str(args.world / "train.csv"), "--out", str(folder),
                   "--set", f"train.batch_size={batch_size}", "--set", f"train.steps={steps}",
                   "--set", f"train.warmup_steps={steps // 5}", "--set", f"train.save_every={steps}",
                   "--set", f"train.seed={seed}", "--set", "train.progress=false"]
        for override in LOSSES[loss]:
            command += ["--set", override]
        subprocess.run(command, check=True, capture_output=True)
    out = folder / "zeroshot.json"
    zeroshot = args.world / "zeroshot"
    subprocess.run([VLP, "eval", "zeroshot", "--checkpoint", str(folder), "--data", str(zeroshot / "shape.csv"),
                    "--classnames", str(zeroshot / "shape_classnames.txt"),
                    "--templates", str(zeroshot / "templates.txt"), "--out", str(out)],
                   check=True, capture_output=True)
    last = json.loads((folder / "metrics.jsonl").read_text().splitlines()[-1])
    return {"run": str(folder), "steps": steps, "shape_acc1": json.loads(out.read_text())["metrics"]["acc1"],
            "logit_scale": last["logit_scale"], "logit_bias": last.get("logit_bias")}


def table(results: dict, batch_sizes: list[int], seeds: list[int]) -> str:
    """Markdown: batch sizes as columns, one row per loss and seed, then each loss's mean (min-max)."""
    lines = ["| loss | seed | " + " | ".join(f"batch {b}" for b in batch_sizes) + " |",
             "|---|---|" + "---|" * len(batch_sizes)]
    for loss in LOSSES:
        for seed in seeds:
            cells = [results.get(loss, {}).get(f"b{b}-seed{seed}", {}).get("shape_acc1") for b in batch_sizes]
            lines.append(f"| {loss} | {seed} | " + " | ".join("-" if c is None else f"{c:.3f}" for c in cells) + " |")
        summary = []
        for b in batch_sizes:
            values = [r["shape_acc1"] for k, r in results.get(loss, {}).items() if k.startswith(f"b{b}-")]
            summary.append(f"**{statistics.mean(values):.3f}** ({min(values):.3f}-{max(values):.3f})"
                           if values else "-")
        lines.append(f"| {loss} | mean (range) | " + " | ".join(summary) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--world", type=Path, required=True)
    parser.add_argument("--runs", type=Path, default=Path("runs/siglip-batch"))
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[16, 32, 64, 128])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--losses", nargs="+", choices=list(LOSSES), default=list(LOSSES))
    parser.add_argument("--examples", type=int, default=64_000,
                        help="training pairs every run sees (default: the demo's 500 steps x 128)")
    parser.add_argument("--out", type=Path, default=ROOT / "experiments" / "results-siglip-batch.json")
    args = parser.parse_args()
    results = json.loads(args.out.read_text()) if args.out.is_file() else {}
    for seed in args.seeds:
        for batch_size in args.batch_sizes:
            for loss in args.losses:
                r = results.setdefault(loss, {})[f"b{batch_size}-seed{seed}"] = run(loss, batch_size, seed, args)
                args.out.write_text(json.dumps(results, indent=1) + "\n")
                print(f"{loss} batch {batch_size} seed {seed}: shape acc1 {r['shape_acc1']:.3f} "
                      f"(scale {r['logit_scale']:.1f})", flush=True)
    print(table(results, args.batch_sizes, args.seeds))


if __name__ == "__main__":
    main()
