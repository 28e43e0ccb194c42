"""Training step time of a run config in fp32 and under bf16 autocast, side by side in one process.

    .venv/bin/python benchmarks/precision.py configs/clip-tiny.yaml [--set key=value ...]

Synthetic batches (no data loading), so the figure is the model's step alone; prints the ratio.
"""

from __future__ import annotations

import argparse
import time

import torch

from vlp.train.loop import load_run_config
from vlp.train.optim import make_optimizer


def step_time(config: str, overrides: list[str], precision: str, steps: int = 6, warmup: int = 3) -> float:
    cfg = load_run_config(config, overrides)
    family, model_cfg, objective_cfg = cfg.family_configs()
    torch.manual_seed(0)
    model = family.model_cls(model_cfg).train()
    objective = family.objective_cls(model, objective_cfg)
    optimizer = make_optimizer(model, lr=1e-4, weight_decay=0.1, betas=(0.9, 0.98), eps=1e-6)
    b, size, length = cfg.train.batch_size, cfg.image.size, cfg.tokenizer.context_length
    batch = {"image": torch.randn(b, 3, size, size), "text": torch.randint(0, cfg.tokenizer.vocab_size, (b, length)),
             "text_mask": torch.ones(b, length, dtype=torch.long)}
    for i in range(warmup + steps):
        if i == warmup:
            start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss = sum(v for k, v in objective(batch).items() if k.endswith("_loss"))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return (time.perf_counter() - start) / steps


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("config")
    parser.add_argument("--set", action="append", default=[])
    args = parser.parse_args()
    times = {p: step_time(args.config, args.set, p) for p in ("fp32", "bf16")}
    batch = load_run_config(args.config, args.set).train.batch_size
    for precision, seconds in times.items():
        print(f"{precision}: {seconds * 1000:.0f} ms/step, {batch / seconds:.0f} pairs/s")
    print(f"bf16 speed-up: {times['fp32'] / times['bf16']:.2f}x ({torch.get_num_threads()} threads)")


if __name__ == "__main__":
    main()
