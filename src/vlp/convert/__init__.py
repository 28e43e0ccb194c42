"""Checkpoint interop: load Hugging Face, open_clip and vlp checkpoints; export to each.

The key maps live here, not in the models: `hf.py` (CLIPModel, SiglipModel), `hf_blip.py` (the BLIP
heads), `open_clip.py`
(built-in ViT + text towers), `keymap.py` (the rule engine, safe weight reading), `tokenizers.py`
(the reference tokenizers rebuilt on the `tokenizers` library).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from vlp.checkpoint import (
    ARCH_FILE,
    CheckpointError,
    Pretrained,
    is_checkpoint_folder,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
)
from vlp.convert.hf import ConversionError, export_hf, is_hf_folder, load_hf
from vlp.convert.open_clip import export_open_clip, is_open_clip_folder, load_open_clip
from vlp.convert.tokenizers import tokenizer_from_path

Format = Literal["vlp", "hf", "open_clip"]
FORMATS: tuple[Format, ...] = ("vlp", "hf", "open_clip")


def detect_format(path: str | Path, config: str | Path | None = None) -> Format:
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.is_file():
        return "open_clip"  # a bare state dict; its model config comes with `config`
    if (path / ARCH_FILE).is_file() or list_checkpoints(path):
        return "vlp"
    if is_open_clip_folder(path) or config is not None:
        return "open_clip"
    if is_hf_folder(path):
        return "hf"
    raise CheckpointError(
        f"{path} is not a checkpoint vlp knows: expected a vlp folder ({ARCH_FILE}), a run folder "
        "(checkpoints/step_*), a Hugging Face folder (config.json) or an open_clip folder (open_clip_config.json)"
    )


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
    if fmt == "open_clip":
        return load_open_clip(path, config=config, tokenizer=tokenizer)
    if fmt == "hf":
        return load_hf(path, tokenizer)
    loaded = load_checkpoint(path)
    if tokenizer is not None:
        loaded.tokenizer = tokenizer_from_path(tokenizer, context_length=loaded.tokenizer.context_length)
    return loaded


def _holds_checkpoint(out: Path, fmt: Format) -> bool:
    if fmt == "vlp":
        return is_checkpoint_folder(out)
    if fmt == "hf":
        return is_hf_folder(out)
    return is_open_clip_folder(out)


def export_pretrained(
    pretrained: Pretrained, fmt: Format, out: str | Path, architecture: str | None = None, *, overwrite: bool = False
) -> Path:
    """`architecture`: which Hugging Face class a BLIP is written for (captioning by default).

    A folder that is not empty must hold a checkpoint of the same format, or `overwrite` be given; either
    way only the checkpoint's own files are replaced, and anything else in the folder stays."""
    out = Path(out)
    if fmt not in FORMATS:
        raise ValueError(f"unknown format '{fmt}'; expected one of {', '.join(FORMATS)}")
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"--out {out} is a file, not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite and not _holds_checkpoint(out, fmt):
        raise CheckpointError(
            f"--out {out} is not empty and holds no {fmt} checkpoint: pass --overwrite to write the checkpoint "
            "files into it (nothing else there is touched), or choose another folder"
        )
    if fmt == "hf":
        return export_hf(pretrained, out, architecture)
    if fmt == "open_clip":
        return export_open_clip(pretrained, out)
    return save_checkpoint(
        out,
        family=pretrained.family,
        model_config=pretrained.config,
        model=pretrained.model,
        image_config=pretrained.image_config,
        tokenizer=pretrained.tokenizer,
    )


__all__ = ["FORMATS", "ConversionError", "detect_format", "export_pretrained", "load_pretrained"]
