"""CoCa parity with open_clip on random-weight models of `coca_ViT-B-32` and `coca_ViT-L-14`, both
directions: embeddings, caption logits and greedy captions. Runs in the `make interop` environment."""

import json

import pytest
import torch
from safetensors.torch import save_file

import vlp
from vlp.assets import IMAGE, TEXT, Assets
from vlp.assets.image import ImageConfig
from vlp.checkpoint import Pretrained
from vlp.convert import export_pretrained
from vlp.generation import GenerationConfig, generate
from vlp.models.coca import Coca, CocaConfig
from vlp.registry import FAMILIES
from vlp.towers import TextConfig, VisionConfig

pytestmark = pytest.mark.interop
open_clip = pytest.importorskip("open_clip")

ATOL = 1e-4
# Lengths differ, so the legacy CLS mask (it sees the first padding position) is exercised.
TEXTS = ["a photo of a dog.", "a red circle", "two cats sitting on a long green sofa in the sun", "x"]
NEW_TOKENS = 12


def _pixels(n: int, size: int = 224) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(0))


def _reference_outputs(model, pixels: torch.Tensor, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        out = model(pixels, ids)
        greedy = model.generate(pixels, generation_type="top_k", top_k=1, seq_len=NEW_TOKENS + 2, min_seq_len=1)
    return {
        "image": out["image_features"],
        "text": out["text_features"],
        "logits": out["logits"],
        "greedy": greedy[:, 1 : 1 + NEW_TOKENS],  # after the start token, before the forced end-of-text
    }


def _vlp_outputs(pretrained: Pretrained, pixels: torch.Tensor, texts: list[str]) -> dict[str, torch.Tensor]:
    model = pretrained.model
    ids, mask = pretrained.tokenizer(texts)
    with torch.no_grad():
        out = model(pixels, ids, mask)
        _, image_tokens = model.encode_image_tokens(pixels)
        cfg = GenerationConfig(method="greedy", max_new_tokens=NEW_TOKENS, min_new_tokens=0)
        greedy = generate(model.caption_decoder(image_tokens), ids[:, :0], cfg)
    return {"image": out.image_features, "text": out.text_features, "logits": out.caption_logits, "greedy": greedy}


def _assert_same(ours: dict, expected: dict, mask: torch.Tensor) -> None:
    torch.testing.assert_close(ours["image"], expected["image"], atol=ATOL, rtol=0)
    torch.testing.assert_close(ours["text"], expected["text"], atol=ATOL, rtol=0)
    # Position i predicts token i + 1: compare where token i is real.
    real = mask[:, : ours["logits"].shape[1]].bool()
    scale = expected["logits"].abs().max()
    torch.testing.assert_close(
        ours["logits"][real] / scale, expected["logits"][:, : real.shape[1]][real] / scale, atol=ATOL, rtol=0
    )
    for row, tokens in zip(expected["greedy"].tolist(), ours["greedy"], strict=True):
        assert tokens == row[: len(tokens)] and len(tokens) >= NEW_TOKENS // 2  # stopped at end-of-text at most


@pytest.mark.parametrize("name", ["coca_ViT-B-32", "coca_ViT-L-14"])
def test_open_clip_coca_parity_both_ways(tmp_path, name):
    torch.manual_seed(0)
    reference = open_clip.create_model(name).eval()
    # open_clip leaves the decoder's vocabulary projection as torch.empty (its init_parameters is never
    # called): give it values, or the reference's logits are whatever the memory held.
    projection = reference.text_decoder.text_projection
    torch.nn.init.normal_(projection, std=projection.shape[0] ** -0.5)
    config = tmp_path / f"{name}.json"
    config.write_text(json.dumps(open_clip.get_model_config(name)))
    weights = tmp_path / "open_clip_model.safetensors"
    save_file(reference.state_dict(), str(weights))
    pretrained = vlp.load(weights, config=config)
    assert pretrained.family.name == "coca"
    assert (pretrained.config.pooler, pretrained.config.cls_mask) == ("shared", "legacy")
    tokenizer = open_clip.get_tokenizer(name)
    ids, mask = pretrained.tokenizer(TEXTS)
    assert torch.equal(ids, tokenizer(TEXTS))
    pixels = _pixels(len(TEXTS))
    expected = _reference_outputs(reference, pixels, tokenizer(TEXTS))
    _assert_same(_vlp_outputs(pretrained, pixels, TEXTS), expected, mask)

    out = export_pretrained(pretrained, "open_clip", tmp_path / "export")
    reloaded = open_clip.create_model(f"local-dir:{out}").eval()
    _assert_same(_vlp_outputs(pretrained, pixels, TEXTS), _reference_outputs(reloaded, pixels, tokenizer(TEXTS)), mask)


def test_vlp_coca_exports_to_open_clip(tmp_path):
    """A vlp CoCa in open_clip's layout, with vlp's own trained tokenizer, runs the same in open_clip."""
    from vlp.assets.tokenizer import TokenizerConfig, train_tokenizer

    texts = ["a red circle on the left", "two blue squares", "a small green triangle below a star"] * 20
    tokenizer = train_tokenizer(texts, TokenizerConfig(vocab_size=300, context_length=20))
    cfg = CocaConfig(
        embed_dim=64,
        vision=VisionConfig(image_size=32, patch_size=8, width=96, layers=2, heads=4, ln_post=False),
        text=TextConfig(vocab_size=300, context_length=20, width=64, layers=2, heads=4),
        multimodal_layers=2,
        pooler="shared",
        caption_queries=9,
        pooler_heads=4,
        cls_mask="legacy",
        bos_token_id=tokenizer.token_id("<start_of_text>"),
        eos_token_id=tokenizer.token_id("<end_of_text>"),
        pad_token_id=tokenizer.pad_id,
    )
    torch.manual_seed(0)
    model = Coca(cfg).eval()
    pretrained = Pretrained(FAMILIES["coca"], cfg, model, Assets({TEXT: tokenizer}, {IMAGE: ImageConfig(size=32)}), tmp_path)
    out = export_pretrained(pretrained, "open_clip", tmp_path / "export")
    reference = open_clip.create_model(f"local-dir:{out}").eval()
    reference.pad_id = tokenizer.pad_id
    pixels = _pixels(3, 32)
    sample = ["a red circle", "two blue squares on the left", "a star"]
    ids, mask = tokenizer(sample)
    with torch.no_grad():
        out_ref = reference(pixels, ids)
        greedy = reference.generate(
            pixels,
            generation_type="top_k",
            top_k=1,
            seq_len=NEW_TOKENS + 2,
            min_seq_len=1,
            sot_token_id=cfg.bos_token_id,
            eos_token_id=cfg.eos_token_id,
            pad_token_id=cfg.pad_token_id,
        )
    expected = {
        "image": out_ref["image_features"],
        "text": out_ref["text_features"],
        "logits": out_ref["logits"],
        "greedy": greedy[:, 1 : 1 + NEW_TOKENS],
    }
    _assert_same(_vlp_outputs(pretrained, pixels, sample), expected, mask)
    # The other layouts are refused by name.
    from vlp.convert import ConversionError

    for change in ({"pooler": "separate"}, {"cls_mask": "correct"}):
        other = Pretrained(
            FAMILIES["coca"],
            CocaConfig(**{**cfg.__dict__, **change}),
            model,
            pretrained.assets,
            tmp_path,
        )
        with pytest.raises(ConversionError, match=next(iter(change))):
            export_pretrained(other, "open_clip", tmp_path / "refused")
