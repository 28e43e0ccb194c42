"""vlp against its peers on this machine, side by side in one run: `make bench`.

    .venv-interop/bin/python benchmarks/bench.py [--sections train,embed,memory,coca,blip,blip2,detection] [--quick]

Runs in the environment `make interop` builds, where open_clip and transformers import beside vlp, so
every contender uses the same torch. Prints ratios and writes benchmarks/results.json. Never part of
the tests: timings on a shared machine are compared only with each other, within one run.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from common import matmul_peak, shapes_pairs

from vlp.report import machine


def train_section(data: Path, quick: bool, device: torch.device) -> dict[str, Any]:
    import training

    # The batches on the CPU; on a GPU, batches large enough to keep it busy.
    tiny_batch, b32_batch = (64, 16) if device.type == "cpu" else (512, 256)
    images, captions = shapes_pairs(data / "shapes64", tiny_batch * 8, 64)
    texts = training.tokenize(captions)
    tiny = [(images[i : i + tiny_batch], texts[i : i + tiny_batch]) for i in range(0, len(images), tiny_batch)]
    # Two warm-up steps: the compiled contender compiles for the first caption length, then again with
    # the length marked dynamic.
    results = {"tiny": training.measure("tiny", tiny, steps=4 if quick else 24, warmup=3, compiled=True, device=device)}
    # Captions that fill the whole context: the case where skipping padding cannot help.
    full = torch.randint(1, 49406, (tiny_batch, 77))
    full[:, 0], full[:, -1] = 49406, 49407
    results["tiny_full_context"] = training.measure(
        "tiny", [(tiny[0][0], full)], steps=2 if quick else 8, warmup=2, device=device
    )
    images224, captions224 = shapes_pairs(data / "shapes224", b32_batch * 2, 224)
    b32 = [
        (images224[i : i + b32_batch], training.tokenize(captions224[i : i + b32_batch]))
        for i in range(0, 2 * b32_batch, b32_batch)
    ]
    results["vit_b_32"] = training.measure("ViT-B-32", b32, steps=2 if quick else 5, warmup=1, device=device)
    return results


def embed_section(data: Path, quick: bool, device: torch.device) -> dict[str, Any]:
    import embedding
    import training

    images, captions = shapes_pairs(data / "shapes224", 32, 224)
    texts = training.tokenize((captions * 8)[:256])
    return embedding.measure(images, texts, steps=3 if quick else 10, warmup=1, device=device)


def memory_section(quick: bool) -> dict[str, Any]:
    """Each loss in its own process, so one's peak cannot hide another's."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}  # freed blocks go back to the system at once
    runs = [("naive_infonce", b) for b in (4096, 8192, 16384)] + [("naive_sigmoid", b) for b in (4096, 8192, 16384)]
    runs += [(v, b) for v in ("vlp_infonce", "vlp_sigmoid") for b in (16384, 32768)]
    if quick:
        runs = [(v, b // 4) for v, b in runs]
    measured: dict[str, dict[int, int]] = {}
    for variant, batch in runs:
        out = subprocess.run(
            [sys.executable, str(HERE / "loss_memory.py"), variant, str(batch)],
            env=env,
            capture_output=True,
            text=True,
            check=True,
        )
        measured.setdefault(variant, {})[batch] = json.loads(out.stdout)["peak_growth_bytes"]
    largest = max(measured["vlp_infonce"])
    result: dict[str, Any] = {"dim": 512, "chunk_size": 1024, "peak_growth_bytes": measured}
    for loss in ("infonce", "sigmoid"):
        naive = measured[f"naive_{loss}"]
        known = max(naive)
        # The naive loss holds B x B matrices: quadratic in B. Extrapolated from the largest measured batch
        # (running it at the largest would need more memory than this machine has).
        naive_at_largest = naive[known] * (largest / known) ** 2
        result[f"{loss}_fraction_of_naive_measured_at_{known}"] = measured[f"vlp_{loss}"][known] / naive[known]
        result[f"{loss}_naive_bytes_extrapolated_at_{largest}"] = naive_at_largest
        result[f"{loss}_fraction_of_naive_at_{largest}"] = measured[f"vlp_{loss}"][largest] / naive_at_largest
    return result


def coca_section(data: Path, quick: bool) -> dict[str, Any]:
    import coca

    return coca.measure(data, quick)


def blip_section(data: Path, quick: bool) -> dict[str, Any]:
    import blip_captioning

    return blip_captioning.measure(data, quick)


def blip2_section(data: Path, quick: bool) -> dict[str, Any]:
    import blip2

    return blip2.measure(data, quick)


def detection_section(quick: bool, device: torch.device) -> dict[str, Any]:
    import detection

    return detection.measure(quick, device)


def report(results: dict[str, Any]) -> list[str]:
    lines = []
    if results["device"] == "cpu" and not results["machine"].get("native_bf16", True):
        lines.append("this CPU has no bf16 arithmetic: its bf16 figures time emulation, compare the fp32 ones")
    if "train" in results:
        for name, r in results["train"].items():
            p = r["pairs_per_s"]
            lines.append(
                f"train {name} (batch {r['batch_size']}, ~{r['mean_caption_tokens']:.0f} caption tokens): pairs/s "
                + ", ".join(f"{k} {v:.1f}" for k, v in p.items())
            )
            lines.append(
                f"  vlp bf16 / open_clip fp32 {p['vlp bf16'] / p['open_clip fp32']:.2f}x, "
                f"vlp bf16 / open_clip bf16 {p['vlp bf16'] / p['open_clip bf16']:.2f}x, "
                f"vlp fp32 / open_clip fp32 {p['vlp fp32'] / p['open_clip fp32']:.2f}x; "
                + (
                    f"compiled vlp bf16 / vlp bf16 {p['vlp bf16 compiled'] / p['vlp bf16']:.2f}x; "
                    if "vlp bf16 compiled" in p
                    else ""
                )
                + f"max loss gap fp32 {r['max_loss_gap_fp32']:.2e}, bf16 {r['max_loss_gap_bf16']:.2e}"
                + (f"; MFU fp32 {r['mfu']['fp32']:.0%}, bf16 {r['mfu']['bf16']:.0%}" if "mfu" in r else "")
            )
    if "embed" in results:
        e = results["embed"]
        for what in ("images_per_s", "texts_per_s"):
            v = e[what]
            lines.append(
                f"embed {what}: "
                + ", ".join(f"{k} {x:.1f}" for k, x in v.items())
                + f"; vlp/transformers fp32 {v['vlp fp32'] / v['transformers fp32']:.2f}x, "
                f"bf16 {v['vlp bf16'] / v['transformers bf16']:.2f}x, "
                f"vlp bf16 / transformers fp32 {v['vlp bf16'] / v['transformers fp32']:.2f}x"
            )
    if "memory" in results:
        m = results["memory"]
        for key, value in m.items():
            if "fraction" in key:
                lines.append(f"loss memory {key}: {value:.3f}")
    if "coca" in results:
        step, gen = results["coca"]["train_step"], results["coca"]["generation"]
        lines.append(
            f"coca train step (batch {step['batch_size']}, bf16): pairs/s "
            + ", ".join(
                f"{k} {v:.1f} ({step['speedup_over_blip'][k]:.2f}x blip)" for k, v in step["pairs_per_s"].items()
            )
        )
        lines.append(
            f"coca generation ({gen['images']} images x {gen['new_tokens']} tokens): tokens/s "
            + ", ".join(f"{k} {v:.1f}" for k, v in gen["tokens_per_s"].items())
            + "; vlp / open_clip "
            + ", ".join(f"{m} {v:.2f}x" for m, v in gen["vlp_over_open_clip"].items())
            + f"; greedy tokens equal: {gen['greedy_tokens_equal']}"
        )
    if "blip" in results:
        gen = results["blip"]
        lines.append(
            f"blip captioning ({gen['images']} images x {gen['new_tokens']} tokens, pixels to tokens): tokens/s "
            + ", ".join(f"{k} {v:.1f}" for k, v in gen["tokens_per_s"].items())
            + "; vlp / transformers "
            + ", ".join(f"{m} {v:.2f}x" for m, v in gen["vlp_over_transformers"].items())
            + "; vision pass s " + ", ".join(f"{k} {v:.2f}" for k, v in gen["vision_pass_s"].items())
            + f"; greedy tokens equal: {gen['greedy_tokens_equal']}"
        )
    if "blip2" in results:
        gen, step = results["blip2"]["generation"], results["blip2"]["stage1_train_step"]
        lines.append(
            f"blip2 generation ({gen['images']} images x {gen['new_tokens']} tokens, pixels to tokens): tokens/s "
            + ", ".join(f"{k} {v:.1f}" for k, v in gen["tokens_per_s"].items())
            + "; vlp / transformers "
            + ", ".join(f"{m} {v:.2f}x" for m, v in gen["vlp_over_transformers"].items())
            + f"; greedy tokens equal (fp32): {gen['greedy_tokens_equal_fp32']}"
        )
        lines.append(
            f"blip2 stage-1 train step (batch {step['batch_size']}): pairs/s "
            + ", ".join(f"{k} {v:.1f} ({step['speedup_over_end_to_end'][k]:.2f}x)" for k, v in step["pairs_per_s"].items())
        )
    if "detection" in results:
        d = results["detection"]
        lines.append(
            f"detection OWL-ViT B/32 at {d['image_size']} px ({d['batch']} images x {d['queries']} queries): images/s "
            + ", ".join(f"{k} {v:.2f}" for k, v in d["images_per_s"].items())
            + "; vlp / transformers " + ", ".join(f"{k} {v:.2f}x" for k, v in d["vlp_over_transformers"].items())
            + f"; max logit gap fp32 {d['max_gap_fp32']['logits']:.1e}"
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sections", default="train,embed,memory,coca,blip,blip2,detection")
    parser.add_argument("--quick", action="store_true", help="few steps, small batches: checks the harness runs")
    parser.add_argument("--data", type=Path, default=Path("runs/bench-data"))
    parser.add_argument("--out", type=Path, default=HERE / "results.json")
    parser.add_argument("--device", default="cpu", help="cuda: the GPU (no matmul peak or loss memory there)")
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    device = torch.device(args.device)
    sections = args.sections.split(",")
    if device.type != "cpu":  # the matmul peak and the memory section measure the CPU
        sections = [s for s in sections if s != "memory"]
    results: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": machine(),
        "quick": args.quick,
        "device": "cpu" if device.type == "cpu" else torch.cuda.get_device_name(device),
    }
    if "train" in sections:
        results["train"] = train_section(args.data, args.quick, device)
    if "train" in sections and device.type == "cpu":
        results["matmul_peak_gflop_per_s"] = {
            "fp32": matmul_peak(torch.float32) / 1e9,
            "bf16": matmul_peak(torch.bfloat16) / 1e9,
        }
        for r in results["train"].values():
            r["mfu"] = {
                p: r["vlp_achieved_gflop_per_s"][p] / results["matmul_peak_gflop_per_s"][p] for p in ("fp32", "bf16")
            }
    if "embed" in sections:
        results["embed"] = embed_section(args.data, args.quick, device)
    if "memory" in sections:
        results["memory"] = memory_section(args.quick)
    if "coca" in sections and device.type == "cpu":
        results["coca"] = coca_section(args.data, args.quick)
    if "blip" in sections and device.type == "cpu":
        results["blip"] = blip_section(args.data, args.quick)
    if "blip2" in sections and device.type == "cpu":
        results["blip2"] = blip2_section(args.data, args.quick)
    if "detection" in sections:
        results["detection"] = detection_section(args.quick, device)
    for line in report(results):
        print(line)
    if args.out:
        args.out.write_text(json.dumps(results, indent=1) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
