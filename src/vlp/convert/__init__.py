"""Checkpoint interop: load Hugging Face, open_clip and vlp checkpoints; export to each.

Loaders and exporters are tables keyed by format: a loader by the kind of checkpoint (Hugging Face's
`model_type`, the open_clip model config's kind), an exporter by vlp family. A new converter is a module
and its entries here. `common.py` holds what the converters share; `keymap.py` is the rule engine and
safe weight reading; `tokenizers.py` rebuilds the reference tokenizers on the `tokenizers` library.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Literal

from vlp.assets import TEXT
from vlp.checkpoint import (
    ARCH_FILE,
    CheckpointError,
    Pretrained,
    is_checkpoint_folder,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
)
from vlp.convert import open_clip
from vlp.convert.common import ConversionError, is_hf_folder, read_hf_config
from vlp.convert.hf import export_hf, load_hf
from vlp.convert.hf_blip import export_hf_blip, load_hf_blip
from vlp.convert.hf_blip2 import export_hf_blip2, load_hf_blip2
from vlp.convert.hf_owlvit import export_hf_owlvit, load_hf_owlvit
from vlp.convert.open_clip_export import export_open_clip
from vlp.convert.tokenizers import tokenizer_from_path

Format = Literal["vlp", "hf", "open_clip"]
FORMATS: tuple[Format, ...] = ("vlp", "hf", "open_clip")
FORMAT_NAMES = {"vlp": "vlp", "hf": "Hugging Face", "open_clip": "open_clip"}

# loader(path, config=, tokenizer=) -> Pretrained; config: an open_clip model config JSON for a bare state dict.
Loader = Callable[..., Pretrained]
# exporter(pretrained, out, architecture) -> the folder written; architecture: which Hugging Face BLIP class.
Exporter = Callable[[Pretrained, Path, str | None], Path]

LOADERS: dict[tuple[Format, str], Loader] = {
    ("hf", "clip"): load_hf,
    ("hf", "siglip"): load_hf,
    ("hf", "blip"): load_hf_blip,
    ("hf", "blip-2"): load_hf_blip2,
    ("hf", "instructblip"): load_hf_blip2,
    ("hf", "owlvit"): load_hf_owlvit,
    ("hf", "owlv2"): load_hf_owlvit,
    ("open_clip", "clip"): open_clip.load_open_clip,
    ("open_clip", "coca"): open_clip.load_open_clip,
}
EXPORTERS: dict[tuple[Format, str], Exporter] = {
    ("hf", "clip"): export_hf,
    ("hf", "blip"): export_hf_blip,
    ("hf", "blip_vqa"): export_hf_blip,
    ("hf", "blip2"): export_hf_blip2,
    ("hf", "blip2_qformer"): export_hf_blip2,
    ("hf", "instructblip"): export_hf_blip2,
    ("hf", "owlvit"): export_hf_owlvit,
    ("open_clip", "clip"): export_open_clip,
    ("open_clip", "coca"): export_open_clip,
}


def detect_format(path: str | Path, config: str | Path | None = None) -> Format:
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.is_file():
        with open(path, "rb") as handle:
            if handle.read(4) == b"GGUF":
                raise CheckpointError(f"{path} is a GGUF language model, not a vision-language checkpoint: `vlp lm "
                                      "convert-gguf` makes a folder of it for model.sources.language_model")
        return "open_clip"  # a bare state dict; its model config comes with `config`
    if (path / ARCH_FILE).is_file() or list_checkpoints(path):
        return "vlp"
    if open_clip.is_open_clip_folder(path) or config is not None:
        return "open_clip"
    if is_hf_folder(path):
        return "hf"
    raise CheckpointError(
        f"{path} is not a checkpoint vlp knows: expected a vlp folder ({ARCH_FILE}), a run folder "
        "(checkpoints/step_*), a Hugging Face folder (config.json) or an open_clip folder (open_clip_config.json)"
    )


def _kind(path: Path, fmt: Format, config: str | Path | None) -> str:
    if fmt == "open_clip":
        return open_clip.model_kind(path, config)
    model_type = read_hf_config(path).get("model_type")
    if ("hf", model_type) not in LOADERS:
        known = ", ".join(kind for f, kind in LOADERS if f == "hf")
        raise CheckpointError(f"{path}/config.json: model_type '{model_type}' is not one vlp loads (expected one of {known})")
    return model_type


def load_pretrained(
    path: str | Path, *, config: str | Path | None = None, tokenizer: str | Path | None = None
) -> Pretrained:
    """Any supported checkpoint -> model (eval mode), image preprocessing and tokenizer.

    `config` is an open_clip model config JSON for a bare state-dict file; `tokenizer` overrides the
    tokenizer found beside the weights (a tokenizer.json, a Hugging Face folder, or open_clip's
    `bpe_simple_vocab_16e6.txt.gz`).
    """
    path = Path(path)
    fmt = detect_format(path, config)
    if fmt != "vlp":
        return LOADERS[fmt, _kind(path, fmt, config)](path, config=config, tokenizer=tokenizer)
    loaded = load_checkpoint(path)
    if tokenizer is not None:
        loaded.assets.tokenizers[TEXT] = tokenizer_from_path(tokenizer, context_length=loaded.tokenizer.context_length)
    return loaded


def _holds_checkpoint(out: Path, fmt: Format) -> bool:
    if fmt == "vlp":
        return is_checkpoint_folder(out)
    if fmt == "hf":
        return is_hf_folder(out)
    return open_clip.is_open_clip_folder(out)


def export_pretrained(
    pretrained: Pretrained, fmt: Format, out: str | Path, architecture: str | None = None, *, overwrite: bool = False
) -> Path:
    """`architecture`: which Hugging Face class a BLIP is written for (captioning by default).

    A folder that is not empty must hold a checkpoint of the same format, or `overwrite` be given; either
    way only the checkpoint's own files are replaced, and anything else in the folder stays."""
    out = Path(out)
    if fmt not in FORMATS:
        raise ValueError(f"unknown format '{fmt}'; expected one of {', '.join(FORMATS)}")
    if fmt != "vlp" and (fmt, pretrained.family.name) not in EXPORTERS:
        raise ConversionError(f"family '{pretrained.family.name}' has no {FORMAT_NAMES[fmt]} export yet")
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"--out {out} is a file, not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite and not _holds_checkpoint(out, fmt):
        raise CheckpointError(
            f"--out {out} is not empty and holds no {fmt} checkpoint: pass --overwrite to write the checkpoint "
            "files into it (nothing else there is touched), or choose another folder"
        )
    if fmt != "vlp":
        return EXPORTERS[fmt, pretrained.family.name](pretrained, out, architecture)
    return save_checkpoint(
        out,
        family=pretrained.family,
        model_config=pretrained.config,
        model=pretrained.model,
        assets=pretrained.assets,
    )


__all__ = ["EXPORTERS", "FORMATS", "LOADERS", "ConversionError", "detect_format", "export_pretrained", "load_pretrained"]
