"""OWL-ViT: box bias, GIoU, focal loss, matching, the set loss, the heads, one-shot queries, and starting
from a dual encoder."""

import itertools
import math

import pytest
import torch

from vlp.geometry import box_cxcywh_to_xyxy, box_xyxy_to_cxcywh, generalized_box_iou
from vlp.losses import (
    detection_losses,
    detection_matching_cost,
    hungarian_match,
    objectness_loss,
    sigmoid_focal_loss,
)
from vlp.models.clip import DualEncoder, DualEncoderConfig
from vlp.models.owlvit import OwlVit, OwlVitConfig, box_bias
from vlp.towers import ConvNetConfig, TextConfig, VisionConfig

TEXT = TextConfig(vocab_size=64, context_length=8, width=32, layers=1, heads=2)


def tiny(**overrides) -> OwlVit:
    cfg = {"embed_dim": 16, "vision": VisionConfig(image_size=64, patch_size=16, width=32, layers=2, heads=2),
               "text": TEXT}
    cfg.update(overrides)
    torch.manual_seed(0)
    return OwlVit(OwlVitConfig(**cfg)).eval()


def _logit(p: float) -> float:
    return math.log(p + 1e-4) - math.log1p(-p + 1e-4)


@pytest.mark.parametrize("side", [12, 24, 60])
def test_box_bias_puts_each_token_at_its_cells_bottom_right_corner_with_one_cell_of_size(side):
    bias = box_bias((side, side))
    assert bias.shape == (side * side, 4)
    for row, col in [(0, 0), (side // 2 - 1, 3), (side - 1, side - 1)]:
        token = row * side + col  # row-major, as the feature map is flattened
        assert bias[token, 0].item() == pytest.approx(_logit((col + 1) / side), abs=1e-5)
        assert bias[token, 1].item() == pytest.approx(_logit((row + 1) / side), abs=1e-5)
    assert bias[-1, 0].item() == pytest.approx(9.2104, abs=1e-4)  # logit(1.0), the last column
    assert bias[:, 2:].unique().item() == pytest.approx({12: -2.3968, 24: -3.1332, 60: -4.0717}[side], abs=1e-4)
    assert box_bias((4, 4), "location")[:, 2:].abs().max() == 0
    assert box_bias((4, 4), "size")[:, :2].abs().max() == 0


def test_generalized_iou_of_hand_drawn_boxes():
    a = torch.tensor([[0.0, 0.0, 2.0, 2.0]])
    b = torch.tensor([[1.0, 1.0, 3.0, 3.0], [0.0, 0.0, 2.0, 2.0], [3.0, 0.0, 4.0, 1.0]])
    giou = generalized_box_iou(a, b)[0]
    # Overlap 1, union 7, enclosing 9: 1/7 - 2/9. Identical: 1. Apart: 0 - (4*2 - 5) / 8.
    assert giou.tolist() == pytest.approx([1 / 7 - 2 / 9, 1.0, -3 / 8])
    boxes = torch.tensor([[0.5, 0.4, 0.2, 0.3]])
    assert torch.allclose(box_xyxy_to_cxcywh(box_cxcywh_to_xyxy(boxes)), boxes)


def test_focal_loss_equals_its_closed_form():
    logits = torch.tensor([2.0, -1.0, 0.5])
    targets = torch.tensor([1.0, 1.0, 0.0])
    p = torch.sigmoid(logits).tolist()
    alpha, gamma = 0.3, 2.0
    expected = [
        -math.log(p[0]) * (1 - p[0]) ** gamma * alpha,
        -math.log(p[1]) * (1 - p[1]) ** gamma * alpha,
        -math.log(1 - p[2]) * p[2] ** gamma * (1 - alpha),
    ]
    assert sigmoid_focal_loss(logits, targets, alpha=alpha, gamma=gamma).tolist() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("seed", range(5))
def test_hungarian_matching_finds_the_least_cost_assignment(seed):
    generator = torch.Generator().manual_seed(seed)
    predictions, targets = 6, 3
    cost = torch.rand(predictions, targets, generator=generator)
    rows, cols = hungarian_match(cost)
    best = min(sum(cost[p, t] for t, p in enumerate(perm)) for perm in itertools.permutations(range(predictions), targets))
    assert cost[rows, cols].sum().item() == pytest.approx(best.item())
    assert sorted(cols.tolist()) == list(range(targets))


def test_matching_cost_prefers_the_prediction_on_the_box_with_the_right_label():
    pred_boxes = torch.tensor([[0.2, 0.2, 0.1, 0.1], [0.7, 0.7, 0.2, 0.2], [0.7, 0.7, 0.2, 0.2]])
    logits = torch.tensor([[3.0, -3.0], [-3.0, -3.0], [-3.0, 3.0]])
    labels = torch.tensor([[0.0, 1.0], [1.0, 0.0]])  # target 0 is query 1's, target 1 query 0's
    boxes = torch.tensor([[0.7, 0.7, 0.2, 0.2], [0.2, 0.2, 0.1, 0.1]])
    cost = detection_matching_cost(logits, pred_boxes, labels, boxes)
    rows, cols = hungarian_match(cost)
    assert dict(zip(cols.tolist(), rows.tolist(), strict=True)) == {0: 2, 1: 0}


def _random_batch(seed: int, batch: int = 2, tokens: int = 9, queries: int = 3, boxes: int = 2):
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, tokens, queries, generator=generator)
    pred = torch.rand(batch, tokens, 4, generator=generator) * 0.4 + 0.1
    labels = (torch.rand(batch, boxes, queries, generator=generator) > 0.5).float()
    labels[:, :, 0] = 1
    target = torch.rand(batch, boxes, 4, generator=generator) * 0.4 + 0.1
    return logits, pred, labels, target


def test_set_loss_is_a_mean_of_per_image_losses_normalised_per_image():
    logits, pred, labels, target = _random_batch(0)
    box_mask = torch.ones(2, 2, dtype=torch.bool)
    query_mask = torch.ones(2, 3, dtype=torch.bool)
    both = detection_losses(logits, pred, labels, target, box_mask, query_mask)
    alone = [detection_losses(logits[i : i + 1], pred[i : i + 1], labels[i : i + 1], target[i : i + 1],
                              box_mask[i : i + 1], query_mask[i : i + 1]) for i in range(2)]
    doubled = detection_losses(logits[[0, 0]], pred[[0, 0]], labels[[0, 0]], target[[0, 0]], box_mask[[0, 0]],
                               query_mask[[0, 0]])
    for name, value in both.items():
        assert value.item() == pytest.approx((alone[0][name] + alone[1][name]).item() / 2, rel=1e-5)
        assert doubled[name].item() == pytest.approx(alone[0][name].item(), rel=1e-5)


def test_set_loss_by_hand_on_one_image():
    """The matched prediction is positive for its box's labels, every other one negative for every real
    query; the padding query and box count for nothing; L1 on corners, GIoU, each over the box count."""
    logits, pred, labels, target = _random_batch(1, batch=1)
    box_mask = torch.tensor([[True, False]])
    query_mask = torch.tensor([[True, True, False]])
    out = detection_losses(logits, pred, labels, target, box_mask, query_mask)
    real_labels = labels[0, :1] * query_mask[0].float()
    cost = detection_matching_cost(logits[0], pred[0], real_labels, target[0, :1])
    token = int(cost[:, 0].argmin())
    targets = torch.zeros(9, 3)
    targets[token] = real_labels[0]
    focal = sigmoid_focal_loss(logits[0], targets, alpha=0.3, gamma=2.0)[:, :2].sum() / real_labels.sum()
    assert out["class_loss"].item() == pytest.approx(focal.item(), rel=1e-5)
    pred_xyxy, true_xyxy = box_cxcywh_to_xyxy(pred[0, token]), box_cxcywh_to_xyxy(target[0, 0])
    assert out["box_l1_loss"].item() == pytest.approx((pred_xyxy - true_xyxy).abs().sum().item(), rel=1e-5)
    giou = generalized_box_iou(pred_xyxy[None], true_xyxy[None])[0, 0]
    assert out["giou_loss"].item() == pytest.approx(1 - giou.item(), rel=1e-5)
    # An image without boxes: every prediction is a negative for every query; no box terms.
    empty = detection_losses(logits, pred, labels, target, torch.zeros(1, 2, dtype=torch.bool), query_mask)
    negatives = sigmoid_focal_loss(logits[0], torch.zeros(9, 3), alpha=0.3, gamma=2.0)[:, :2].sum()
    assert empty["class_loss"].item() == pytest.approx(negatives.item(), rel=1e-5)
    assert empty["box_l1_loss"].item() == 0 and empty["giou_loss"].item() == 0


def test_a_new_box_head_predicts_the_box_bias_and_scores_start_at_the_prior():
    model = tiny()
    images = torch.randn(2, 3, 64, 64)
    text = torch.randint(1, 60, (2, 3, 8))
    out = model(images, text)
    assert out.pred_boxes.shape == (2, 16, 4)
    assert torch.allclose(out.pred_boxes[0], torch.sigmoid(box_bias((4, 4))), atol=1e-6)
    assert out.logits.shape == (2, 16, 3)
    # With the shift and scale layers' weights at zero (their biases start there), a logit is the cosine
    # (within +-1) plus the prior's logit -4.595, times ELU(0) + 1 = 1: every score starts near 0.01.
    for layer in (model.class_head.logit_shift, model.class_head.logit_scale):
        torch.nn.init.zeros_(layer.weight)
    logits = model(images, text).logits
    assert (logits + 4.5951).abs().max() <= 1.0 + 1e-4


def test_padding_queries_never_score_and_do_not_change_the_others():
    model = tiny()
    images = torch.randn(1, 3, 64, 64)
    text = torch.randint(1, 60, (1, 3, 8))
    full = model(images, text).logits
    masked = model(images, text, query_mask=torch.tensor([[True, True, False]])).logits
    assert torch.equal(masked[..., :2], full[..., :2])
    assert (masked[..., 2] == torch.finfo(torch.float32).min).all()


def test_class_token_merge_and_drop():
    images = torch.randn(1, 3, 64, 64)
    merged = tiny()
    tokens = merged.visual.forward_features(images)
    expected = merged.merge_norm(tokens[:, 1:] * tokens[:, :1])
    assert torch.allclose(merged.image_features(images)[0], expected)
    dropped = tiny(merge_class_token="drop")
    assert torch.equal(dropped.image_features(images)[0], dropped.visual.forward_features(images)[:, 1:])


def test_objectness_reads_the_tokens_without_gradient_and_selects_instances():
    model = tiny(objectness=True).train()
    images = torch.randn(2, 3, 64, 64)
    text = torch.randint(1, 60, (2, 3, 8))
    out = model(images, text)
    out.objectness_logits.sum().backward()
    assert model.objectness_head.dense0.weight.grad is not None
    assert all(p.grad is None for p in model.visual.parameters())
    torch.nn.init.normal_(model.objectness_head.dense2.weight)
    selected = model(images, text, top_k=5)
    full = model(images, text)
    assert selected.logits.shape == (2, 5, 3) and selected.pred_boxes.shape == (2, 5, 4)
    expected = full.objectness_logits.topk(5, dim=1).indices
    assert torch.equal(selected.token_indices, expected)
    gathered = full.pred_boxes.gather(1, expected[..., None].expand(-1, -1, 4))
    assert torch.allclose(selected.pred_boxes, gathered, atol=1e-6)  # each kept token keeps its own bias
    target = full.logits.detach().amax(-1).sigmoid()
    loss = objectness_loss(full.objectness_logits, full.logits, torch.ones(2, 3, dtype=torch.bool))
    assert loss.item() == pytest.approx(torch.nn.functional.binary_cross_entropy_with_logits(
        full.objectness_logits, target).item(), rel=1e-5)


def test_one_shot_query_is_the_class_embedding_of_a_token_on_the_given_box():
    model = tiny()
    images = torch.randn(1, 3, 64, 64)
    # The initial box of the token at row 2, col 2: its cell's bottom-right corner is its centre.
    box = torch.tensor([[0.625, 0.625, 0.875, 0.875]])
    embedding, index = model.embed_image_query(images, box)
    features, _ = model.image_features(images)
    assert int(index) == 2 * 4 + 2
    assert torch.allclose(embedding[0], model.class_head.embed(features)[0, 10].float())


def test_starts_from_a_dual_encoders_towers():
    source = DualEncoder(DualEncoderConfig(embed_dim=16, text=TextConfig(vocab_size=64, context_length=12, width=32,
                                                                         layers=1, heads=2),
                                           vision=VisionConfig(image_size=32, patch_size=16, width=32, layers=2,
                                                               heads=2)))
    model = tiny()
    left = model.init_from(source)
    assert set(left) == {k for k in model.state_dict() if k.split(".")[0] in ("merge_norm", "class_head", "box_head")}
    text = torch.randint(1, 60, (3, 8))
    text = torch.cat([text, text[:1]])  # a repeated query is read once and given to both rows
    assert torch.allclose(model.embed_queries(text), source.encode_text(text, normalize=False), atol=1e-5)
    assert torch.allclose(model.embed_queries(text.view(2, 2, 8)), model.embed_queries(text).view(2, 2, -1))
    # The 2x2 position grid is enlarged linearly to 4x4, corners kept, the class row as it was.
    assert torch.equal(model.visual.pos_embed[0], source.visual.pos_embed[0])
    assert torch.allclose(model.visual.pos_embed[1], source.visual.pos_embed[1])
    assert torch.allclose(model.visual.pos_embed[-1], source.visual.pos_embed[-1])
    with pytest.raises(ValueError, match="convnet"):
        tiny(vision=ConvNetConfig(image_size=64, channels=(8, 16, 32))).init_from(source)


def test_a_convnet_tower_detects_from_its_feature_map():
    model = tiny(vision=ConvNetConfig(image_size=64, channels=(8, 16, 32)))
    out = model(torch.randn(1, 3, 64, 64), torch.randint(1, 60, (1, 2, 8)))
    assert out.pred_boxes.shape == (1, 256, 4) and out.logits.shape == (1, 256, 2)
    with pytest.raises(ValueError, match="square"):
        model(torch.randn(1, 3, 64, 32), torch.randint(1, 60, (1, 2, 8)))
