"""Embedding throughput at the ViT-B/32 CLIP shape: vlp vs `transformers.CLIPModel` (sdpa), same weights.

transformers is given text padded to the batch's longest caption (`padding=True`, its best case);
vlp is given text padded to the full context, as its tokenizer returns it.
"""

from __future__ import annotations

from typing import Any

import torch
from common import interleaved_times
from transformers import CLIPConfig, CLIPModel

from vlp.convert.hf import IGNORED_KEYS, config_from_hf, hf_rules
from vlp.convert.keymap import to_vlp
from vlp.models.clip import DualEncoder

# openai/clip-vit-base-patch32's architecture (transformers' CLIPConfig defaults are this model).
CPU = torch.device("cpu")
VIT_B_32 = {"projection_dim": 512, "text_config": {}, "vision_config": {}}


def models() -> tuple[CLIPModel, DualEncoder]:
    torch.manual_seed(0)
    reference = CLIPModel(CLIPConfig(**VIT_B_32, attn_implementation="sdpa")).eval()
    config = reference.config.to_dict()
    cfg = config_from_hf(config)
    model = DualEncoder(cfg).eval()
    model.load_state_dict(
        to_vlp(
            reference.state_dict(),
            hf_rules(cfg, config["model_type"]),
            model.state_dict(),
            source="transformers",
            ignore=IGNORED_KEYS,
        )
    )
    return reference, model


def _features(output: Any) -> torch.Tensor:
    """transformers before 4.56 returns the projected features; later versions an output holding them."""
    return output if torch.is_tensor(output) else output.pooler_output


def measure(
    images: torch.Tensor, texts: torch.Tensor, *, steps: int, warmup: int, device: torch.device = CPU
) -> dict[str, Any]:
    """images: [B, 3, 224, 224]; texts: [B, 77] ids padded with 0 after CLIP's end-of-text (the largest id)."""
    reference, model = models()
    reference, model, images, texts = reference.to(device), model.to(device), images.to(device), texts.to(device)
    longest = int((texts != 0).sum(1).max())
    hf_ids = texts[:, :longest]
    hf_mask = (hf_ids != 0).long()
    vlp_mask = (texts != 0).long()
    bf16 = torch.autocast(device.type, dtype=torch.bfloat16)

    def run(fn, autocast: bool = False):
        def call(_: int) -> None:
            with torch.inference_mode(), bf16 if autocast else torch.autocast(device.type, enabled=False):
                fn()

        return call

    with torch.inference_mode():
        gap_images = (
            (
                model.encode_image(images)
                - torch.nn.functional.normalize(_features(reference.get_image_features(pixel_values=images)), dim=-1)
            )
            .abs()
            .max()
            .item()
        )
        gap_texts = (
            (
                model.encode_text(texts, vlp_mask)
                - torch.nn.functional.normalize(
                    _features(reference.get_text_features(input_ids=hf_ids, attention_mask=hf_mask)), dim=-1
                )
            )
            .abs()
            .max()
            .item()
        )
    image_runners = {
        "transformers fp32": run(lambda: reference.get_image_features(pixel_values=images)),
        "vlp fp32": run(lambda: model.encode_image(images)),
        "transformers bf16": run(lambda: reference.get_image_features(pixel_values=images), autocast=True),
        "vlp bf16": run(lambda: model.encode_image(images), autocast=True),
    }
    text_runners = {
        "transformers fp32": run(lambda: reference.get_text_features(input_ids=hf_ids, attention_mask=hf_mask)),
        "vlp fp32": run(lambda: model.encode_text(texts, vlp_mask)),
        "transformers bf16": run(
            lambda: reference.get_text_features(input_ids=hf_ids, attention_mask=hf_mask), autocast=True
        ),
        "vlp bf16": run(lambda: model.encode_text(texts, vlp_mask), autocast=True),
    }
    image_seconds = interleaved_times(image_runners, steps=steps, warmup=warmup)
    text_seconds = interleaved_times(text_runners, steps=steps, warmup=warmup)
    return {
        "image_batch": len(images),
        "text_batch": len(texts),
        "longest_caption_tokens": longest,
        "images_per_s": {k: len(images) / v for k, v in image_seconds.items()},
        "texts_per_s": {k: len(texts) / v for k, v in text_seconds.items()},
        "max_embedding_gap_fp32": {"images": gap_images, "texts": gap_texts},
    }
