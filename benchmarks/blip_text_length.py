"""What cutting BLIP's text to the batch's longest caption saves, measured in one run.

BLIP's objective runs its text transformer three times per step (ITC encoder, ITM encoder on positives
and hard negatives, LM decoder). Tokenizers pad every caption to their context; the objective now cuts
the columns that are padding everywhere (`vlp.objectives.blip.trim_padding`). This times the same
training step, bf16 as the trainer runs it, with the cut and with it replaced by the identity (vlp
before the change), on 32 pairs whose captions hold 9 to 15 tokens like the shapes world's, at BLIP's
35-token context and at CLIP's 77.

    .venv/bin/python benchmarks/blip_text_length.py [--quick] [--out benchmarks/results-blip-text-length.json]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from common import interleaved_times

import vlp.objectives.blip as blip_objectives
from vlp.distributed import ParallelModel
from vlp.models.blip import Blip, BlipConfig
from vlp.towers import BertTextConfig, VisionConfig
from vlp.train.optim import make_optimizer
from vlp.train.step import TrainStep

WIDTH, HEADS, DEPTH, IMAGE, PATCH, VOCAB, BATCH = 256, 4, 6, 64, 8, 30524, 32


def _batch(context: int) -> dict[str, torch.Tensor | int]:
    generator = torch.Generator().manual_seed(0)
    lengths = torch.randint(9, 16, (BATCH,), generator=generator)
    mask = (torch.arange(context) < lengths[:, None]).long()
    text = torch.randint(6, VOCAB, (BATCH, context), generator=generator) * mask
    return {"image": torch.randn(BATCH, 3, IMAGE, IMAGE, generator=generator), "text": text, "text_mask": mask,
            "size": BATCH}  # fmt: skip


def measure(context: int, steps: int, warmup: int) -> dict[str, float]:
    torch.manual_seed(0)
    text = BertTextConfig(vocab_size=VOCAB, context_length=context, width=WIDTH, layers=DEPTH, heads=HEADS, pad_token_id=0,
                     eos_token_id=3, enc_token_id=4, dec_token_id=5)  # fmt: skip
    vision = VisionConfig(image_size=IMAGE, patch_size=PATCH, width=WIDTH, layers=DEPTH, heads=HEADS)
    model = Blip(BlipConfig(vision=vision, text=text, embed_dim=WIDTH)).train()
    optimizer = make_optimizer(model, lr=1e-4, weight_decay=0.05, betas=(0.9, 0.98), eps=1e-6)
    objective = blip_objectives.BlipObjective(model, blip_objectives.BlipObjectiveConfig())
    train_step = TrainStep(ParallelModel(model, "ddp", torch.device("cpu")), objective, optimizer, precision="bf16")
    batch = _batch(context)
    cut = blip_objectives.trim_padding

    def run(trim):
        def step(index: int) -> None:
            blip_objectives.trim_padding = trim
            try:
                train_step(batch)
            finally:
                blip_objectives.trim_padding = cut

        return step

    seconds = interleaved_times(
        {"cut to the longest caption": run(cut), "whole context": run(lambda t, m: (t, m))}, steps=steps, warmup=warmup
    )
    pairs = {name: BATCH / value for name, value in seconds.items()}
    return {**{f"{name} (pairs/s)": value for name, value in pairs.items()},
            "speedup": pairs["cut to the longest caption"] / pairs["whole context"]}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    steps, warmup = (2, 1) if args.quick else (8, 2)
    results = {
        "batch_size": BATCH,
        "model": f"BLIP, {DEPTH} layers, width {WIDTH}, ViT {IMAGE} px / patch {PATCH}",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        **{f"context {context}": measure(context, steps, warmup) for context in (35, 77)},
    }
    print(json.dumps(results, indent=1))
    if args.out:
        args.out.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
