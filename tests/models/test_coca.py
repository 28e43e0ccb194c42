"""CoCa: the unimodal/multimodal split, the CLS masks, the poolers, cached generation and the objective."""

import contextlib
import json
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

from conftest import free_port, tiny_run_overrides
from vlp.checkpoint import load_checkpoint
from vlp.cli import main
from vlp.config import ConfigError
from vlp.evals.probe import ProbeConfig, frozen_feature_probes
from vlp.generation import GenerationConfig, generate
from vlp.layers import padding_mask
from vlp.losses import lm_loss
from vlp.models.coca import Coca, CocaConfig
from vlp.objectives.coca import CocaObjective, CocaObjectiveConfig
from vlp.tasks import GivenFunctions, predict_functions
from vlp.tasks.captioning import CaptioningEvalConfig, CaptionPredictor, evaluate_captioning
from vlp.tasks.zeroshot import ZeroShotEvalConfig, evaluate_zeroshot
from vlp.towers import TextConfig, VisionConfig
from vlp.train.config import load_run_config
from vlp.train.loop import train
from vlp.train.step import accumulated_backward, split_batch

VOCAB, LENGTH = 40, 12


def tiny_coca(**extra) -> Coca:
    torch.manual_seed(0)
    cfg = CocaConfig(
        embed_dim=32,
        vision=VisionConfig(image_size=16, patch_size=8, width=48, layers=1, heads=2, ln_post=False),
        text=TextConfig(vocab_size=VOCAB, context_length=LENGTH, width=32, layers=2, heads=2),
        multimodal_layers=2,
        caption_queries=6,
        pooler_heads=4,
        bos_token_id=2,
        eos_token_id=3,
        pad_token_id=0,
        **extra,
    )
    return Coca(cfg).eval()


def _inputs(n: int = 3):
    g = torch.Generator().manual_seed(1)
    text = torch.randint(4, VOCAB, (n, LENGTH), generator=g)
    text[:, 0] = 2
    mask = torch.ones(n, LENGTH, dtype=torch.long)
    for row, length in enumerate([7, 9, 5][:n]):
        text[row, length - 1] = 3
        text[row, length:] = 0
        mask[row, length:] = 0
    return torch.randn(n, 3, 16, 16, generator=g), text, mask


def _reference_text_encoder(model: Coca, text: torch.Tensor, text_mask: torch.Tensor, legacy: bool):
    """The unimodal half at full length as open_clip computes it: CLS appended after all L positions,
    causal mask plus a key mask; legacy shifts the key mask by one (open_clip's released weights)."""
    encoder = model.text
    x = encoder.token_embedding(text)
    x = torch.cat([x, encoder.cls_embedding.expand(len(text), 1, -1)], dim=1) + encoder.pos_embed
    ones = text_mask[:, :1].new_ones(len(text), 1)
    valid = torch.cat([ones, text_mask] if legacy else [text_mask, ones], dim=1)
    mask = padding_mask(valid) & torch.ones(LENGTH + 1, LENGTH + 1, dtype=torch.bool).tril()
    for block in encoder.blocks:
        x = block(x, attn_mask=mask)
    return encoder.ln_final(x[:, -1]), x[:, :-1]


@pytest.mark.parametrize("cls_mask", ["correct", "legacy"])
def test_text_cut_to_its_longest_equals_the_full_length_pass(cls_mask):
    model = tiny_coca(cls_mask=cls_mask)
    _, text, mask = _inputs()
    with torch.no_grad():
        pooled, states = model.text(text, mask)
        ref_pooled, ref_states = _reference_text_encoder(model, text, mask, legacy=cls_mask == "legacy")
    torch.testing.assert_close(pooled, ref_pooled, atol=1e-5, rtol=1e-5)
    real = mask.bool()[:, : states.shape[1]]
    torch.testing.assert_close(states[real], ref_states[:, : states.shape[1]][real], atol=1e-5, rtol=1e-5)


def test_unimodal_half_is_causal_and_blind_to_the_image():
    model = tiny_coca()
    images, text, mask = _inputs()
    changed = text.clone()
    changed[:, 3] = 9
    with torch.no_grad():
        a, b = model.text(text, mask)[1], model.text(changed, mask)[1]
        torch.testing.assert_close(a[:, :3], b[:, :3])
        assert not torch.allclose(a[:, 3:], b[:, 3:])
        # The CLS sees the whole caption: a change anywhere moves the embedding.
        assert not torch.allclose(model.encode_text(text, mask), model.encode_text(changed, mask))
        # Padding after the text, however long, does not.
        torch.testing.assert_close(model.encode_text(text[:, :9], mask[:, :9]), model.encode_text(text, mask))
        # The multimodal half reads the image; it is causal too.
        _, tokens = model.encode_image_tokens(images)
        _, other = model.encode_image_tokens(torch.randn_like(images))
        logits = model.caption_logits(text, mask, tokens)
        assert not torch.allclose(logits, model.caption_logits(text, mask, other))
        torch.testing.assert_close(model.caption_logits(changed, mask, tokens)[:, :3], logits[:, :3])


def test_poolers_paper_separate_and_open_clip_shared():
    images = _inputs()[0]
    separate, shared = tiny_coca(pooler="separate"), tiny_coca(pooler="shared")
    with torch.no_grad():
        embedding, tokens = separate.encode_image_tokens(images)
        assert tokens.shape == (3, 6, 32) and embedding.shape == (3, 32)
        embedding, tokens = shared.encode_image_tokens(images)
        assert tokens.shape == (3, 5, 32)  # query 0 went to the embedding
        pooled = shared.ln_post(shared.pooler(shared.visual.forward_features(images)))
        torch.testing.assert_close(tokens, pooled[:, 1:])
        torch.testing.assert_close(embedding, torch.nn.functional.normalize(shared.image_projection(pooled[:, 0])))
    assert shared.contrastive_pooler is None and separate.contrastive_pooler.query.shape == (1, 32)


def test_cached_decoding_equals_the_full_forward_pass():
    model = tiny_coca()
    images, text, mask = _inputs()
    with torch.no_grad():
        _, tokens = model.encode_image_tokens(images)
        full = model.caption_logits(text[:, :6], torch.ones_like(mask[:, :6]), tokens)
        decoder = model.caption_decoder(tokens)
        first = decoder(text[:, :2], torch.ones_like(text[:, :2]))
        torch.testing.assert_close(first, full[:, 1], atol=1e-5, rtol=1e-5)
        for position in range(2, 6):
            step = decoder(text[:, position : position + 1], torch.ones_like(text[:, :1]))
            torch.testing.assert_close(step, full[:, position], atol=1e-5, rtol=1e-5)


def _greedy_without_cache(model: Coca, tokens: torch.Tensor, steps: int) -> list[list[int]]:
    sequences = torch.full((len(tokens), 1), model.cfg.bos_token_id)
    for _ in range(steps):
        logits = model.caption_logits(sequences, torch.ones_like(sequences), tokens)[:, -1]
        sequences = torch.cat([sequences, logits.argmax(dim=-1, keepdim=True)], dim=1)
    return sequences[:, 1:].tolist()


def test_greedy_generation_with_the_cache_equals_recomputing_the_prefix():
    model = tiny_coca()
    model.decoder.lm_head.weight.data[3] = -10.0  # no end-of-text: every row runs the whole budget
    images = _inputs()[0]
    with torch.no_grad():
        _, tokens = model.encode_image_tokens(images)
        cfg = GenerationConfig(method="greedy", max_new_tokens=8, min_new_tokens=0)
        cached = generate(model.caption_decoder(tokens), torch.zeros(3, 0, dtype=torch.long), cfg)
    assert cached == _greedy_without_cache(model, tokens, 8)
    for method in ("beam", "nucleus"):
        with torch.no_grad():
            out = generate(
                model.caption_decoder(tokens),
                torch.zeros(3, 0, dtype=torch.long),
                GenerationConfig(method=method, max_new_tokens=30, seed=0),
            )
        assert len(out) == 3 and all(len(row) <= LENGTH - 1 for row in out)  # the positions cap the length


def test_objective_weights_its_terms_and_ignores_padding():
    model = tiny_coca()
    images, text, mask = _inputs()
    batch = {"image": images, "text": text, "text_mask": mask, "size": 3}
    with torch.no_grad():
        values = CocaObjective(model, CocaObjectiveConfig())(batch)
        plain = CocaObjective(model, CocaObjectiveConfig(caption_weight=1.0, contrastive_weight=0.0))(batch)
        logits = model(images, text, mask).caption_logits
    assert set(values) >= {"contrastive_loss", "caption_loss", "logit_scale"}
    length = logits.shape[1]
    expected = lm_loss(logits, text[:, :length], mask[:, :length])  # mean over real next tokens
    torch.testing.assert_close(plain["caption_loss"], expected)
    torch.testing.assert_close(values["caption_loss"], 2 * expected)
    assert plain["contrastive_loss"] == 0


@pytest.mark.parametrize("loss", ["clip", "siglip"])
def test_two_micro_batches_equal_one_batch(loss):
    grads = []
    for accum in (1, 2):
        model = tiny_coca(init_logit_bias=-10.0 if loss == "siglip" else None).train()
        objective = CocaObjective(model, CocaObjectiveConfig(loss=loss))
        batch = {**_six_captions(), "size": 6}  # six captions, cut to different lengths per micro-batch
        if accum == 1:
            values = objective(batch)
            value = values["contrastive_loss"] + values["caption_loss"]
            value.backward()
        else:
            value, _ = accumulated_backward(
                objective,
                split_batch(batch, 2),
                no_sync=contextlib.nullcontext,
                autocast=contextlib.nullcontext(),
                family="coca",
            )
        grads.append((value.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (loss_one, one), (loss_accum, accumulated) = grads
    assert loss_accum == pytest.approx(loss_one, abs=1e-5)
    assert set(one) == set(accumulated)
    for name, grad in one.items():
        torch.testing.assert_close(accumulated[name], grad, atol=1e-5, rtol=1e-4, msg=name)


def _six_captions():
    images, text, mask = _inputs(3)
    images, text, mask = images.repeat(2, 1, 1, 1), text.repeat(2, 1), mask.repeat(2, 1)
    text[3:, 1] = 7
    mask[:3, 7:] = 0  # rank 0's captions are shorter: 18 next tokens against 21
    return {"image": images, "text": text, "text_mask": mask}


def _loss_and_grads(model, wrapped, batch):
    values = CocaObjective(wrapped, CocaObjectiveConfig())(batch)
    loss = values["contrastive_loss"] + values["caption_loss"]
    model.zero_grad()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _two_process_worker(rank, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    batch = {k: v[rank * 3 : rank * 3 + 3] for k, v in _six_captions().items()}
    model = tiny_coca().train()
    loss, grads = _loss_and_grads(model, DistributedDataParallel(model), batch)
    dist.all_reduce(loss)
    if rank == 0:
        torch.save((loss.item() / 2, grads), out)
    dist.destroy_process_group()


def test_two_processes_equal_one_process_on_the_global_batch(tmp_path):
    """Features are gathered for the contrastive loss; the caption loss is the token mean of the global
    batch although the two processes hold different numbers of caption tokens."""
    mp.spawn(_two_process_worker, args=(free_port(), str(tmp_path / "out.pt")), nprocs=2, join=True)
    distributed_loss, distributed_grads = torch.load(tmp_path / "out.pt")
    model = tiny_coca().train()
    loss, grads = _loss_and_grads(model, model, _six_captions())
    assert distributed_loss == pytest.approx(loss.item(), abs=1e-5)
    assert set(distributed_grads) == set(grads)
    for name, grad in grads.items():
        torch.testing.assert_close(distributed_grads[name], grad, atol=1e-5, rtol=1e-4, msg=name)


COCA_TINY = {
    "model.family": "coca",
    "model.multimodal_layers": 2,
    "model.caption_queries": 16,
    "model.pooler_heads": 2,
    "model.bos_token_id": 2,
    "model.eos_token_id": 3,
    "model.pad_token_id": 0,
}


@pytest.fixture(scope="module")
def trained_coca(shapes_world, tmp_path_factory):
    """The test-suite dual encoder's sizes with a 2-layer multimodal half, 200 steps (~50 s on 2 AVX2 cores)."""
    run = tmp_path_factory.mktemp("coca") / "run"
    overrides = tiny_run_overrides(str(shapes_world / "train.csv"), steps=200, **COCA_TINY)
    train(load_run_config(None, overrides), run)
    return run


def test_tiny_coca_learns_zero_shot_classification_and_captioning(shapes_world, trained_coca):
    records = [json.loads(line) for line in (trained_coca / "metrics.jsonl").read_text().splitlines()]
    first, last = records[0], records[-1]
    assert last["caption_loss"] < 0.5 * first["caption_loss"]
    assert last["contrastive_loss"] < 0.7 * first["contrastive_loss"]

    trained = load_checkpoint(trained_coca)
    untrained = load_checkpoint(trained_coca)
    torch.manual_seed(1)
    untrained.model = Coca(untrained.config).eval()
    # Colour + shape, 30 classes (chance 0.033), through the dual encoder's predictor and evaluator.
    z = shapes_world / "zeroshot"
    accuracy = [
        evaluate_zeroshot(predict_functions(p), ZeroShotEvalConfig(
            str(z / "color_shape.csv"), str(z / "color_shape_classnames.txt"), str(z / "templates.txt"))
        ).metrics["acc1"]
        for p in (trained, untrained)
    ]
    assert accuracy[0] > 0.15 and accuracy[0] > accuracy[1] + 0.1, accuracy
    # Captions of held-out test images against their 5 references each (measured after 200 steps: CIDEr 1.62
    # trained, 0.01 untrained; colour + shape zero-shot 0.29 vs 0.03).
    greedy = GenerationConfig(method="greedy", max_new_tokens=12, min_new_tokens=2)
    cider = [
        evaluate_captioning(
            GivenFunctions(caption=CaptionPredictor(p, generation=greedy).caption),
            CaptioningEvalConfig(str(shapes_world / "captions_test.json"), meteor=False),
        ).metrics["cider"]
        for p in (trained, untrained)
    ]
    assert cider[0] > 0.8 and cider[0] > cider[1] + 0.5, cider


def test_eval_commands_of_clip_and_blip_run_on_coca(shapes_world, trained_coca, tmp_path, capsys):
    z = shapes_world / "zeroshot"
    assert (
        main(
            [
                "eval",
                "zeroshot",
                "--checkpoint",
                str(trained_coca),
                "--data",
                str(z / "shape.csv"),
                "--classnames",
                str(z / "shape_classnames.txt"),
                "--templates",
                str(z / "templates.txt"),
            ]
        )
        == 0
    )
    assert main(["eval", "retrieval", "--checkpoint", str(trained_coca), "--data", str(shapes_world / "test.csv")]) == 0
    image = str(next((shapes_world / "images" / "test").iterdir()))
    assert main(["caption", image, "--checkpoint", str(trained_coca), "--max-new-tokens", "12"]) == 0
    printed = capsys.readouterr().out
    assert "image_retrieval_recall@1" in printed and "acc1" in printed
    assert any(shape in printed.splitlines()[-1] for shape in ("circle", "square", "triangle", "star", "cross"))

    out = tmp_path / "probe.json"
    assert (
        main(
            [
                "eval",
                "probe",
                "--checkpoint",
                str(trained_coca),
                "--data",
                str(z / "color_shape.csv"),
                "--classnames",
                str(z / "color_shape_classnames.txt"),
                "--steps",
                "300",
                "--heads",
                "2",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    result = json.loads(out.read_text())
    assert result["train_images"] == 105 and result["test_images"] == 45
    # 30 classes from 3.5 images each, chance 0.033: both heads learn from the frozen features (0.24 and
    # 0.18 when measured on this 200-step model; its zero-shot accuracy on the task is about as low).
    assert result["metrics"]["linear_acc1"] > 0.1 and result["metrics"]["attentional_acc1"] > 0.1, result


def test_attentional_probe_finds_the_token_that_carries_the_class():
    """The class sits in one token at a random position among noise tokens: a learned query finds it;
    the linear probe sees the class through a noisy pooled embedding."""
    g = torch.Generator().manual_seed(0)
    classes, n, positions, width = 4, 400, 8, 16
    prototypes = torch.randn(classes, width, generator=g) * 3
    labels = torch.randint(0, classes, (n,), generator=g)
    tokens = torch.randn(n, positions, width, generator=g)
    tokens[torch.arange(n), torch.randint(0, positions, (n,), generator=g)] += prototypes[labels]
    pooled = prototypes[labels] + torch.randn(n, width, generator=g)
    rows = list(range(n))
    metrics = frozen_feature_probes(
        lambda index: pooled[list(index)],
        lambda index: tokens[list(index)],
        (rows[:300], labels[:300].tolist()),
        (rows[300:], labels[300:].tolist()),
        classes,
        ProbeConfig(steps=300, heads=2),
    )
    assert metrics["attentional_acc1"] > 0.9 and metrics["linear_acc1"] > 0.9, metrics


@pytest.mark.parametrize(
    ("vision", "text", "named"),
    [
        ({"attentional_pool": "parallel"}, {}, "attentional_pool"),
        ({}, {"embed_cls": False}, "embed_cls"),
        ({}, {"mlp_ratio": 2.0}, "mlp_ratio"),
    ],
)
def test_open_clip_coca_layouts_vlp_does_not_build_are_named(tmp_path, vision, text, named):
    from vlp.convert import ConversionError, load_pretrained

    config = {
        "embed_dim": 512,
        "vision_cfg": {
            "image_size": 224,
            "layers": 12,
            "width": 768,
            "patch_size": 32,
            "attentional_pool": True,
            **vision,
        },
        "text_cfg": {"context_length": 76, "width": 512, "heads": 8, "layers": 12, "embed_cls": True, **text},
        "multimodal_cfg": {"context_length": 76, "width": 512, "heads": 8, "layers": 12},
    }
    (tmp_path / "coca.json").write_text(json.dumps(config))
    (tmp_path / "weights.pt").write_bytes(b"")
    with pytest.raises(ConversionError, match=named):
        load_pretrained(tmp_path / "weights.pt", config=tmp_path / "coca.json")


def test_start_and_end_tokens_must_be_the_tokenizers_whatever_their_names(shapes_world, tmp_path):
    wordpiece = {
        "tokenizer.kind": "wordpiece", "tokenizer.pad_token": "'[PAD]'", "tokenizer.unk_token": "'[UNK]'",
        "tokenizer.bos_token": "'[CLS]'", "tokenizer.eos_token": "'[SEP]'",
    }  # fmt: skip
    data = str(shapes_world / "train.csv")
    train(load_run_config(None, tiny_run_overrides(data, steps=1, **COCA_TINY, **wordpiece)), tmp_path / "ok")
    wrong = {**COCA_TINY, "model.bos_token_id": 3}
    with pytest.raises(ConfigError, match="model.bos_token_id': 3, but the tokenizer's is 2"):
        train(load_run_config(None, tiny_run_overrides(data, steps=1, **wrong)), tmp_path / "wrong")
