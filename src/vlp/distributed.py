"""Everything that crosses processes: process-group set-up and the collectives the losses use.

On one process (no initialised process group) every function is the identity, so losses and the
trainer call them unconditionally. Processes are started by an existing launcher (`torchrun`, or
SLURM's `srun`), never by vlp.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

Strategy = Literal["ddp", "fsdp"]
# The processes a collective spans: None is every process of the run (the default group).
Group = dist.ProcessGroup | None


def is_distributed(group: Group = None) -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def rank(group: Group = None) -> int:
    return dist.get_rank(group) if is_distributed(group) else 0


def world_size(group: Group = None) -> int:
    return dist.get_world_size(group) if is_distributed(group) else 1


def local_sizes(size: int, device: torch.device | None = None, group: Group = None) -> list[int]:
    """Every process's local batch size, in rank order (batches shrink where bad samples were dropped)."""
    if not is_distributed(group):
        return [size]
    sizes = [torch.zeros(1, dtype=torch.long, device=device) for _ in range(world_size(group))]
    dist.all_gather(sizes, torch.tensor([size], dtype=torch.long, device=device), group=group)
    return [int(s) for s in sizes]


class _AllGather(torch.autograd.Function):
    """Concatenate every process's [b_r, ...] in rank order; the backward pass sums the gradients of all
    processes' copies and hands each process its own slice (all_reduce, which gloo supports too)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, sizes: list[int], group: Group) -> torch.Tensor:
        padded = torch.zeros(max(sizes), *x.shape[1:], dtype=x.dtype, device=x.device)
        padded[: x.shape[0]] = x
        parts = [torch.empty_like(padded) for _ in sizes]
        dist.all_gather(parts, padded, group=group)
        ctx.sizes, ctx.group = sizes, group
        return torch.cat([part[:size] for part, size in zip(parts, sizes, strict=True)], dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        own = rank(ctx.group)
        start = sum(ctx.sizes[:own])
        return grad[start : start + ctx.sizes[own]], None, None


def all_gather_with_grad(x: torch.Tensor, sizes: list[int] | None = None, group: Group = None) -> torch.Tensor:
    """[b_r, ...] on each process -> [sum b_r, ...] in rank order; gradients flow back to each owner.

    `sizes` (from `local_sizes`) saves a collective when the caller already has them."""
    if not is_distributed(group):
        return x
    return _AllGather.apply(x, sizes or local_sizes(x.shape[0], x.device, group), group)


class _RingShift(torch.autograd.Function):
    """Send to the next rank, receive from the previous one; the backward pass goes the other way."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: Group) -> torch.Tensor:
        ctx.group = group
        return _exchange(x.contiguous(), group, forward=True)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return _exchange(grad.contiguous(), ctx.group, forward=False), None


def _send_receive(x: torch.Tensor, to: int, source: int, received: torch.Tensor, group: Group) -> torch.Tensor:
    ops = [dist.P2POp(dist.isend, x, to, group), dist.P2POp(dist.irecv, received, source, group)]
    for request in dist.batch_isend_irecv(ops):
        request.wait()
    return received


def _exchange(x: torch.Tensor, group: Group, *, forward: bool) -> torch.Tensor:
    r, w = rank(group), world_size(group)
    to, source = ((r + 1) % w, (r - 1) % w) if forward else ((r - 1) % w, (r + 1) % w)
    if group is not None:  # point-to-point operations name their peers by global rank
        to, source = dist.get_global_rank(group, to), dist.get_global_rank(group, source)
    # The neighbour's block may have fewer rows (bad samples dropped there): its size travels first.
    size = _send_receive(
        torch.tensor([x.shape[0]], device=x.device), to, source, torch.zeros(1, dtype=torch.long, device=x.device),
        group,
    )
    return _send_receive(x, to, source, x.new_empty(int(size), *x.shape[1:]), group)


def ring_shift(x: torch.Tensor, group: Group = None) -> torch.Tensor:
    """Pass `x` one step around the ring of processes (rank r receives rank r-1's tensor), with autograd."""
    if not is_distributed(group):
        return x
    return _RingShift.apply(x, group)


def unwrap(module: nn.Module) -> nn.Module:
    """The model inside DistributedDataParallel and torch.compile wrappers, or the module itself."""
    while True:
        if isinstance(module, DistributedDataParallel):
            module = module.module
        elif hasattr(module, "_orig_mod"):  # torch.compile's OptimizedModule
            module = module._orig_mod
        else:
            return module


class ParallelModel:
    """A model prepared for data-parallel training: `module` is what forward passes go through.

    ddp: every process holds the whole model; gradients are averaged in buckets during backward.
    fsdp: PyTorch's `fully_shard`, one shard group per layer of every layer stack plus the rest, so parameters,
    gradients and optimiser state are split across processes. It cannot shard 0-dim parameters (the
    logit scale and bias), so those stay whole on every process and their gradients are averaged here.
    On one process both are the model itself.
    """

    def __init__(
        self, model: nn.Module, strategy: Strategy, device: torch.device, *, every_parameter_used: bool = True
    ):
        """every_parameter_used False: some parameters may get no gradient in a step (an objective with
        a term switched off); DDP then looks for them after each backward."""
        self.model, self.strategy = model, strategy
        self.module: nn.Module = model
        self.replicated: list[nn.Parameter] = []
        if not is_distributed():
            return
        if strategy == "ddp":
            # Buffers are not broadcast: the only ones vlp models hold (BLIP's feature queues) are updated
            # identically on every process, and broadcasting them would move megabytes every step.
            self.module = DistributedDataParallel(
                model,
                device_ids=[device.index] if device.type == "cuda" else None,
                broadcast_buffers=False,
                find_unused_parameters=not every_parameter_used,
            )
        else:
            from torch.distributed.fsdp import fully_shard

            # Every model keeps its layer stacks in ModuleLists (towers' blocks, BLIP's text layers).
            layers = [layer for stack in model.modules() if isinstance(stack, nn.ModuleList) for layer in stack]
            for layer in layers:
                fully_shard(layer)
            self.replicated = [p for p in model.parameters() if p.dim() == 0]
            fully_shard(model, ignored_params=set(self.replicated))

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        """Backward passes inside accumulate gradients locally; the next one outside reduces them all."""
        if isinstance(self.module, DistributedDataParallel):
            with self.module.no_sync():
                yield
        elif self.strategy == "fsdp" and is_distributed():
            self.model.set_requires_gradient_sync(False)
            try:
                yield
            finally:
                self.model.set_requires_gradient_sync(True)
        else:
            yield

    def sync_gradients(self) -> None:
        """Average the gradients the wrapper leaves alone; call after the last backward of a step."""
        for param in self.replicated:
            if param.grad is not None:
                dist.all_reduce(param.grad)
                param.grad /= world_size()

    def clip_grad_norm(self, max_norm: float) -> torch.Tensor:
        """Clip the gradients to `max_norm` (inf: leave them) and return their total norm before clipping, as
        a whole tensor on every process (FSDP computes it sharded, as a DTensor)."""
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)
        return norm.full_tensor() if isinstance(norm, DTensor) else norm

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Whole weights on rank 0, on the CPU (collective: every process calls it)."""
        if self.strategy == "fsdp" and is_distributed():
            return get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return self.model.state_dict()

    def optimizer_state(self, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        """Optimiser state keyed by parameter name, whole, on rank 0: the same file under ddp, fsdp or one
        process, so a run may resume under another strategy or process count (collective)."""
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return get_optimizer_state_dict(self.model, optimizer, options=options)

    def load_optimizer_state(self, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
        """Load what `optimizer_state` wrote; each process reads the whole state and keeps its shard."""
        sharded = self.strategy == "fsdp" and is_distributed()
        options = StateDictOptions(full_state_dict=True) if sharded else None
        set_optimizer_state_dict(self.model, optimizer, state, options=options)


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def all_reduce_mean(x: torch.Tensor, group: Group = None) -> torch.Tensor:
    """The mean over processes of a detached value (for logging, and token counts in losses)."""
    if not is_distributed(group):
        return x
    x = x.detach().clone()
    dist.all_reduce(x, group=group)
    return x / world_size(group)


def all_reduce_max(x: torch.Tensor, group: Group = None) -> torch.Tensor:
    """The largest value over processes of a detached tensor."""
    if not is_distributed(group):
        return x
    x = x.detach().clone()
    dist.all_reduce(x, op=dist.ReduceOp.MAX, group=group)
    return x


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """The sum over processes of a detached value (counts), on the device it came from."""
    if not is_distributed():
        return x
    summed = x.detach().to(_collective_device(), copy=True)
    dist.all_reduce(summed)
    return summed.to(x.device)


def all_processes_agree(flag: bool) -> bool:
    """True when `flag` is true on every process (a collective: all call it)."""
    if not is_distributed():
        return flag
    value = torch.tensor([1.0 if flag else 0.0], device=_collective_device())
    dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return bool(value.item() == 1.0)


def all_gather_objects(value: Any) -> list[Any]:
    """Every process's `value` (picklable), in rank order (a collective: all call it)."""
    if not is_distributed():
        return [value]
    gathered: list[Any] = [None] * world_size()
    dist.all_gather_object(gathered, value)
    return gathered


def _collective_device() -> torch.device:
    """NCCL reduces tensors on the GPU; gloo on the CPU."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


@contextlib.contextmanager
def process_group(backend: str | None = None) -> Iterator[bool]:
    """Join the process group the launcher describes (see `setup_from_environment`) for the block, and
    leave it afterwards if this call created it; yields whether the run is distributed."""
    created = not (dist.is_available() and dist.is_initialized())
    distributed = setup_from_environment(backend)
    try:
        yield distributed
    finally:
        if created and dist.is_initialized():
            dist.destroy_process_group()


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
    missing = [name for name in ("MASTER_ADDR", "MASTER_PORT") if name not in os.environ]
    if missing:
        raise RuntimeError(
            f"a {os.environ['WORLD_SIZE']}-process run needs {' and '.join(missing)} to find its peers: start it "
            "with torchrun, or under SLURM export MASTER_ADDR (the first node's host name) and MASTER_PORT"
        )
    if not dist.is_initialized():
        backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend=backend)
    return True
