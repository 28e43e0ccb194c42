"""Predict functions over a loaded checkpoint. Evaluators and servers see these, never the model."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image

from vlp.checkpoint import Pretrained
from vlp.data.sources import load_image


class DualEncoderPredictor:
    """`embed_images` and `embed_texts` for a dual encoder: L2-normalised float32 embeddings."""

    def __init__(self, pretrained: Pretrained, *, batch_size: int = 256, device: str | None = None):
        if not hasattr(pretrained.model, "encode_image") or not hasattr(pretrained.model, "encode_text"):
            raise TypeError(f"a {pretrained.family.name} model has no image and text embeddings")
        self.pretrained = pretrained
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = pretrained.model.to(self.device).eval()
        self.transform = pretrained.image_transform()
        self.tokenizer = pretrained.tokenizer
        self.batch_size = batch_size

    @classmethod
    def from_checkpoint(cls, path: str | Path, **kwargs) -> DualEncoderPredictor:
        """Any checkpoint `vlp.load` reads: vlp, Hugging Face or open_clip folders."""
        from vlp.convert import load_pretrained

        return cls(load_pretrained(path), **kwargs)

    @torch.inference_mode()
    def embed_images(self, images: Sequence[Image.Image | str | Path]) -> torch.Tensor:
        """Images (PIL or paths) -> [N, E]."""
        out = []
        for start in range(0, len(images), self.batch_size):
            chunk = [im if isinstance(im, Image.Image) else load_image(Path(im))
                     for im in images[start:start + self.batch_size]]
            pixels = torch.stack([self.transform(im) for im in chunk]).to(self.device)
            out.append(self.model.encode_image(pixels).float().cpu())
        return torch.cat(out) if out else torch.empty(0, 0)

    @torch.inference_mode()
    def embed_texts(self, texts: Sequence[str]) -> torch.Tensor:
        """Texts -> [N, E]."""
        out = []
        for start in range(0, len(texts), self.batch_size):
            ids, mask = self.tokenizer(list(texts[start:start + self.batch_size]))
            out.append(self.model.encode_text(ids.to(self.device), mask.to(self.device)).float().cpu())
        return torch.cat(out) if out else torch.empty(0, 0)
