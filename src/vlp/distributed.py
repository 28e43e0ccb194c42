"""Everything that crosses processes: process-group set-up and the collectives the losses use.

On one process (no initialised process group) every function is the identity, so losses and the
trainer call them unconditionally. Processes are started by an existing launcher (`torchrun`, or
SLURM's `srun`), never by vlp.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


class _AllGather(torch.autograd.Function):
    """Concatenate every process's [b, ...] in rank order; the backward pass sums the gradients of all
    processes' copies and hands each process its own slice (all_reduce, which gloo supports too)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(x) for _ in range(world_size())]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        local = grad.shape[0] // world_size()
        return grad[rank() * local : (rank() + 1) * local]


def all_gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """[b, ...] on each process (the same b everywhere) -> [b * W, ...] in rank order; gradients flow
    back to each owner."""
    if not is_distributed():
        return x
    return _AllGather.apply(x)


class _RingShift(torch.autograd.Function):
    """Send to the next rank, receive from the previous one; the backward pass goes the other way."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return _exchange(x.contiguous(), forward=True)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return _exchange(grad.contiguous(), forward=False)


def _exchange(x: torch.Tensor, *, forward: bool) -> torch.Tensor:
    r, w = rank(), world_size()
    to, source = ((r + 1) % w, (r - 1) % w) if forward else ((r - 1) % w, (r + 1) % w)
    received = torch.empty_like(x)
    ops = [dist.P2POp(dist.isend, x, to), dist.P2POp(dist.irecv, received, source)]
    for request in dist.batch_isend_irecv(ops):
        request.wait()
    return received


def ring_shift(x: torch.Tensor) -> torch.Tensor:
    """Pass `x` one step around the ring of processes (rank r receives rank r-1's tensor), with autograd."""
    if not is_distributed():
        return x
    return _RingShift.apply(x)


def all_reduce_mean(x: torch.Tensor) -> torch.Tensor:
    """The mean over processes of a detached value (for logging)."""
    if not is_distributed():
        return x
    x = x.detach().clone()
    dist.all_reduce(x)
    return x / world_size()


def setup_from_environment(backend: str | None = None) -> bool:
    """Join the process group `torchrun` (RANK, WORLD_SIZE, MASTER_ADDR, ...) or SLURM describes.

    Returns whether this run is distributed. gloo on CPU, NCCL when CUDA is available.
    """
    if "SLURM_PROCID" in os.environ and "RANK" not in os.environ:
        os.environ.update(
            RANK=os.environ["SLURM_PROCID"],
            WORLD_SIZE=os.environ.get("SLURM_NTASKS", "1"),
            LOCAL_RANK=os.environ.get("SLURM_LOCALID", "0"),
        )
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    if not dist.is_initialized():
        backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend=backend)
    return True
