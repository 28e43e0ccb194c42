"""BLIP: the three text modes, encoder-decoder sharing, ITM negatives, the LM loss, and a run that learns."""

import json
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from conftest import BLIP_TINY, free_port, tiny_run_overrides
from vlp.checkpoint import load_checkpoint
from vlp.cli import main
from vlp.config import ConfigError
from vlp.generation import GenerationConfig, generate
from vlp.losses import identical_texts, itm_negatives, lm_loss, sample_negatives
from vlp.models.blip import Blip, BlipConfig
from vlp.objectives.blip import BlipObjective, BlipObjectiveConfig
from vlp.tasks import GivenFunctions
from vlp.tasks.captioning import CaptioningEvalConfig, CaptionPredictor, evaluate_captioning
from vlp.towers import BertTextConfig, VisionConfig
from vlp.train.config import load_run_config
from vlp.train.loop import train


def tiny_blip(share: str = "all_but_self_attention", **extra) -> Blip:
    torch.manual_seed(0)
    vision = VisionConfig(image_size=16, patch_size=8, width=32, layers=1, heads=2)
    text = BertTextConfig(
        vocab_size=40,
        context_length=12,
        width=24,
        layers=2,
        heads=2,
        share=share,
        pad_token_id=0,
        eos_token_id=3,
        enc_token_id=4,
        dec_token_id=5,
    )
    return Blip(BlipConfig(vision=vision, text=text, embed_dim=16, **extra)).eval()


def _inputs(n: int = 3):
    g = torch.Generator().manual_seed(1)
    text = torch.randint(6, 40, (n, 10), generator=g)
    text[:, 0] = 2
    mask = torch.ones(n, 10, dtype=torch.long)
    mask[0, 7:] = 0
    text[0, 7:] = 0
    return torch.randn(n, 3, 16, 16, generator=g), text, mask


def test_text_modes_attend_as_the_paper_says():
    model = tiny_blip()
    images, text, mask = _inputs()
    _, tokens = model.encode_image_tokens(images)
    other_tokens = model.encode_image_tokens(torch.randn_like(images))[1]
    changed = text.clone()
    changed[:, 6] = 7
    with torch.no_grad():
        # Unimodal: bidirectional (a later token changes earlier states), blind to the image.
        a, b = model.text(text, mask, mode="text"), model.text(changed, mask, mode="text")
        assert not torch.allclose(a[:, :6], b[:, :6])
        torch.testing.assert_close(model.encode_text(text, mask), F.normalize(model.text_proj(a[:, 0]), dim=-1))
        # Decoder: causal, and grounded in the image.
        a = model.decoder_states(text, mask, tokens)
        torch.testing.assert_close(a[:, :6], model.decoder_states(changed, mask, tokens)[:, :6])
        assert not torch.allclose(a, model.decoder_states(text, mask, other_tokens))
        # Image-grounded encoder: reads [ENC] first, whatever the first token was.
        itm = model.itm_logits(text, mask, tokens)
        relabelled = text.clone()
        relabelled[:, 0] = 9
        torch.testing.assert_close(model.itm_logits(relabelled, mask, tokens), itm)
        assert not torch.allclose(model.itm_logits(text, mask, other_tokens), itm)


def test_sharing_options_are_the_papers_ablation():
    counts = {
        share: sum(p.numel() for p in tiny_blip(share).parameters())
        for share in ("all", "all_but_self_attention", "none")
    }
    assert counts["all"] < counts["all_but_self_attention"] < counts["none"]
    model = tiny_blip()
    layer = model.text.layers[0]
    assert layer.decoder_attn is not None and model.text_decoder is None
    # The decoder's own self-attention gets gradient from the LM path only; the shared MLP from both.
    images, text, mask = _inputs()
    _, tokens = model.encode_image_tokens(images)
    model.lm_logits(text, mask, tokens).sum().backward()
    assert layer.decoder_attn.qkv_proj.weight.grad is not None and layer.attn.qkv_proj.weight.grad is None
    assert layer.mlp.fc1.weight.grad is not None


def test_negatives_are_never_the_positive_and_follow_similarity():
    g = torch.Generator().manual_seed(0)
    similarity = torch.zeros(4, 8)
    similarity[:, 7] = 20.0  # one column far more similar than the rest
    for offset in (0, 4):  # rows are the local batch at `offset` within the gathered 8
        hard = torch.stack([sample_negatives(similarity, offset, True, g) for _ in range(200)])
        positives = torch.arange(4) + offset
        assert not (hard == positives).any()
        rows_without_7 = positives != 7
        assert (hard[:, rows_without_7] == 7).float().mean() > 0.95
        uniform = torch.stack([sample_negatives(similarity, offset, False, g) for _ in range(400)])
        assert not (uniform == positives).any()
        assert (uniform == 7).float().mean() < 0.3


def test_excluded_negatives_are_never_drawn_unless_nothing_else_is_left():
    g = torch.Generator().manual_seed(0)
    similarity = torch.zeros(3, 4)
    exclude = torch.tensor([[False, True, True, False], [True, False, True, True], [True, True, True, True]])
    picks = torch.stack([sample_negatives(similarity, 0, True, g, exclude=exclude) for _ in range(200)])
    assert (picks[:, 0] == 3).all()  # columns 1 and 2 excluded, 0 is the positive
    assert set(picks[:, 1].tolist()) == {0, 2, 3}  # every other column excluded: any but the positive
    assert not (picks[:, 2] == 2).any()


def test_itm_negatives_follow_the_itc_softmax_at_its_temperature_and_skip_identical_captions():
    torch.manual_seed(0)
    text = torch.tensor([[5, 6, 0], [5, 7, 0], [5, 6, 0], [5, 8, 9]])  # texts 0 and 2 read the same
    features = F.normalize(torch.tensor([[1.0, 0.0], [0.8, 0.6], [1.0, 0.0], [0.0, 1.0]]), dim=1)
    # At temperature 0.1, cosines 0.8 and 0 are logits 8 and 0: image 1 outweighs image 3 by e^8 (BLIP's
    # 1e-4 floor aside), where the raw cosines would make the draw near uniform. Text 0's closest image
    # is image 2, whose caption is the same text: its hard negative must be image 1.
    same = identical_texts(text, text)
    draws = [itm_negatives(features, features, torch.tensor(0.1), hard=True, exclude=same, sizes=[4]) for _ in range(200)]
    images = torch.stack([d[0] for d in draws])
    texts = torch.stack([d[1] for d in draws])
    assert not ((images[:, [0, 2]] == torch.tensor([2, 0])).any() or (texts[:, [0, 2]] == torch.tensor([2, 0])).any())
    assert (images[:, 0] == 1).float().mean() > 0.9 and (texts[:, 0] == 1).float().mean() > 0.9
    assert (images[:, 3] == 1).float().mean() > 0.9  # cos 0.6 against 0: the nearer one


def test_lm_loss_ignores_padding_and_the_prompt():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 6, 11, generator=g)
    text = torch.tensor([[5, 7, 8, 9, 3, 0], [5, 7, 8, 10, 6, 3]])
    mask = (text != 0).long()
    expected = F.cross_entropy(
        torch.cat([logits[0, 2:4], logits[1, 2:5]]), torch.tensor([9, 3, 10, 6, 3]), label_smoothing=0.1
    )
    got = lm_loss(logits, text, mask, prompt_length=2, label_smoothing=0.1)
    torch.testing.assert_close(got, expected)


def test_objective_names_its_losses_and_clamps_the_temperature():
    model = tiny_blip().train()
    objective = BlipObjective(model, BlipObjectiveConfig())
    images, text, mask = _inputs(4)
    values = objective({"image": images, "text": text, "text_mask": mask})
    assert {"itc_loss", "itm_loss", "lm_loss", "itm_accuracy", "temperature"} <= set(values)
    assert all(torch.isfinite(values[k]) for k in ("itc_loss", "itm_loss", "lm_loss"))
    sum(v for k, v in values.items() if k.endswith("_loss")).backward()
    assert model.itm_head.weight.grad is not None and model.lm_head.decoder.weight.grad is not None
    with torch.no_grad():
        model.temperature.fill_(0.9)
    objective.after_step()
    assert model.temperature.item() == pytest.approx(0.5)


def test_trailing_padding_changes_no_output_and_the_objective_cuts_it():
    model = tiny_blip()
    images, text, mask = _inputs(3)
    wide_text, wide_mask = F.pad(text, (0, 2)), F.pad(mask, (0, 2))  # the tokenizer's context: 12
    narrow, wide = model(images, text, mask), model(images, wide_text, wide_mask)
    torch.testing.assert_close(narrow.text_features, wide.text_features)
    tokens = narrow.image_tokens
    torch.testing.assert_close(model.itm_logits(text, mask, tokens), model.itm_logits(wide_text, wide_mask, tokens))
    torch.testing.assert_close(
        model.lm_logits(text, mask, tokens), model.lm_logits(wide_text, wide_mask, tokens)[:, :10]
    )
    seen = []
    model.text.register_forward_pre_hook(lambda module, args: seen.append(args[0].shape[1]))
    BlipObjective(model.train(), BlipObjectiveConfig())({"image": images, "text": wide_text, "text_mask": wide_mask})
    assert seen and set(seen) == {10}  # ITC, ITM positives and negatives, and LM (shared layers) all cut


def _lengths_worker(rank, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    images, text, mask = _inputs(4)
    mask[:, 6 + 2 * rank :] = 0  # the longest caption: 6 tokens on rank 0, 8 on rank 1
    model = tiny_blip().train()
    seen = []
    model.text.register_forward_pre_hook(lambda module, args: seen.append(args[0].shape[1]))
    values = BlipObjective(model, BlipObjectiveConfig())({"image": images, "text": text * mask, "text_mask": mask})
    torch.save((seen, {k: v.item() for k, v in values.items()}), f"{out}.{rank}")
    dist.destroy_process_group()


def test_processes_cut_their_texts_to_one_length(tmp_path):
    """ITM gathers every process's texts, so each cuts to the longest caption of the global batch."""
    mp.spawn(_lengths_worker, args=(free_port(), str(tmp_path / "seen")), nprocs=2, join=True)
    for rank in (0, 1):
        seen, values = torch.load(tmp_path / f"seen.{rank}")
        assert seen and set(seen) == {8}, rank
        assert all(torch.isfinite(torch.tensor(v)) for v in values.values()), values


def test_momentum_encoders_are_an_exponential_moving_average():
    model = tiny_blip(momentum=0.9)
    before = {n: p.clone() for n, p in model.momentum_encoder.named_parameters()}
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(1.0)
    model.update_momentum_encoder()
    assert not any(p.requires_grad for p in model.momentum_encoder.parameters())
    for (name, value), current in zip(
        model.momentum_encoder["text"].named_parameters(), model.text.parameters(), strict=True
    ):
        torch.testing.assert_close(value, 0.9 * before["text." + name] + 0.1 * current, msg=name)
    assert int(model.momentum_steps) == 1


def test_distillation_without_alpha_or_queue_is_plain_itc_and_the_queue_fills():
    images, text, mask = _inputs(4)
    batch = {"image": images, "text": text, "text_mask": mask}
    plain = BlipObjective(tiny_blip().train(), BlipObjectiveConfig())
    # momentum 0: the momentum encoders equal the model after their update; alpha 0: one-hot targets.
    distilled = BlipObjective(tiny_blip(momentum=0.0).train(), BlipObjectiveConfig(alpha=0.0))
    torch.testing.assert_close(distilled(batch)["itc_loss"], plain(batch)["itc_loss"], atol=1e-5, rtol=1e-5)

    model = tiny_blip(momentum=0.995, queue_size=8).train()
    objective = BlipObjective(model, BlipObjectiveConfig(alpha_warmup_steps=1))
    objective(batch)
    image_m, text_m = model.momentum_features(images, text, mask)
    torch.testing.assert_close(model.image_queue[:4], image_m)
    torch.testing.assert_close(model.text_queue[:4], text_m)
    assert int(model.queue_pointer) == 4
    objective(batch)
    assert int(model.queue_pointer) == 0
    with pytest.raises(ValueError, match="multiple of the global batch"):
        BlipObjective(tiny_blip(momentum=0.995, queue_size=6).train(), BlipObjectiveConfig())(batch)


def test_a_tokenizer_that_disagrees_with_the_model_is_named(shapes_world, tmp_path):
    overrides = tiny_run_overrides(
        str(shapes_world / "train.csv"), steps=1, **{**BLIP_TINY, "tokenizer.extra_tokens": "['[DEC]', '[ENC]']"}
    )
    with pytest.raises(ConfigError, match="model.text.enc_token_id"):
        train(load_run_config(None, overrides), tmp_path / "run")


def test_tiny_blip_learns_all_three_losses_and_captions(shapes_world, trained_blip, tmp_path, capsys):
    run = trained_blip
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    first, last = records[0], records[-1]
    assert last["lm_loss"] < 0.6 * first["lm_loss"]
    assert last["itc_loss"] < 0.8 * first["itc_loss"]
    # Two of every three ITM pairs are negatives (uniform ones here, see `trained_blip`): 0.67 is what a
    # head that always says "no" gets; it stays there for ~100 steps, then climbs (0.88 at 400 steps when
    # measured).
    assert last["itm_accuracy"] > 0.8, [r["itm_accuracy"] for r in records]

    # Captions of held-out test images, against their 5 references each (CIDEr 1.48 trained, 0.01 untrained
    # when measured).
    greedy = GenerationConfig(method="greedy", max_new_tokens=12, min_new_tokens=2)
    trained = CaptionPredictor.from_checkpoint(run, generation=greedy)
    untrained = load_checkpoint(run)
    torch.manual_seed(1)
    untrained.model = Blip(untrained.config).eval()
    test = shapes_world / "captions_test.json"
    scores = [
        evaluate_captioning(GivenFunctions(caption=p.caption), CaptioningEvalConfig(str(test), meteor=False)).metrics
        for p in (trained, CaptionPredictor(untrained, generation=greedy))
    ]
    assert scores[0]["cider"] > 0.8 and scores[0]["cider"] > scores[1]["cider"] + 0.5, scores
    assert scores[0]["spice"] is None  # reported unavailable, not made up

    image = str(next((shapes_world / "images" / "test").iterdir()))
    assert main(["caption", image, "--checkpoint", str(run), "--method", "beam", "--max-new-tokens", "12"]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith(f"{image}: ") and any(
        s in printed for s in ("circle", "square", "triangle", "star", "cross")
    )
    # ITM re-ranking runs end to end (at this size it ranks worse than the embeddings: see docs/results/blip.md).
    out = tmp_path / "rerank.json"
    assert (
        main(["eval", "retrieval", "--checkpoint", str(run), "--data", str(test), "--rerank", "8", "--out", str(out)])
        == 0
    )
    result = json.loads(out.read_text())
    assert result["task"] == "reranked_retrieval (k=8)" and 0 < result["metrics"]["text_retrieval_recall@5"] <= 1


def _full_logits(model, images, sequences):
    _, tokens = model.encode_image_tokens(images)
    return model.lm_logits(sequences, torch.ones_like(sequences), tokens)


def test_cached_decoding_equals_the_full_forward():
    model = tiny_blip()
    images, text, _ = _inputs(3)
    sequences = text[:, :8].clone()
    sequences[:, 0] = 5
    with torch.no_grad():
        expected = _full_logits(model, images, sequences)
        decoder = model.caption_decoder(model.encode_image_tokens(images)[1])
        got = [decoder(sequences[:, :3], torch.ones(3, 3, dtype=torch.long))]
        for i in range(3, 8):
            got.append(decoder(sequences[:, i : i + 1], torch.ones(3, 1, dtype=torch.long)))
    torch.testing.assert_close(torch.stack(got, dim=1), expected[:, 2:], atol=1e-5, rtol=1e-4)


def _caption(model, images, **options):
    decoder = model.caption_decoder(model.encode_image_tokens(images)[1])
    prompt = torch.full((len(images), 1), 7, dtype=torch.long)  # a one-token prompt
    return generate(decoder, prompt, GenerationConfig(**options))


def test_greedy_beam_and_nucleus_decoding():
    model = tiny_blip()
    images, _, _ = _inputs(3)
    with torch.no_grad():
        greedy = _caption(model, images, method="greedy", max_new_tokens=6, min_new_tokens=2)
        # Greedy, written out with no cache: the argmax of the full forward at every step.
        sequences = torch.tensor([[5, 7]] * 3)
        for step in range(6):
            logits = _full_logits(model, images, sequences)[:, -1]
            if step < 2:
                logits[:, 3] = float("-inf")
            sequences = torch.cat([sequences, logits.argmax(-1, keepdim=True)], dim=1)
        for row, caption in zip(sequences[:, 2:].tolist(), greedy, strict=True):
            assert caption == (row[: row.index(3)] if 3 in row else row)
        assert greedy == _caption(model, images, method="beam", num_beams=1, max_new_tokens=6, min_new_tokens=2)
        assert greedy == _caption(model, images, method="nucleus", top_p=1e-6, max_new_tokens=6, min_new_tokens=2)
        beams = _caption(model, images, method="beam", num_beams=3, max_new_tokens=6, min_new_tokens=4)
        assert all(4 <= len(c) <= 6 for c in beams)
        # Rows of a batch are decoded independently.
        assert beams[1:] == _caption(model, images[1:], method="beam", num_beams=3, max_new_tokens=6, min_new_tokens=4)
        samples = [_caption(model, images, method="nucleus", top_p=0.9, seed=s, max_new_tokens=6) for s in range(4)]
        assert len({str(s) for s in samples}) > 1


def test_beams_share_each_images_cross_attention_keys_and_values():
    """Beam search keeps one copy of an image's cross-attention keys and values for all its beams: the
    captions and logits are those of per-row copies, and a reorder that moves rows across images falls back
    to per-row copies."""
    model = tiny_blip()
    images, _, _ = _inputs(3)
    cfg = GenerationConfig(method="beam", num_beams=3, max_new_tokens=6, min_new_tokens=4)
    with torch.no_grad():
        tokens = model.encode_image_tokens(images)[1]
        shared = model.caption_decoder(tokens)
        per_row = model.caption_decoder(tokens)
        per_row.shared_state = False
        prompt = torch.full((3, 1), 7, dtype=torch.long)
        assert generate(shared, prompt, cfg) == generate(per_row, prompt, cfg)
        assert shared.shared_state and shared.state[0][0][0].shape[0] == 3  # [images, heads, tokens, width]
        assert per_row.state[0][0][0].shape[0] == 9

        shared, per_row = model.caption_decoder(tokens), model.caption_decoder(tokens)
        per_row.shared_state = False
        start = torch.full((3, 2), 5, dtype=torch.long)
        for decoder in (shared, per_row):
            decoder(start, torch.ones_like(start))
            decoder.reorder(torch.tensor([0, 0, 1, 1, 2, 2]))
        step = torch.full((6, 1), 8, dtype=torch.long)
        torch.testing.assert_close(shared(step, torch.ones_like(step)), per_row(step, torch.ones_like(step)))
        for decoder in (shared, per_row):
            decoder.reorder(torch.tensor([2, 1, 4, 4, 0, 5]))  # rows change images
        assert not shared.shared_state
        torch.testing.assert_close(shared(step, torch.ones_like(step)), per_row(step, torch.ones_like(step)))


class _ParameterCasts(TorchDispatchMode):
    """Counts the dtype casts of the given parameters (by storage) that reach the kernels."""

    def __init__(self, parameters):
        super().__init__()
        self.pointers, self.casts = {p.data_ptr() for p in parameters}, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        casting = func in (torch.ops.aten._to_copy.default, torch.ops.aten.to.dtype)
        if casting and args[0].data_ptr() in self.pointers:
            self.casts += 1
        return func(*args, **(kwargs or {}))


def test_bf16_captioning_casts_each_weight_once_per_batch_not_once_per_token(trained_blip, shapes_world):
    """Under bf16 autocast a decoder reads every weight once per token; autocast keeps its bf16 copies for
    the call only outside inference mode, and re-casting them per token made bf16 decoding slower than
    fp32 (`make bench`'s blip section measures the speed)."""
    greedy = GenerationConfig(method="greedy", max_new_tokens=8, min_new_tokens=8)
    predictor = CaptionPredictor.from_checkpoint(trained_blip, generation=greedy, precision="bf16")
    images = [str(p) for p in sorted((shapes_world / "images" / "test").iterdir())[:2]]
    parameters = list(predictor.model.parameters())
    with _ParameterCasts(parameters) as counter:
        captions = predictor.caption(images)
    assert len(captions) == 2 and 0 < counter.casts <= len(parameters)


@pytest.mark.parametrize("share", ["all_but_self_attention", "all", "none"])
@pytest.mark.parametrize("terms", [(0, 0, 1), (1, 1, 0), (1, 0, 0), (0, 1, 0), (0, 1, 1)])
def test_switched_off_terms_freeze_exactly_the_parameters_without_gradient(share, terms):
    """DDP needs every trainable parameter to get a gradient each step (CapFilt's captioner is LM only)."""
    model = tiny_blip(share).train()
    cfg = BlipObjectiveConfig(itc_weight=terms[0], itm_weight=terms[1], lm_weight=terms[2])
    BlipObjective.prepare(model, cfg)
    images, text, mask = _inputs(4)
    values = BlipObjective(model, cfg)({"image": images, "text": text, "text_mask": mask})
    sum(v for k, v in values.items() if k.endswith("_loss")).backward()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    with_gradient = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert trainable == with_gradient, trainable ^ with_gradient
