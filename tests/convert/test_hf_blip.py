"""Hugging Face BLIP interop: random-weight reference models of the real BLIP-base shapes (ViT-B/16, a
12-layer BERT-base text side, vocabulary 30,524) loaded into vlp give the same embeddings, ITM logits,
greedy and beam captions and VQA answers; vlp models export back and load in transformers. The default
run checks the same widths with 2 layers per tower; `make test-slow` adds all 12."""

import json

import pytest
import torch

from text_samples import varied_strings
from vlp.assets import IMAGE, TEXT, Assets
from vlp.assets.tokenizer import TokenizerConfig, train_tokenizer
from vlp.cli import main
from vlp.convert import export_pretrained, load_pretrained
from vlp.generation import GenerationConfig, generate
from vlp.models.blip import Blip, BlipVqa

transformers = pytest.importorskip("transformers")

BASE_TEXT = {
    "vocab_size": 30524, "hidden_size": 768, "encoder_hidden_size": 768, "intermediate_size": 3072,
    "num_hidden_layers": 12, "num_attention_heads": 12, "max_position_embeddings": 512, "bos_token_id": 30522,
    "sep_token_id": 102, "pad_token_id": 0, "eos_token_id": 2,
}  # fmt: skip
BASE_VISION = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
               "image_size": 224, "patch_size": 16, "layer_norm_eps": 1e-6}  # fmt: skip


@pytest.fixture(scope="module")
def bert_vocab(tmp_path_factory):
    """A BERT-layout vocabulary of 30,522 tokens (a trained WordPiece padded with unused slots), as
    bert-base-uncased lays it out, plus BLIP's [DEC] and [ENC]."""
    folder = tmp_path_factory.mktemp("bert_vocab")
    trained = train_tokenizer(varied_strings(300), TokenizerConfig(kind="wordpiece", vocab_size=600))
    words = [t for t, _ in sorted(trained.backend.get_vocab().items(), key=lambda i: i[1]) if not t.startswith("[")]
    tokens = ["[PAD]"] + [f"[unused{i}]" for i in range(99)] + ["[UNK]", "[CLS]", "[SEP]", "[MASK]"] + words
    tokens += [f"[unused{i}]" for i in range(99, 99 + 30522 - len(tokens))]
    (folder / "vocab.txt").write_text("\n".join(tokens) + "\n")
    tokenizer = transformers.BertTokenizer.from_pretrained(folder, bos_token="[DEC]",
                                                           additional_special_tokens=["[ENC]"])  # fmt: skip
    assert tokenizer.convert_tokens_to_ids(["[DEC]", "[ENC]"]) == [30522, 30523]
    return tokenizer


@pytest.fixture(params=[2, pytest.param(12, marks=pytest.mark.slow)], ids=lambda n: f"{n}-layers")
def layers(request) -> int:
    """Blocks per tower of the reference models."""
    return request.param


def _reference(cls, folder, bert_vocab, layers: int, *, seed: int = 0):
    torch.manual_seed(seed)
    config = transformers.BlipConfig(text_config={**BASE_TEXT, "num_hidden_layers": layers},
                                     vision_config={**BASE_VISION, "num_hidden_layers": layers})  # fmt: skip
    model = cls(config).eval()
    with torch.no_grad():
        for module in model.modules():  # HF initialises LayerNorms to identity: make them matter
            if isinstance(module, torch.nn.LayerNorm):
                module.weight.normal_(1.0, 0.2)
                module.bias.normal_(0.0, 0.2)
        if hasattr(model, "text_decoder"):
            # Random weights rarely end a caption: favour [SEP] so that lengths and beams differ.
            model.text_decoder.cls.predictions.bias[102] += 4.0
    model.save_pretrained(folder)
    bert_vocab.save_pretrained(folder)
    return model


def _pixels(n: int = 2):
    return torch.randn(n, 3, 224, 224, generator=torch.Generator().manual_seed(5))


def _ids(tokenizer, texts, first: int):
    ids, mask = tokenizer(texts)
    ids = ids.clone()
    ids[:, 0] = first
    return ids, mask


def test_retrieval_embeddings_and_itm_logits_match(tmp_path, bert_vocab, layers):
    reference = _reference(transformers.BlipForImageTextRetrieval, tmp_path / "hf", bert_vocab, layers)
    pretrained = load_pretrained(tmp_path / "hf")
    model = pretrained.model
    assert isinstance(model, Blip) and model.cfg.text.enc_token_id == 30523 and model.cfg.vision.norm_eps == 1e-6
    texts = ["a photo of a red square", "two small blue circles on the left"]
    pixels = _pixels()
    # BLIP reads [ENC] first for ITM; HF passes the ids through, so it gets them [ENC]-first too.
    ids, mask = _ids(pretrained.tokenizer, texts, 30523)
    with torch.no_grad():
        hf_itm = reference(input_ids=ids, pixel_values=pixels, attention_mask=mask, use_itm_head=True).itm_score
        cls_ids, _ = _ids(pretrained.tokenizer, texts, 101)
        hf_cosine = reference(input_ids=cls_ids, pixel_values=pixels, attention_mask=mask, use_itm_head=False).itm_score
        tokens = model.encode_image_tokens(pixels)[1]
        torch.testing.assert_close(model.itm_logits(ids, mask, tokens), hf_itm, atol=1e-4, rtol=1e-4)
        cosine = model.encode_image(pixels) @ model.encode_text(cls_ids, mask).T
        torch.testing.assert_close(cosine, hf_cosine, atol=1e-4, rtol=1e-4)
    # ... and back: vlp's export loads in transformers with the same weights.
    export_pretrained(pretrained, "hf", tmp_path / "back", architecture="BlipForImageTextRetrieval")
    again = transformers.BlipForImageTextRetrieval.from_pretrained(tmp_path / "back").eval()
    with torch.no_grad():
        out = again(input_ids=ids, pixel_values=pixels, attention_mask=mask, use_itm_head=True).itm_score
    torch.testing.assert_close(out, hf_itm, atol=1e-5, rtol=1e-5)


def _hf_caption_ids(reference, pixels, **options):
    with torch.no_grad():
        out = reference.generate(pixel_values=pixels, do_sample=False, **options)
    rows = []
    for row in out[:, 1:].tolist():  # drop [DEC]
        rows.append(row[: row.index(102)] if 102 in row else [t for t in row if t != 0])
    return rows


def test_greedy_and_beam_captions_match_transformers(tmp_path, bert_vocab, layers):
    reference = _reference(transformers.BlipForConditionalGeneration, tmp_path / "hf", bert_vocab, layers)
    pretrained = load_pretrained(tmp_path / "hf")
    model = pretrained.model
    pixels = _pixels(3)
    with torch.no_grad():
        tokens = model.encode_image_tokens(pixels)[1]
    empty = torch.zeros(3, 0, dtype=torch.long)
    for options, ours in (
        ({"max_new_tokens": 12}, GenerationConfig(method="greedy", max_new_tokens=12, min_new_tokens=0)),
        ({"max_new_tokens": 12, "num_beams": 3}, GenerationConfig(method="beam", max_new_tokens=12, min_new_tokens=0)),
        ({"max_new_tokens": 12, "num_beams": 3, "min_new_tokens": 5},
         GenerationConfig(method="beam", max_new_tokens=12, min_new_tokens=5)),
    ):  # fmt: skip
        expected = _hf_caption_ids(reference, pixels, **options)
        got = generate(model.caption_decoder(tokens), empty, ours)
        assert got == expected, (options, got, expected)
    assert len({len(e) for e in expected}) > 1 or any(len(e) < 12 for e in expected)  # some captions ended
    # The LM head is the decoder's word embeddings, tied, as in the checkpoint.
    torch.testing.assert_close(model.lm_head.decoder.weight, model.text.word_embeddings.weight)

    out = tmp_path / "back"
    assert main(["convert", str(tmp_path / "hf"), "--to", "hf", "--out", str(out)]) == 0
    assert json.loads((out / "config.json").read_text())["architectures"] == ["BlipForConditionalGeneration"]
    again = transformers.BlipForConditionalGeneration.from_pretrained(out).eval()
    assert _hf_caption_ids(again, pixels, max_new_tokens=12, num_beams=3) == _hf_caption_ids(
        reference, pixels, max_new_tokens=12, num_beams=3
    )


def test_vqa_answers_match_transformers(tmp_path, bert_vocab, layers):
    reference = _reference(transformers.BlipForQuestionAnswering, tmp_path / "hf", bert_vocab, layers)
    pretrained = load_pretrained(tmp_path / "hf")
    model = pretrained.model
    assert isinstance(model, BlipVqa) and pretrained.family.name == "blip_vqa"
    pixels = _pixels(2)
    # Questions of one length: HF attends to every question position (original BLIP masks padding).
    ids = torch.randint(1000, 30000, (2, 9), generator=torch.Generator().manual_seed(2))
    ids[:, 0], ids[:, -1] = 30523, 102
    mask = torch.ones_like(ids)
    with torch.no_grad():
        hf = reference.generate(input_ids=ids, pixel_values=pixels, attention_mask=mask, num_beams=3,
                                max_new_tokens=6, do_sample=False)  # fmt: skip
        states = model.encode_question(pixels, ids, mask)
        ours = generate(model.answer_decoder_for(states, mask), ids[:, :0],
                        GenerationConfig(method="beam", max_new_tokens=6, min_new_tokens=0))  # fmt: skip
    expected = [row[: row.index(102)] if 102 in row else [t for t in row if t != 0] for row in hf[:, 1:].tolist()]
    assert ours == expected
    export_pretrained(pretrained, "hf", tmp_path / "back")
    again = transformers.BlipForQuestionAnswering.from_pretrained(tmp_path / "back").eval()
    with torch.no_grad():
        assert torch.equal(again.generate(input_ids=ids, pixel_values=pixels, attention_mask=mask, num_beams=3,
                                          max_new_tokens=6, do_sample=False), hf)  # fmt: skip


def test_a_vlp_blip_exports_to_both_heads(trained_blip, tmp_path, bert_vocab):
    """A vlp BLIP whose decoder has its own self-attention (the paper's sharing) is written as a captioning
    and as a retrieval folder; transformers reproduces its captions and ITM logits. A ConvNet image tower
    has no HF equivalent and is refused with the reason."""
    from vlp.assets.image import ImageConfig
    from vlp.checkpoint import Pretrained, load_checkpoint
    from vlp.convert import ConversionError
    from vlp.convert.tokenizers import tokenizer_from_path
    from vlp.models.blip import BlipConfig
    from vlp.registry import FAMILIES
    from vlp.towers import BertTextConfig, VisionConfig

    with pytest.raises(ConversionError, match="ViT"):
        export_pretrained(load_checkpoint(trained_blip), "hf", tmp_path / "x")
    torch.manual_seed(3)
    vision = VisionConfig(image_size=32, patch_size=8, width=48, layers=2, heads=4, norm_eps=1e-6, ln_pre=False,
                          patch_bias=True)  # fmt: skip
    text = BertTextConfig(vocab_size=30524, context_length=40, width=48, layers=2, heads=4)
    cfg = BlipConfig(vision=vision, text=text, embed_dim=16)
    model = Blip(cfg).eval()
    with torch.no_grad():
        model.lm_head.decoder.bias[102] += 3.0
    bert_vocab.save_pretrained(tmp_path / "tok")
    tokenizer = tokenizer_from_path(tmp_path / "tok", context_length=16)
    pretrained = Pretrained(
        FAMILIES["blip"], cfg, model, Assets({TEXT: tokenizer}, {IMAGE: ImageConfig(size=32, resize_mode="squash")}),
        tmp_path,
    )
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    ids, mask = _ids(tokenizer, ["a red square", "two blue circles"], 30523)
    export_pretrained(pretrained, "hf", tmp_path / "cap")
    export_pretrained(pretrained, "hf", tmp_path / "itm", architecture="BlipForImageTextRetrieval")
    captioner = transformers.BlipForConditionalGeneration.from_pretrained(tmp_path / "cap").eval()
    matcher = transformers.BlipForImageTextRetrieval.from_pretrained(tmp_path / "itm").eval()
    with torch.no_grad():
        tokens = model.encode_image_tokens(pixels)[1]
        ours = generate(
            model.caption_decoder(tokens), ids[:, :0], GenerationConfig(max_new_tokens=10, min_new_tokens=0)
        )
        itm = matcher(input_ids=ids, pixel_values=pixels, attention_mask=mask, use_itm_head=True).itm_score
        torch.testing.assert_close(itm, model.itm_logits(ids, mask, tokens), atol=1e-4, rtol=1e-4)
    assert _hf_caption_ids(captioner, pixels, max_new_tokens=10, num_beams=3) == ours
    assert not json.loads((tmp_path / "cap" / "config.json").read_text())["tie_word_embeddings"]
