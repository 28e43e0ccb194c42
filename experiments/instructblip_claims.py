"""InstructBLIP's claims on the shapes world's instruction suite, as docs/results/instructblip.md reports them.

Every arm starts from the same BLIP-2 (stage 1 over a frozen tiny-CLIP tower, stage 2 with the real frozen
SmolLM2-135M-Instruct) and is scored on the suite's tasks (`vlp data instructions`): held-out formats
zero-shot, held-in ones on their test records.

- BLIP-2 zero-shot: the stage-2 model given the same instructions (its LM reads them; its Q-Former cannot).
- InstructBLIP: instruction tuning on the held-in mixture, the instruction in the Q-Former and the LM,
  datasets drawn by the square root of their sizes.
- Without instructions in the Q-Former (the paper's Table 2 ablation): the same run, `qformer.text_input`
  false, so the queries cannot read the instruction.
- Plain concatenation: the InstructBLIP run with datasets drawn by size (the paper's sampling ablation,
  judged on the held-in tasks).

    vlp data instructions --world data/shapes --out data/shapes/instruct
    vlp train --config configs/clip-tiny.yaml --data data/shapes/train.csv --out runs/ib-base/clip
    vlp train --config configs/blip2-qformer-tiny.yaml --data data/shapes/train.csv --out runs/ib-base/stage1 \
        --set model.sources.image_encoder=runs/ib-base/clip
    vlp train --config configs/blip2-tiny.yaml --data data/shapes/train.csv --out runs/ib-base/stage2 \
        --set train.init_from=runs/ib-base/stage1 --set model.sources.language_model=models/smollm2 \
        --set tokenizer.path=models/smollm2 --set model.lm_precision=bf16 --set train.batch_size=32 \
        --set train.steps=200 --set tokenizer.context_length=64
    .venv/bin/python experiments/instructblip_claims.py --base runs/ib-base --suite data/shapes/instruct \
        --lm models/smollm2 --out runs/instructblip-claims --seeds 0 1 2

`--base` holds BLIP-2's `stage1` and `stage2` runs (as above: stage 2's tokenizer keeps 64 tokens, so the
baseline reads the instructions whole). Runs and evaluations already on disk are reused, so a stopped run
continues; seeds of earlier invocations stay in the results file.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
from pathlib import Path
from typing import Any

from blip2_claims import _train  # a run trained once, reused (or resumed) when the script runs again

from vlp.generation import GenerationConfig
from vlp.tasks import GivenFunctions
from vlp.tasks.instructions import InstructionsEvalConfig, evaluate_instructions
from vlp.tasks.vqa import VqaPredictor

log = logging.getLogger("instructblip_claims")
CONFIG = Path(__file__).resolve().parent.parent / "configs" / "instructblip-tiny.yaml"
ARMS = {
    "InstructBLIP": [],
    "without instructions in the Q-Former": ["model.qformer.text_input=false"],
    "plain concatenation": ["data.sampling=proportional"],
}


def _evaluate(checkpoint: Path, suite: Path, result: Path, limit: int) -> dict[str, float]:
    if result.is_file():
        return json.loads(result.read_text())["metrics"]
    generation = GenerationConfig(method="greedy", max_new_tokens=20, min_new_tokens=1)
    predictor = VqaPredictor.from_checkpoint(checkpoint, generation=generation, question_template="{}", device="cpu",
                                             batch_size=16)
    functions = GivenFunctions(answer=predictor.answer, score_answers=predictor.score_answers)
    evaluation = evaluate_instructions(functions, InstructionsEvalConfig(str(suite / "tasks.json"), limit=limit))
    result.write_text(json.dumps(evaluation.to_dict(), indent=1))
    return evaluation.metrics


def _summary(rows: list[dict[str, float]]) -> dict[str, dict[str, float]]:
    """Mean, min and max over seeds of every metric."""
    return {key: {"mean": statistics.fmean(r[key] for r in rows), "min": min(r[key] for r in rows),
                  "max": max(r[key] for r in rows)} for key in rows[0]}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", type=Path, required=True, help="folder with BLIP-2's stage1 and stage2 runs")
    parser.add_argument("--suite", type=Path, required=True, help="the instruction suite (vlp data instructions)")
    parser.add_argument("--lm", type=Path, required=True, help="SmolLM2 as `vlp lm convert-gguf --smollm2` writes it")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--arms", default=",".join(ARMS), help="comma-separated arm names to run")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--limit", type=int, default=100, help="test records per task")
    parser.add_argument("--result", type=Path,
                        default=Path(__file__).resolve().parent / "results-instructblip-claims.json")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args.out.mkdir(parents=True, exist_ok=True)
    common = [f"data.train={args.suite / 'train.jsonl'}", f"model.sources.language_model={args.lm}",
              f"tokenizer.path={args.lm}", "model.lm_precision=bf16", f"train.steps={args.steps}",
              "train.batch_size=32", f"train.save_every={args.steps}", f"train.init_from={args.base / 'stage2'}",
              f"model.sources.qformer={args.base / 'stage1'}"]  # fmt: skip
    result: dict[str, Any] = json.loads(args.result.read_text()) if args.result.is_file() else {}
    result.update({"steps": args.steps, "batch_size": 32, "records_per_task": args.limit, "arms": result.get("arms", {})})
    baseline = _evaluate(args.base / "stage2", args.suite, args.out / "blip2-zero-shot.json", args.limit)
    result["arms"]["BLIP-2 zero-shot"] = {"seeds": {"-": baseline}, "summary": _summary([baseline])}
    args.result.write_text(json.dumps(result, indent=1) + "\n")
    for name in args.arms.split(","):
        slug = name.lower().replace(" ", "-").replace("-the-q-former", "")
        rows = dict(result["arms"].get(name, {}).get("seeds", {}))  # seeds of earlier invocations stay
        for seed in args.seeds:
            run = _train(CONFIG.name, args.out / f"{slug}-{seed}", [*common, *ARMS[name], f"train.seed={seed}"])
            rows[str(seed)] = _evaluate(run, args.suite, args.out / f"{slug}-{seed}.json", args.limit)
            log.info("%s seed %d: %s", name, seed, rows[str(seed)])
        result["arms"][name] = {"overrides": ARMS[name], "seeds": rows, "summary": _summary(list(rows.values()))}
        args.result.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({name: {k: round(v["mean"], 3) for k, v in arm["summary"].items()}
                      for name, arm in result["arms"].items()}, indent=1))


if __name__ == "__main__":
    main()
