"""BLIP-2's claims on the shapes world, as docs/results/blip2.md reports them.

A. Frozen towers + a small Q-Former reach most of an end-to-end model (the paper's central claim): BLIP-2
   stage 1 over the frozen image tower of a tiny CLIP trained first, against an end-to-end tiny BLIP
   (`configs/blip-tiny.yaml`) trained for the same wall time; text->image R@1 by embeddings on the test
   split, and each one's trainable parameters. The stage-1 run saves often; the checkpoint scored is the
   last one within the BLIP's wall time, each run's time taken at its median logged throughput.
B. Stage 2 with the real frozen SmolLM2-135M-Instruct: zero-shot captioning CIDEr (greedy) and zero-shot
   VQA accuracy ("Question: {} Answer:") on test images, against the same LM given only the prompt (no
   image) and against stage 2 started without stage 1 (the paper's Figure 5), the image tower the same;
   for each seed, stage 2 starts from that seed's stage-1 run of part A.

    .venv/bin/python experiments/blip2_claims.py --data data/shapes --out runs/blip2-claims --seeds 0 1 2

Runs whose final checkpoint exists are reused, so a stopped run continues where it was.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
from pathlib import Path
from typing import Any

import torch
import yaml

from vlp.checkpoint import list_checkpoints, load_checkpoint
from vlp.convert import load_pretrained
from vlp.convert.tokenizers import tokenizer_from_path
from vlp.generation import GenerationConfig, generate
from vlp.report import machine
from vlp.tasks import GivenFunctions, predict_functions
from vlp.tasks.captioning import CaptioningEvalConfig, CaptionPredictor, evaluate_captioning
from vlp.tasks.retrieval import RetrievalEvalConfig, evaluate_retrieval
from vlp.tasks.vqa import VqaEvalConfig, VqaPredictor, evaluate_vqa
from vlp.train.config import load_run_config
from vlp.train.loop import train

log = logging.getLogger("blip2_claims")
CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def _records(run: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _train(config: str, out: Path, overrides: list[str], steps: int | None = None) -> Path:
    cfg = load_run_config(CONFIGS / config, [*overrides, "train.progress=false"])
    done = list_checkpoints(out)
    if done and int(done[-1].name.split("_")[1]) >= cfg.train.steps:
        log.info("reusing %s", out)
        return out
    train(cfg, out, resume="latest" if done else None)
    return out


def _seconds(run: Path, step: int) -> float:
    """The wall time a run needs to reach `step` at its median logged throughput: other load on a shared
    machine then inflates neither run's time."""
    records = _records(run)
    rates = sorted(r["samples_per_s"] for r in records)
    batch = yaml.safe_load((run / "run.yaml").read_text())["train"]["batch_size"]
    return step * batch / rates[len(rates) // 2]


def _trainable(run: Path) -> int:
    return sum(p.numel() for p in load_checkpoint(run).model.parameters() if p.requires_grad)


def _recall(checkpoint: Path, data: Path) -> float:
    functions = predict_functions(load_pretrained(checkpoint), device="cpu")
    return evaluate_retrieval(functions, RetrievalEvalConfig(str(data / "captions_test.json"))).metrics[
        "image_retrieval_recall@1"]


def part_a(data: Path, out: Path, seeds: list[int]) -> dict[str, Any]:
    clip = _train("clip-tiny.yaml", out / "clip", [f"data.train={data / 'train.csv'}"])
    rows = []
    for seed in seeds:
        common = [f"data.train={data / 'train.csv'}", f"train.seed={seed}"]
        # 500 steps, the budget the results page's table was measured at (blip-tiny now trains 1,500): the claim is
        # about the same wall time, which the stage-1 checkpoint chosen below follows.
        blip = _train("blip-tiny.yaml", out / f"blip-{seed}", [*common, "train.steps=500"])
        wall = _seconds(blip, _records(blip)[-1]["step"])
        stage1 = _train("blip2-qformer-tiny.yaml", out / f"stage1-{seed}", [
            *common, f"model.sources.image_encoder={clip}", "train.steps=1500", "train.save_every=50",
            "train.keep_checkpoints=100"])  # fmt: skip
        step_of = {c: int(c.name.split("_")[1]) for c in list_checkpoints(stage1)}
        within = [c for c, step in step_of.items() if _seconds(stage1, step) <= wall]
        chosen = within[-1] if within else min(step_of, key=step_of.get)
        rows.append({
            "seed": seed, "blip_wall_s": wall, "blip_recall@1": _recall(blip, data),
            "stage1_checkpoint": chosen.name, "stage1_wall_s": _seconds(stage1, step_of[chosen]),
            "stage1_recall@1": _recall(chosen, data),
        })  # fmt: skip
        log.info("part A seed %d: %s", seed, rows[-1])
    blip_params, stage1_params = _trainable(out / f"blip-{seeds[0]}"), _trainable(out / f"stage1-{seeds[0]}")
    ratios = [r["stage1_recall@1"] / r["blip_recall@1"] for r in rows]
    return {"rows": rows, "recall_ratio_mean": sum(ratios) / len(ratios), "recall_ratio_min": min(ratios),
            "blip_trainable": blip_params, "stage1_trainable": stage1_params,
            "trainable_fraction": stage1_params / blip_params}  # fmt: skip


def _vqa_subset(data: Path, out: Path, questions: int) -> tuple[Path, Path]:
    """The first `questions` test questions and their annotations."""
    q = json.loads((data / "vqa" / "questions_test.json").read_text())
    a = json.loads((data / "vqa" / "annotations_test.json").read_text())
    q["questions"] = q["questions"][:questions]
    keep = {x["question_id"] for x in q["questions"]}
    a["annotations"] = [x for x in a["annotations"] if x["question_id"] in keep]
    out.mkdir(parents=True, exist_ok=True)
    (out / "questions.json").write_text(json.dumps(q))
    (out / "annotations.json").write_text(json.dumps(a))
    return out / "questions.json", out / "annotations.json"


def _captions_subset(data: Path, out: Path, images: int) -> Path:
    c = json.loads((data / "captions_test.json").read_text())
    c["images"] = c["images"][:images]
    keep = {x["id"] for x in c["images"]}
    c["annotations"] = [x for x in c["annotations"] if x["image_id"] in keep]
    path = out / "captions.json"
    path.write_text(json.dumps(c))
    return path


def _score(caption, answer, captions: Path, questions: Path, annotations: Path, data: Path) -> dict[str, float]:
    functions = GivenFunctions(caption=caption, answer=answer)
    cider = evaluate_captioning(functions, CaptioningEvalConfig(str(captions), str(data), meteor=False)).metrics["cider"]
    vqa = evaluate_vqa(functions, VqaEvalConfig(questions=str(questions), annotations=str(annotations),
                                                images=str(data / "images" / "test"), image_pattern="{image_id:06d}.png"))
    return {"cider": cider, "vqa_accuracy": vqa.metrics["vqa_accuracy"]}


def part_b(data: Path, out: Path, lm: Path, seeds: list[int], steps: int, images: int,
           questions: int) -> dict[str, Any]:
    subset = out / "eval-subset"
    subset.mkdir(parents=True, exist_ok=True)
    captions = _captions_subset(data, subset, images)
    question_file, annotations = _vqa_subset(data, subset, questions)
    greedy = GenerationConfig(method="greedy", max_new_tokens=20, min_new_tokens=1)
    short = GenerationConfig(method="greedy", max_new_tokens=5, min_new_tokens=1)
    per_seed: dict[str, dict[str, dict[str, float]]] = {}
    for seed in seeds:
        stage1 = out / f"stage1-{seed}"
        if not list_checkpoints(stage1):
            raise SystemExit(f"blip2_claims: part b needs part a's stage-1 run of seed {seed} ({stage1}); "
                             f"run --parts a,b")
        common = [f"data.train={data / 'train.csv'}", f"model.sources.language_model={lm}", f"tokenizer.path={lm}",
                  "model.lm_precision=auto", f"train.steps={steps}", "train.batch_size=32", "train.save_every=1000",
                  f"train.seed={seed}"]  # fmt: skip
        arms = {
            "stage 2 after stage 1": _train("blip2-tiny.yaml", out / f"stage2-{seed}",
                                            [*common, f"train.init_from={stage1}"]),
            "stage 2 without stage 1": _train("blip2-tiny.yaml", out / f"stage2-no-stage1-{seed}",
                                              [*common, f"model.sources.image_encoder={out / 'clip'}"]),
        }  # fmt: skip
        scores = per_seed.setdefault(f"seed{seed}", {})
        for name, run in arms.items():
            caption = CaptionPredictor.from_checkpoint(run, generation=greedy, device="cpu").caption
            answer = VqaPredictor.from_checkpoint(run, generation=short, device="cpu").answer
            scores[name] = _score(caption, answer, captions, question_file, annotations, data)
            log.info("part B seed %d, %s: %s", seed, name, scores[name])
    prompt_only = _prompt_only(lm, captions, question_file, annotations, data, greedy, short)
    return {"steps": steps, "eval_images": images, "eval_questions": questions, "seeds": per_seed,
            "language model alone (prompt only, no image)": prompt_only}  # fmt: skip


def _prompt_only(lm_folder: Path, captions: Path, questions: Path, annotations: Path, data: Path,
                 greedy: GenerationConfig, short: GenerationConfig) -> dict[str, float]:
    """SmolLM2 without the soft prompt: the caption from its start token alone, answers from
    "Question: {} Answer:" alone."""
    from transformers import AutoModelForCausalLM

    lm = AutoModelForCausalLM.from_pretrained(lm_folder).eval()
    tokenizer = tokenizer_from_path(lm_folder, context_length=64)
    from vlp.models.blip2 import LanguageModelDecoder

    def decoder(prefix_ids: torch.Tensor, mask: torch.Tensor):
        def step(inputs, key_mask, cache, state):
            positions = (key_mask.long().cumsum(dim=1) - 1).clamp(min=0)[:, -inputs.shape[1]:]
            given = {"inputs_embeds": inputs} if inputs.dim() == 3 else {"input_ids": inputs}
            result = lm(**given, attention_mask=key_mask, position_ids=positions, cache=cache, use_cache=True)
            return result.logits[:, -1], result.cache

        return LanguageModelDecoder(step, start_ids=[], eos_token_id=lm.config.eos_token_id,
                                    pad_token_id=lm.config.pad_token_id, max_length=None,
                                    prefix=lm.get_input_embeddings()(prefix_ids), prefix_mask=mask)

    def texts(prompts: list[str], cfg: GenerationConfig) -> list[str]:
        ids, mask = tokenizer(prompts)
        lengths = mask.sum(dim=1) - 1  # without the end token; left-aligned as vlp's BLIP-2 feeds questions
        width = int(lengths.max())
        columns = torch.arange(width)[None]
        first = (width - lengths)[:, None]
        real = columns >= first
        aligned = ids.gather(1, (columns - first).clamp(min=0)).masked_fill(~real, tokenizer.pad_id)
        with torch.inference_mode():
            out = generate(decoder(aligned, real.long()), aligned[:, :0], cfg)
        return [tokenizer.decode(row) for row in out]

    constant = texts([""], greedy)[0]
    template = "Question: {} Answer:"
    return _score(lambda paths: [constant] * len(paths),
                  lambda paths, qs: [a for i in range(0, len(qs), 32)
                                     for a in texts([template.format(q) for q in qs[i : i + 32]], short)],
                  captions, questions, annotations, data)


def _measured(seeds: list[int]) -> dict[str, Any]:
    """Where and when a part ran: written beside its figures, so a re-run of one part cannot leave them
    described by another run's machine; `precision: auto` computes in bf16 only where `native_bf16`."""
    return {"date": datetime.date.today().isoformat(), "seeds": seeds, **machine()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--parts", default="a,b")
    parser.add_argument("--lm", type=Path, help="SmolLM2 as `vlp lm convert-gguf --smollm2` writes it (part b)")
    parser.add_argument("--stage2-steps", type=int, default=200)
    parser.add_argument("--eval-images", type=int, default=200)
    parser.add_argument("--eval-questions", type=int, default=400)
    parser.add_argument("--result", type=Path, default=Path(__file__).resolve().parent / "results-blip2-claims.json")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    result: dict[str, Any] = json.loads(args.result.read_text()) if args.result.is_file() else {}
    if "a" in args.parts.split(","):
        result["a"] = part_a(args.data, args.out, args.seeds)
        result["a_measured"] = _measured(args.seeds)
        args.result.write_text(json.dumps(result, indent=1, default=str) + "\n")
    if "b" in args.parts.split(","):
        result["b"] = part_b(args.data, args.out, args.lm, args.seeds, args.stage2_steps, args.eval_images,
                             args.eval_questions)
        result["b_measured"] = _measured(args.seeds)
        args.result.write_text(json.dumps(result, indent=1, default=str) + "\n")
    print(json.dumps(result, indent=1, default=str))


if __name__ == "__main__":
    main()
