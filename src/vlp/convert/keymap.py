"""Declarative key maps between vlp state dicts and other libraries', and safe weight reading.

A `Rule` says that vlp's tensors `ours`, concatenated along dim 0, equal the foreign tensors `theirs`,
concatenated along dim 0 and transformed. That one form covers renames, fused q/k/v projections
split into three (or packed into one `in_proj_weight`), transposed projection matrices and scalars
stored with an extra leading axis. Both directions run the same rules.
"""

from __future__ import annotations

import zipfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from vlp.checkpoint import CheckpointError, read_torch_file, read_weights

# unsqueeze: the foreign tensor has a leading axis of size 1 that vlp's lacks ([1] vs a scalar, [1, N, D] vs [N, D]);
# unsqueeze2: two ([1, 1, D] vs [D], HF BLIP's class embedding).
Transform = Literal["copy", "transpose", "unsqueeze", "unsqueeze2"]


@dataclass(frozen=True)
class Rule:
    ours: tuple[str, ...]
    theirs: tuple[str, ...]
    transform: Transform = "copy"


def rule(ours: str | tuple[str, ...], theirs: str | tuple[str, ...], transform: Transform = "copy") -> Rule:
    as_tuple = lambda keys: (keys,) if isinstance(keys, str) else tuple(keys)
    return Rule(as_tuple(ours), as_tuple(theirs), transform)


def weight_and_bias(ours: str, theirs: str) -> list[Rule]:
    """A layer's weight and bias under two names."""
    return [rule(f"{ours}.weight", f"{theirs}.weight"), rule(f"{ours}.bias", f"{theirs}.bias")]


def prefixed(rules: Iterable[Rule], ours: str, theirs: str) -> list[Rule]:
    """The same rules under a vlp prefix and a foreign prefix."""
    return [Rule(tuple(ours + k for k in r.ours), tuple(theirs + k for k in r.theirs), r.transform) for r in rules]


def layer_rules(
    layers: int, ours: str, theirs: str, pairs: Sequence[tuple[str | tuple[str, ...], str | tuple[str, ...]]],
    params: Sequence[str] = ("weight", "bias"),
) -> list[Rule]:
    """The rules of a stack of layers: for every layer i, pair (a, b) and parameter p, vlp's
    `{ours}.{i}.{a}.{p}` is the foreign `{theirs}.{i}.{b}.{p}`. A tuple names tensors concatenated into
    the other side's one (separate q, k, v into `qkv_proj`); a name holding `{p}` spells the parameter
    itself (`attn.in_proj_{p}`)."""

    def names(prefix: str, parts: str | tuple[str, ...], p: str) -> tuple[str, ...]:
        parts = (parts,) if isinstance(parts, str) else parts
        return tuple(prefix + (part.format(p=p) if "{p}" in part else f"{part}.{p}") for part in parts)

    return [
        rule(names(f"{ours}.{i}.", a, p), names(f"{theirs}.{i}.", b, p))
        for i in range(layers) for a, b in pairs for p in params
    ]


def _describe(keys: tuple[str, ...]) -> str:
    return " + ".join(f"'{k}'" for k in keys)


def to_vlp(
    state: dict[str, torch.Tensor],
    rules: list[Rule],
    expected: dict[str, torch.Tensor],
    *,
    source: str,
    ignore: tuple[str, ...] = (),
) -> dict[str, torch.Tensor]:
    """Foreign state dict -> vlp state dict, checked against the model's own `expected` shapes.

    Keys ending in one of `ignore` (buffers such as position ids) are dropped; any other foreign key
    no rule reads is an error, so a checkpoint of the wrong architecture is not half-loaded.
    """
    used = {k for r in rules for k in r.theirs}
    missing = sorted(k for k in used if k not in state)
    if missing:
        raise CheckpointError(f"{source}: missing tensor(s) {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    unexpected = sorted(k for k in state if k not in used and not k.endswith(ignore))
    if unexpected:
        raise CheckpointError(
            f"{source}: unexpected tensor(s) {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}; "
            "the checkpoint does not match the architecture in its config"
        )
    out: dict[str, torch.Tensor] = {}
    for r in rules:
        parts = [state[k] for k in r.theirs]
        try:
            tensor = torch.cat(parts, dim=0) if len(parts) > 1 else parts[0]
        except RuntimeError:
            shapes = ", ".join(str(tuple(p.shape)) for p in parts)
            raise CheckpointError(f"{source}: {_describe(r.theirs)} have shapes {shapes} that do not stack") from None
        if r.transform == "transpose":
            tensor = tensor.t()
        want = [expected[k].shape for k in r.ours]
        for _ in range({"unsqueeze": 1, "unsqueeze2": 2}.get(r.transform, 0)):
            if tensor.dim() and tensor.shape[0] == 1:
                tensor = tensor.squeeze(0)
        sizes = [s[0] if len(s) else 1 for s in want]
        total = torch.Size([sum(sizes), *want[0][1:]]) if len(want) > 1 else want[0]
        if tensor.shape != total:
            raise CheckpointError(
                f"{source}: {_describe(r.theirs)} has shape {tuple(tensor.shape)} (as vlp lays it out); "
                f"vlp's {_describe(r.ours)} expects {tuple(total)}"
            )
        chunks = tensor.split(sizes, dim=0) if len(r.ours) > 1 else (tensor,)
        for key, chunk in zip(r.ours, chunks):
            out[key] = chunk.contiguous()
    return out


def from_vlp(state: dict[str, torch.Tensor], rules: list[Rule]) -> dict[str, torch.Tensor]:
    """vlp state dict -> foreign state dict; a many-key foreign side is split into equal parts."""
    out: dict[str, torch.Tensor] = {}
    for r in rules:
        parts = [state[k] for k in r.ours]
        tensor = torch.cat(parts, dim=0) if len(parts) > 1 else parts[0]
        if r.transform == "transpose":
            tensor = tensor.t()
        elif r.transform == "unsqueeze":
            tensor = tensor.unsqueeze(0)
        elif r.transform == "unsqueeze2":
            tensor = tensor[None, None]
        chunks = tensor.chunk(len(r.theirs), dim=0) if len(r.theirs) > 1 else (tensor,)
        for key, chunk in zip(r.theirs, chunks):
            out[key] = chunk.detach().cpu().contiguous()
    return out


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors from a safetensors file or a torch pickle, never running pickled code.

    Training checkpoints' {"state_dict": ...} wrappers and DDP / torch.compile prefixes are removed.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"weights file not found: {path}")
    if path.suffix == ".safetensors":
        state = read_weights(path)
    else:
        if zipfile.is_zipfile(path) and any("/code/" in n for n in zipfile.ZipFile(path).namelist()):
            raise CheckpointError(
                f"{path} is a TorchScript archive (OpenAI's clip.load format); vlp does not run its code. "
                "Save its state_dict() to safetensors in a session you trust, then load that with its config"
            )
        state = read_torch_file(path)
        if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
            state = state["state_dict"]
        if not isinstance(state, dict):
            raise CheckpointError(f"{path}: holds a {type(state).__name__}, not a state dict")
    for prefix in ("module.", "_orig_mod."):
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix) :]: v for k, v in state.items()}
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
