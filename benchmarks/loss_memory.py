"""Peak memory of one contrastive loss forward and backward on [B, D] features, in a fresh process.

    python benchmarks/loss_memory.py VARIANT BATCH [--dim 512] [--chunk 1024]

Prints {"variant", "batch", "dim", "peak_growth_bytes"}: the process's peak resident memory during the
loss minus its resident memory once the features exist (Linux /proc). The naive losses build the whole B x B matrix
(as open_clip's ClipLoss and SigLipLoss do on one process); vlp's compute rows in recomputed chunks.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F

from vlp.losses import contrastive_loss, sigmoid_loss


def naive_infonce(image: torch.Tensor, text: torch.Tensor, scale: torch.Tensor, _: torch.Tensor) -> torch.Tensor:
    logits = scale * image @ text.T
    labels = torch.arange(len(image))
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def naive_sigmoid(image: torch.Tensor, text: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    logits = scale * image @ text.T + bias
    labels = 2 * torch.eye(len(image)) - 1
    return -F.logsigmoid(labels * logits).sum() / len(image)


def _status_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def reset_peak() -> int:
    """Restart the kernel's peak-resident count from now (getrusage's peak survives fork and exec, so a
    large parent would hide the loss); returns resident bytes."""
    Path("/proc/self/clear_refs").write_text("5")
    return _status_bytes("VmRSS")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("variant", choices=["naive_infonce", "naive_sigmoid", "vlp_infonce", "vlp_sigmoid"])
    parser.add_argument("batch", type=int)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--chunk", type=int, default=1024)
    args = parser.parse_args()
    torch.manual_seed(0)
    image = F.normalize(torch.randn(args.batch, args.dim), dim=-1).requires_grad_()
    text = F.normalize(torch.randn(args.batch, args.dim), dim=-1).requires_grad_()
    scale, bias = torch.tensor(10.0, requires_grad=True), torch.tensor(-10.0, requires_grad=True)
    losses = {
        "naive_infonce": naive_infonce,
        "naive_sigmoid": naive_sigmoid,
        "vlp_infonce": lambda i, t, s, _: contrastive_loss(i, t, s, chunk_size=args.chunk),
        "vlp_sigmoid": lambda i, t, s, b: sigmoid_loss(i, t, s, b, chunk_size=args.chunk),
    }
    baseline = reset_peak()
    loss = losses[args.variant](image, text, scale, bias)
    loss.backward()
    peak = _status_bytes("VmHWM")
    print(
        json.dumps(
            {
                "variant": args.variant,
                "batch": args.batch,
                "dim": args.dim,
                "peak_growth_bytes": peak - baseline,
                "loss": loss.item(),
            }
        )
    )


if __name__ == "__main__":
    main()
