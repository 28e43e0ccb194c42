"""Open-vocabulary detection throughput at OWL-ViT B/32, 768 px: vlp's detector vs transformers'
`OwlViTForObjectDetection` (sdpa), the same random weights, the same preprocessed pixels and queries.

Both compute everything a `vlp detect` call computes after preprocessing: the image tower, the text tower
for the queries, the class head against them and the boxes. Preprocessing (shared in kind: PIL resize)
and drawing are left out.
"""

from __future__ import annotations

from typing import Any

import torch
from common import interleaved_times
from transformers import OwlViTConfig, OwlViTForObjectDetection

from vlp.convert.hf_owlvit import IGNORED_KEYS, config_from_hf, hf_rules
from vlp.convert.keymap import to_vlp
from vlp.models.owlvit import OwlVit

QUERIES = 3
CPU = torch.device("cpu")


def models() -> tuple[OwlViTForObjectDetection, OwlVit]:
    """google/owlvit-base-patch32's architecture with random weights, in both libraries."""
    torch.manual_seed(0)
    reference = OwlViTForObjectDetection(OwlViTConfig(attn_implementation="sdpa")).eval()
    config = reference.config.to_dict()
    cfg = config_from_hf(config)
    model = OwlVit(cfg).eval()
    model.load_state_dict(to_vlp(reference.state_dict(), hf_rules(cfg, "owlvit"), model.state_dict(),
                                 source="transformers", ignore=IGNORED_KEYS))
    return reference, model


def measure(quick: bool, device: torch.device = CPU) -> dict[str, Any]:
    reference, model = models()
    reference, model = reference.to(device), model.to(device)
    batch = 2 if quick else 4
    generator = torch.Generator().manual_seed(0)
    pixels = torch.randn(batch, 3, 768, 768, generator=generator).to(device)
    ids = torch.zeros(QUERIES, 16, dtype=torch.long)
    ids[:, :6] = torch.randint(1, 49406, (QUERIES, 6), generator=generator)
    ids[:, 0], ids[:, 6] = 49406, 49407
    mask = (ids != 0).long()
    hf_ids, hf_mask = ids.repeat(batch, 1).to(device), mask.repeat(batch, 1).to(device)
    ids, mask = ids.expand(batch, -1, -1).to(device), mask.expand(batch, -1, -1).to(device)

    def run(fn, bf16: bool = False):
        def call(_: int) -> None:
            with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                fn()

        return call

    with torch.inference_mode():
        expected = reference(input_ids=hf_ids, attention_mask=hf_mask, pixel_values=pixels)
        ours = model(pixels, ids, mask)
    gaps = {"logits": (ours.logits - expected.logits).abs().max().item(),
            "boxes": (ours.pred_boxes - expected.pred_boxes).abs().max().item()}
    runners = {
        "transformers fp32": run(lambda: reference(input_ids=hf_ids, attention_mask=hf_mask, pixel_values=pixels)),
        "vlp fp32": run(lambda: model(pixels, ids, mask)),
        "transformers bf16": run(lambda: reference(input_ids=hf_ids, attention_mask=hf_mask, pixel_values=pixels),
                                 bf16=True),
        "vlp bf16": run(lambda: model(pixels, ids, mask), bf16=True),
    }
    seconds = interleaved_times(runners, steps=1 if quick else 4, warmup=1)
    images_per_s = {k: batch / v for k, v in seconds.items()}
    return {
        "batch": batch, "queries": QUERIES, "image_size": 768, "images_per_s": images_per_s,
        "max_gap_fp32": gaps,
        "vlp_over_transformers": {
            "fp32": images_per_s["vlp fp32"] / images_per_s["transformers fp32"],
            "bf16": images_per_s["vlp bf16"] / images_per_s["transformers bf16"],
            "vlp bf16 / transformers fp32": images_per_s["vlp bf16"] / images_per_s["transformers fp32"],
        },
    }
