"""Parity with open_clip on random-weight models of the real configs, both directions, and its tokenizer.

open_clip needs torchvision, which does not import beside the library's torch; these tests run in a
second environment: `make interop`.
"""

import json

import pytest
import torch
from safetensors.torch import save_file

import vlp
from text_samples import train_siglip_spm, varied_strings
from vlp.convert import export_pretrained

pytestmark = pytest.mark.interop
open_clip = pytest.importorskip("open_clip")

ATOL = 1e-4
CLASSES = ["a photo of a dog.", "a red circle", "two cats on a sofa", "an x-ray of a hand", "the city at night"]


def _reference(name: str):
    torch.manual_seed(0)
    model = open_clip.create_model(name).eval()
    return model, open_clip.get_model_config(name)


def _embed(model, pixels, ids):
    with torch.no_grad():
        image = model.encode_image(pixels, normalize=True)
        text = model.encode_text(ids, normalize=True)
    logits = model.logit_scale.exp() * image @ text.T
    if getattr(model, "logit_bias", None) is not None:
        logits = logits + model.logit_bias
    return image, text, logits


def _assert_same(ours, expected):
    for a, b in zip(ours, expected):
        torch.testing.assert_close(a, b, atol=ATOL, rtol=0)
    assert torch.equal(ours[2].argmax(dim=1), expected[2].argmax(dim=1))  # zero-shot predictions


def _vlp_embed(pretrained, pixels, texts):
    ids, mask = pretrained.tokenizer(texts)
    with torch.no_grad():
        out = pretrained.model(pixels, ids, mask)
    logits = out.logit_scale * out.image_features @ out.text_features.T
    if out.logit_bias is not None:
        logits = logits + out.logit_bias
    return out.image_features, out.text_features, logits


def _pixels(n: int, size: int = 224) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("name", ["ViT-B-32", "ViT-B-32-quickgelu", "ViT-L-14"])
def test_open_clip_parity_both_ways(tmp_path, name):
    reference, model_cfg = _reference(name)
    config = tmp_path / f"{name}.json"
    config.write_text(json.dumps(model_cfg))
    if name == "ViT-B-32":  # a training checkpoint: pickled, wrapped, DDP-prefixed
        weights = tmp_path / "epoch_1.pt"
        torch.save({"epoch": 1, "state_dict": {f"module.{k}": v for k, v in reference.state_dict().items()}}, weights)
    else:
        weights = tmp_path / "open_clip_model.safetensors"
        save_file(reference.state_dict(), str(weights))
    pretrained = vlp.load(weights, config=config)
    assert pretrained.config.vision.act == ("quick_gelu" if "quickgelu" in name else "gelu")
    tokenizer = open_clip.get_tokenizer(name)
    assert torch.equal(pretrained.tokenizer(CLASSES)[0], tokenizer(CLASSES))
    pixels = _pixels(2)
    expected = _embed(reference, pixels, tokenizer(CLASSES))
    _assert_same(_vlp_embed(pretrained, pixels, CLASSES), expected)

    out = export_pretrained(pretrained, "open_clip", tmp_path / "export")
    reloaded, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{out}")
    _assert_same(_embed(reloaded.eval(), pixels, tokenizer(CLASSES)), expected)
    assert f"size={model_cfg['vision_cfg']['image_size']}" in str(preprocess)


def test_open_clip_checkpoint_converts_to_transformers(tmp_path):
    """The most asked-for route: open_clip weights -> a folder transformers' CLIPModel loads."""
    transformers = pytest.importorskip("transformers")
    reference, model_cfg = _reference("ViT-B-32")
    (tmp_path / "cfg.json").write_text(json.dumps(model_cfg))
    save_file(reference.state_dict(), str(tmp_path / "weights.safetensors"))
    pretrained = vlp.load(tmp_path / "weights.safetensors", config=tmp_path / "cfg.json")
    out = export_pretrained(pretrained, "hf", tmp_path / "hf")
    hf = transformers.CLIPModel.from_pretrained(out).eval()
    ids = open_clip.get_tokenizer("ViT-B-32")(CLASSES)
    pixels = _pixels(2)
    image, text, logits = _embed(reference, pixels, ids)
    with torch.no_grad():
        result = hf(input_ids=ids, pixel_values=pixels)
    torch.testing.assert_close(result.image_embeds, image, atol=ATOL, rtol=0)
    torch.testing.assert_close(result.text_embeds, text, atol=ATOL, rtol=0)
    torch.testing.assert_close(result.logits_per_image, logits, atol=ATOL, rtol=0)


def test_siglip_style_text_tower_parity(tmp_path):
    """open_clip's SigLIP text options on built-in towers: bidirectional, last-token pooling, biased projection."""
    model_cfg = {
        "embed_dim": 256,
        "init_logit_bias": -10,
        "custom_text": True,
        "vision_cfg": {
            "image_size": 64,
            "patch_size": 16,
            "width": 256,
            "layers": 2,
            "no_ln_pre": True,
            "pool_type": "avg",
            "norm_kwargs": {"eps": 1e-6},
        },
        "text_cfg": {
            "context_length": 64,
            "vocab_size": 49408,
            "width": 256,
            "heads": 4,
            "layers": 2,
            "no_causal_mask": True,
            "proj_bias": True,
            "pool_type": "last",
            "norm_kwargs": {"eps": 1e-6},
        },
    }
    torch.manual_seed(0)
    kwargs = {k: v for k, v in model_cfg.items() if k != "custom_text"}
    reference = open_clip.CustomTextCLIP(**kwargs).eval()
    (tmp_path / "cfg.json").write_text(json.dumps(model_cfg))
    save_file(reference.state_dict(), str(tmp_path / "w.safetensors"))
    pretrained = vlp.load(tmp_path / "w.safetensors", config=tmp_path / "cfg.json")
    assert not pretrained.config.text.causal and pretrained.config.text.pool == "last"
    pixels = _pixels(2, 64)
    ids = pretrained.tokenizer(CLASSES)[0]
    expected = _embed(reference, pixels, ids)
    _assert_same(_vlp_embed(pretrained, pixels, CLASSES), expected)
    out = export_pretrained(pretrained, "open_clip", tmp_path / "export")
    reloaded, _, _ = open_clip.create_model_and_transforms(f"local-dir:{out}")
    _assert_same(_embed(reloaded.eval(), pixels, ids), expected)


def test_clip_bpe_tokenizer_matches_open_clip():
    """vlp rebuilds open_clip's tokenizer from the vocabulary its package ships: same ids, same padding."""
    pretrained_tokenizer = vlp.convert.tokenizers.open_clip_bpe(vlp.convert.tokenizers.find_open_clip_vocab())
    reference = open_clip.get_tokenizer("ViT-B-32")
    texts = varied_strings(300)
    ids, _ = pretrained_tokenizer(texts)
    assert len(ids.unique()) > 150
    mismatched = [t for t, a, b in zip(texts, ids, reference(texts)) if not torch.equal(a, b)]
    assert not mismatched, mismatched[:3]
    assert (
        pretrained_tokenizer.decode(ids[3].tolist())
        == reference.decode(reference(texts[3])[0].tolist())
        .split("<end_of_text>")[0]
        .replace("<start_of_text>", "")
        .strip()
    )


@pytest.fixture
def spm_tokenizer(tmp_path):
    return train_siglip_spm(tmp_path / "spiece.model", varied_strings(300) + CLASSES * 5, vocab_size=300)


def test_open_clip_timm_siglip_parity_and_export_to_transformers(tmp_path, spm_tokenizer):
    """ViT-B-16-SigLIP: timm's MAP-pooled ViT under `visual.trunk`, the text tower under `text.`."""
    transformers = pytest.importorskip("transformers")
    reference, model_cfg = _reference("ViT-B-16-SigLIP")
    (tmp_path / "cfg.json").write_text(json.dumps(model_cfg))
    save_file(reference.state_dict(), str(tmp_path / "w.safetensors"))
    pretrained = vlp.load(tmp_path / "w.safetensors", config=tmp_path / "cfg.json", tokenizer=spm_tokenizer)
    assert pretrained.config.vision.pool == "map" and pretrained.tokenizer.clean == "canonicalize"
    pixels = _pixels(2)
    ids = pretrained.tokenizer(CLASSES)[0]
    expected = _embed(reference, pixels, ids)
    _assert_same(_vlp_embed(pretrained, pixels, CLASSES), expected)

    out = export_pretrained(pretrained, "open_clip", tmp_path / "export")
    reloaded, _, _ = open_clip.create_model_and_transforms(f"local-dir:{out}")
    _assert_same(_embed(reloaded.eval(), pixels, ids), expected)

    hf = transformers.SiglipModel.from_pretrained(export_pretrained(pretrained, "hf", tmp_path / "hf")).eval()
    with torch.no_grad():
        result = hf(input_ids=ids, pixel_values=pixels)
    torch.testing.assert_close(result.logits_per_image, expected[2], atol=ATOL, rtol=0)
