"""Interop with transformers: random-weight CLIPModel / SiglipModel of the real shapes, loaded by vlp,
compared, exported back and compared again; reference tokenizers; errors that name the problem.

open_clip's side runs in its own environment: tests/test_open_clip.py, `make interop`.
"""

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

import vlp
from text_samples import train_siglip_spm, varied_strings
from vlp.assets import IMAGE, TEXT, Assets
from vlp.assets.image import ImageConfig
from vlp.assets.tokenizer import TokenizerConfig, train_tokenizer
from vlp.checkpoint import CheckpointError, save_checkpoint
from vlp.cli import main
from vlp.convert import ConversionError, export_pretrained
from vlp.convert.tokenizers import hf_tokenizer, tokenizer_from_path
from vlp.models.clip import DualEncoder, DualEncoderConfig
from vlp.registry import FAMILIES
from vlp.towers import ConvNetConfig, TextConfig, VisionConfig

transformers = pytest.importorskip("transformers")

ATOL = 1e-4
CLASSES = ["a photo of a dog.", "a red circle", "two cats on a sofa", "an x-ray of a hand", "the city at night"]


@pytest.fixture(scope="module")
def siglip_spm(tmp_path_factory):
    """A SentencePiece unigram model laid out as SigLIP's (eos = pad = </s>, no bos)."""
    path = tmp_path_factory.mktemp("spm") / "spiece.model"
    return train_siglip_spm(path, varied_strings(400, seed=2) + CLASSES * 5, vocab_size=400)


def _hf_clip(act: str = "quick_gelu", large: bool = False):
    if large:  # ViT-L/14
        text = {"hidden_size": 768, "intermediate_size": 3072, "num_attention_heads": 12, "hidden_act": act}
        vision = {
            "hidden_size": 1024,
            "intermediate_size": 4096,
            "num_hidden_layers": 24,
            "num_attention_heads": 16,
            "patch_size": 14,
            "hidden_act": act,
        }
        config = transformers.CLIPConfig(text_config=text, vision_config=vision, projection_dim=768)
    else:  # ViT-B/32, the config defaults
        config = transformers.CLIPConfig(text_config={"hidden_act": act}, vision_config={"hidden_act": act})
    return transformers.CLIPModel(config).eval()


def _save_reference(model, folder, clip_vocab=None, spm=None, **save_options):
    model.save_pretrained(folder, **save_options)
    if clip_vocab is not None:
        for name in ("vocab.json", "merges.txt"):
            shutil.copy(clip_vocab / name, folder / name)
    if spm is not None:
        shutil.copy(spm, folder / "spiece.model")
        (folder / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 64}))
    return folder


def _images(n: int = 3, size: int = 224) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(0))


def _compare(ref, pretrained, pixels, texts, *, siglip: bool):
    ids, mask = pretrained.tokenizer(texts)
    with torch.no_grad():
        expected = ref(input_ids=ids, pixel_values=pixels)
        ours = pretrained.model(pixels, ids, mask)
    logits = ours.logit_scale * ours.image_features @ ours.text_features.T
    if siglip:
        logits = logits + ours.logit_bias
    torch.testing.assert_close(ours.image_features, expected.image_embeds, atol=ATOL, rtol=0)
    torch.testing.assert_close(ours.text_features, expected.text_embeds, atol=ATOL, rtol=0)
    torch.testing.assert_close(logits, expected.logits_per_image, atol=ATOL, rtol=0)
    # zero-shot predictions over the class prompts agree
    assert torch.equal(logits.argmax(dim=1), expected.logits_per_image.argmax(dim=1))
    return expected


@pytest.mark.parametrize("act", ["quick_gelu", "gelu"])
def test_hf_clip_vit_b32_parity_both_ways(tmp_path, clip_vocab, act):
    torch.manual_seed(0)
    ref = _hf_clip(act)
    folder = _save_reference(ref, tmp_path / "hf", clip_vocab=clip_vocab)
    pretrained = vlp.load(folder)
    cfg = pretrained.config
    assert (cfg.vision.width, cfg.vision.layers, cfg.vision.patch_size, cfg.text.width, cfg.embed_dim) == (
        768,
        12,
        32,
        512,
        512,
    )
    assert cfg.vision.act == cfg.text.act == act and cfg.text.eot_token_id == 49407
    expected = _compare(ref, pretrained, _images(), CLASSES, siglip=False)

    out = export_pretrained(pretrained, "hf", tmp_path / "back")
    reloaded = transformers.CLIPModel.from_pretrained(out).eval()
    ids, _ = pretrained.tokenizer(CLASSES)
    with torch.no_grad():
        again = reloaded(input_ids=ids, pixel_values=_images())
    torch.testing.assert_close(again.logits_per_image, expected.logits_per_image, atol=ATOL, rtol=0)
    hf_ids = transformers.AutoTokenizer.from_pretrained(out)(
        CLASSES, padding="max_length", max_length=77, truncation=True, return_tensors="pt"
    ).input_ids
    assert torch.equal(hf_ids, ids)


@pytest.mark.slow  # ~40 s on 2 cores; the B/32 tests above check the same mapping at full size by default
def test_hf_clip_vit_l14_parity(tmp_path, clip_vocab):
    torch.manual_seed(0)
    ref = _hf_clip(large=True)
    pretrained = vlp.load(_save_reference(ref, tmp_path / "hf", clip_vocab=clip_vocab))
    assert (pretrained.config.vision.width, pretrained.config.vision.layers, pretrained.config.vision.heads) == (
        1024,
        24,
        16,
    )
    _compare(ref, pretrained, _images(2), CLASSES[:3], siglip=False)
    del ref
    out = export_pretrained(pretrained, "hf", tmp_path / "back")
    assert json.loads((out / "config.json").read_text())["vision_config"]["patch_size"] == 14
    weights = load_file(str(out / "model.safetensors"))
    assert weights["vision_model.encoder.layers.23.self_attn.v_proj.weight"].shape == (1024, 1024)


def test_hf_siglip_base_patch16_parity_both_ways(tmp_path, siglip_spm):
    torch.manual_seed(0)
    ref = transformers.SiglipModel(transformers.SiglipConfig()).eval()  # base patch16 224, MAP head
    folder = _save_reference(ref, tmp_path / "hf", spm=siglip_spm)
    (folder / "preprocessor_config.json").write_text(
        json.dumps(
            {
                "image_processor_type": "SiglipImageProcessor",
                "size": {"height": 224, "width": 224},
                "resample": 3,
                "image_mean": [0.5] * 3,
                "image_std": [0.5] * 3,
            }
        )
    )
    pretrained = vlp.load(folder)
    cfg = pretrained.config
    assert cfg.vision.pool == "map" and not cfg.vision.class_token and cfg.text.pool == "last"
    assert pretrained.image_config.resize_mode == "squash" and pretrained.image_config.mean == (0.5, 0.5, 0.5)
    assert pretrained.tokenizer.context_length == 64
    expected = _compare(ref, pretrained, _images(), CLASSES, siglip=True)

    out = export_pretrained(pretrained, "hf", tmp_path / "back")
    reloaded = transformers.SiglipModel.from_pretrained(out).eval()
    ids, _ = pretrained.tokenizer(CLASSES)
    with torch.no_grad():
        again = reloaded(input_ids=ids, pixel_values=_images())
    torch.testing.assert_close(again.logits_per_image, expected.logits_per_image, atol=ATOL, rtol=0)


def test_clip_bpe_tokenizer_matches_transformers(clip_vocab):
    reference = transformers.CLIPTokenizer.from_pretrained(clip_vocab)
    ours = hf_tokenizer(clip_vocab, context_length=77, model_type="clip")
    texts = varied_strings(300)
    expected = reference(texts, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    ids, mask = ours(texts)
    assert len(ids.unique()) > 200  # a real vocabulary at work, not everything unknown
    assert torch.equal(ids, expected.input_ids)
    assert torch.equal(mask, expected.attention_mask)
    assert ids[texts.index("word " * 200), -1] == 49407  # truncated text still ends with end-of-text


def test_sentencepiece_tokenizer_matches_transformers_siglip(siglip_spm):
    reference = transformers.SiglipTokenizer.from_pretrained(siglip_spm.parent)
    ours = tokenizer_from_path(siglip_spm, context_length=64)
    texts = varied_strings(300)
    expected = reference(texts, padding="max_length", max_length=64, truncation=True, return_tensors="pt")
    ids, _ = ours(texts)
    assert len(ids.unique()) > 100
    mismatched = [t for t, a, b in zip(texts, ids, expected.input_ids) if not torch.equal(a, b)]
    assert not mismatched, mismatched[:3]


def test_preprocessing_matches_transformers_image_processors():
    from vlp.assets.image import ImageTransform

    rng = np.random.default_rng(0)
    for shape in [(300, 400, 3), (401, 299, 3), (100, 150, 3)]:
        image = Image.fromarray((rng.random(shape) * 255).astype("uint8"))
        clip = transformers.CLIPImageProcessor()(image, return_tensors="pt").pixel_values[0]
        torch.testing.assert_close(ImageTransform(ImageConfig(size=224))(image), clip, atol=1e-5, rtol=0)
        siglip = transformers.SiglipImageProcessor()(image, return_tensors="pt").pixel_values[0]
        squash = ImageConfig(size=224, mean=(0.5,) * 3, std=(0.5,) * 3, resize_mode="squash")
        torch.testing.assert_close(ImageTransform(squash)(image), siglip, atol=1e-5, rtol=0)


def _vlp_model(tmp_path, siglip: bool):
    """A small vlp dual encoder with its own trained tokenizer, saved as a vlp checkpoint."""
    tokenizer = train_tokenizer(
        varied_strings(200) + CLASSES,
        TokenizerConfig(
            vocab_size=300,
            context_length=16,
            bos_token=None if siglip else "<start_of_text>",
            pad_token="<end_of_text>" if siglip else "<pad>",
        ),
    )
    vision = VisionConfig(
        image_size=32,
        patch_size=8,
        width=64,
        layers=2,
        heads=4,
        act="gelu",
        class_token=not siglip,
        pool="map" if siglip else "cls",
        patch_bias=siglip,
        ln_pre=not siglip,
    )
    text = TextConfig(
        vocab_size=300,
        context_length=16,
        width=48,
        layers=2,
        heads=4,
        causal=not siglip,
        pool="last" if siglip else "eot",
    )
    cfg = DualEncoderConfig(
        embed_dim=64 if siglip else 32,
        vision=vision,
        text=text,
        init_logit_bias=-10.0 if siglip else None,
        vision_projection=not siglip,
        text_projection_bias=siglip,
    )
    torch.manual_seed(0)
    model = DualEncoder(cfg).eval()
    for p in model.parameters():  # move off the init so every tensor's mapping is exercised
        p.data.add_(torch.randn_like(p) * 0.02)
    return save_checkpoint(
        tmp_path / "vlp",
        family=FAMILIES["clip"],
        model_config=cfg,
        model=model,
        assets=Assets({TEXT: tokenizer}, {IMAGE: ImageConfig(size=32)}),
    )


@pytest.mark.parametrize("siglip", [False, True], ids=["clip", "siglip"])
def test_vlp_trained_model_exports_to_transformers_and_back(tmp_path, siglip):
    source = vlp.load(_vlp_model(tmp_path, siglip))
    assert main(["convert", str(source.path), "--to", "hf", "--out", str(tmp_path / "hf")]) == 0
    reference_cls = transformers.SiglipModel if siglip else transformers.CLIPModel
    reference = reference_cls.from_pretrained(tmp_path / "hf").eval()
    _compare(reference, source, _images(2, 32), CLASSES, siglip=siglip)
    hf_tokens = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")(
        CLASSES, padding="max_length", max_length=16, truncation=True, return_tensors="pt"
    ).input_ids
    assert torch.equal(hf_tokens, source.tokenizer(CLASSES)[0])
    # every --checkpoint command takes the exported folder as it is
    assert (
        main(["embed", "--checkpoint", str(tmp_path / "hf"), "--texts", *CLASSES, "--out", str(tmp_path / "t.npy")])
        == 0
    )
    embedded = torch.from_numpy(np.load(tmp_path / "t.npy"))
    torch.testing.assert_close(
        embedded, source.model.encode_text(*source.tokenizer(CLASSES)).detach(), atol=1e-5, rtol=0
    )
    # and back into vlp, through the Hugging Face folder
    assert main(["convert", str(tmp_path / "hf"), "--to", "vlp", "--out", str(tmp_path / "again")]) == 0
    again = vlp.load(tmp_path / "again")
    pixels, (ids, mask) = _images(2, 32), source.tokenizer(CLASSES)
    with torch.no_grad():
        a, b = source.model(pixels, ids, mask), again.model(pixels, ids, mask)
    torch.testing.assert_close(a.image_features, b.image_features, atol=1e-6, rtol=0)
    torch.testing.assert_close(a.text_features, b.text_features, atol=1e-6, rtol=0)


def _tiny_hf_clip(folder, clip_vocab):
    config = transformers.CLIPConfig(
        text_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2},
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "image_size": 32,
            "patch_size": 16,
        },
        projection_dim=16,
    )
    return _save_reference(transformers.CLIPModel(config), folder, clip_vocab=clip_vocab)


def test_sharded_and_pickled_hf_folders_load_the_same(tmp_path, clip_vocab):
    torch.manual_seed(0)
    folder = _tiny_hf_clip(tmp_path / "one", clip_vocab)
    expected = vlp.load(folder).model.state_dict()
    reference = transformers.CLIPModel.from_pretrained(folder)
    sharded = _save_reference(reference, tmp_path / "sharded", clip_vocab=clip_vocab, max_shard_size="20KB")
    assert (sharded / "model.safetensors.index.json").is_file()
    pickled = shutil.copytree(folder, tmp_path / "bin")
    torch.save(load_file(str(pickled / "model.safetensors")), pickled / "pytorch_model.bin")
    (pickled / "model.safetensors").unlink()
    for other in (sharded, pickled):
        state = vlp.load(other).model.state_dict()
        assert all(torch.equal(state[k], v) for k, v in expected.items())


def test_wordpiece_tokenizer_matches_transformers_bert(tmp_path):
    texts = varied_strings(300)
    trained = train_tokenizer(texts, TokenizerConfig(kind="wordpiece", vocab_size=500, context_length=32))
    vocab = sorted(trained.backend.get_vocab().items(), key=lambda item: item[1])
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [t for t, _ in vocab if not t.startswith("<")]
    (tmp_path / "vocab.txt").write_text("\n".join(tokens) + "\n")
    reference = transformers.BertTokenizer.from_pretrained(tmp_path)
    ours = tokenizer_from_path(tmp_path, context_length=32)
    expected = reference(texts, padding="max_length", max_length=32, truncation=True, return_tensors="pt")
    ids, mask = ours(texts)
    assert len(ids.unique()) > 100
    mismatched = [t for t, a, b in zip(texts, ids, expected.input_ids, strict=True) if not torch.equal(a, b)]
    assert not mismatched, mismatched[:3]
    assert torch.equal(mask, expected.attention_mask)


def test_wrong_folder_kind_is_named(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(CheckpointError, match="model_type 'bert'"):
        vlp.load(tmp_path)
    with pytest.raises(CheckpointError, match="not a checkpoint vlp knows"):
        vlp.load(tmp_path / "..")


def test_missing_tensor_and_shape_mismatch_are_named(tmp_path, clip_vocab):
    folder = _tiny_hf_clip(tmp_path / "hf", clip_vocab)
    weights = load_file(str(folder / "model.safetensors"))
    missing = {k: v for k, v in weights.items() if k != "text_model.final_layer_norm.bias"}
    save_file(missing, str(folder / "model.safetensors"))
    with pytest.raises(CheckpointError, match="missing tensor.*text_model.final_layer_norm.bias"):
        vlp.load(folder)
    weights["visual_projection.weight"] = torch.zeros(16, 24)
    save_file(weights, str(folder / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"'visual_projection.weight' has shape \(16, 24\).*expects \(16, 32\)"):
        vlp.load(folder)


class _Payload:
    def __reduce__(self):
        return (print, ("pickled code ran",))


def test_pickled_code_is_never_run(tmp_path, capsys):
    path = tmp_path / "model.pt"
    torch.save({"state_dict": {"logit_scale": torch.zeros(())}, "payload": _Payload()}, path)
    (tmp_path / "cfg.json").write_text(json.dumps({"embed_dim": 8}))
    with pytest.raises(CheckpointError, match="holds Python objects besides tensors and numbers"):
        vlp.load(path, config=tmp_path / "cfg.json")
    assert "pickled code ran" not in capsys.readouterr().out
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), tmp_path / "jit.pt")
    with pytest.raises(CheckpointError, match="TorchScript archive"):
        vlp.load(tmp_path / "jit.pt", config=tmp_path / "cfg.json")


def test_models_without_a_foreign_layout_are_refused(tmp_path):
    cfg = DualEncoderConfig(
        embed_dim=16,
        vision=ConvNetConfig(image_size=32, channels=[8, 8, 8, 8]),
        text=TextConfig(vocab_size=300, context_length=16, width=32, layers=1, heads=2),
    )
    tokenizer = train_tokenizer(CLASSES * 4, TokenizerConfig(vocab_size=300, context_length=16))
    folder = save_checkpoint(
        tmp_path / "vlp",
        family=FAMILIES["clip"],
        model_config=cfg,
        model=DualEncoder(cfg),
        assets=Assets({TEXT: tokenizer}, {IMAGE: ImageConfig(size=32)}),
    )
    with pytest.raises(ConversionError, match="only ViT towers"):
        export_pretrained(vlp.load(folder), "hf", tmp_path / "hf")
    assert main(["convert", str(folder), "--to", "open_clip", "--out", str(tmp_path / "oc")]) == 2
    cfg.vision = VisionConfig(image_size=32, patch_size=8, width=32, layers=1, heads=2, stem_channels=[8, 8, 8])
    folder = save_checkpoint(tmp_path / "vlp-stem", family=FAMILIES["clip"], model_config=cfg, model=DualEncoder(cfg),
                             assets=Assets({TEXT: tokenizer}, {IMAGE: ImageConfig(size=32)}))
    for to in ("hf", "open_clip"):
        with pytest.raises(ConversionError, match="convolutional stem"):
            export_pretrained(vlp.load(folder), to, tmp_path / to)


def test_convert_never_deletes_what_it_did_not_write(tmp_path, capsys):
    source = _vlp_model(tmp_path, siglip=False)
    run = tmp_path / "run"  # a training run's folder, with the user's notes beside it
    (run / "checkpoints" / "step_00000010").mkdir(parents=True)
    (run / "checkpoints" / "step_00000010" / "model.safetensors").write_bytes(b"weights")
    (run / "metrics.jsonl").write_text('{"step": 10}\n')
    (run / "notes.txt").write_text("mine")
    before = sorted(str(p.relative_to(run)) for p in run.rglob("*"))
    for fmt in ("vlp", "hf", "open_clip"):
        assert main(["convert", str(source), "--to", fmt, "--out", str(run)]) == 2
        assert f"--out {run} is not empty and holds no {fmt} checkpoint: pass --overwrite" in capsys.readouterr().err
        assert sorted(str(p.relative_to(run)) for p in run.rglob("*")) == before
    assert main(["convert", str(source), "--to", "vlp", "--out", str(run), "--overwrite"]) == 0
    assert (run / "notes.txt").read_text() == "mine" and (run / "metrics.jsonl").is_file()
    assert (run / "checkpoints" / "step_00000010" / "model.safetensors").read_bytes() == b"weights"
    assert vlp.load(run).path == run  # the checkpoint files were written beside them
    # A folder that holds a vlp checkpoint is one to replace: its other files stay; stale training state goes.
    (run / "state.json").write_text('{"step": 3}')
    assert main(["convert", str(source), "--to", "vlp", "--out", str(run)]) == 0
    assert not (run / "state.json").exists() and (run / "notes.txt").read_text() == "mine"
    assert not list(tmp_path.glob(".tmp-*"))
