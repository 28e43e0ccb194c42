"""Numeric precision: `auto` computes in bf16 where the hardware has bf16 arithmetic and in fp32 elsewhere.

A CPU without bf16 instructions (AVX2 only: many AMD EPYC, older Xeon and desktop CPUs) has PyTorch emulate
bf16. On such a 2-core EPYC a 1024 x 1024 bf16 matmul ran at 0.7 GFLOP/s against fp32's 38, and a tiny-CLIP
training step took 8 s under bf16 autocast against 1.1 s in fp32. Where bf16 is native (AVX-512 BF16, AMX)
bf16 is the faster one: 1.3x for the tiny-CLIP step in `make bench`.
"""

from __future__ import annotations

import logging
from functools import cache
from typing import Literal

import torch

Precision = Literal["auto", "fp32", "bf16"]
Resolved = Literal["fp32", "bf16"]
DTYPES: dict[Resolved, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16}

log = logging.getLogger("vlp.precision")


def has_native_bf16(device: torch.device | str) -> bool:
    """Whether `device` computes bf16 in hardware: a CUDA device that supports it, or a CPU with AVX-512 BF16,
    AMX or Arm's bf16 extension. Other devices (MPS) count as not."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return _cpu_has_bf16()
    return False


@cache
def _cpu_has_bf16() -> bool:
    capabilities = torch.cpu.get_capabilities()
    return any(capabilities.get(name, False) for name in ("avx512_bf16", "amx_bf16", "bf16", "sve_bf16"))


def resolve_precision(precision: Precision, device: torch.device | str) -> Resolved:
    """The precision to compute in on `device`: `auto` is bf16 where the device has bf16 arithmetic, else
    fp32. An explicit bf16 is kept, with a warning once where a CPU or CUDA device would emulate it."""
    device = torch.device(device)
    if precision == "auto":
        return "bf16" if has_native_bf16(device) else "fp32"
    if precision == "bf16" and device.type in ("cpu", "cuda") and not has_native_bf16(device):
        _warn_emulated(device.type)
    return precision


def default_device() -> torch.device:
    """Where a model runs when no device is named: the first CUDA device when present, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@cache
def _warn_emulated(device_type: str) -> None:
    log.warning("bf16 asked for on a %s without bf16 arithmetic: it is emulated there and runs several times "
                "slower than fp32 (precision auto chooses fp32 on it)", device_type)
