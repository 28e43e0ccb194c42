import math

import pytest
import torch

from vlp.losses import contrastive_loss, sigmoid_loss
from vlp.models.clip import DualEncoder, DualEncoderConfig
from vlp.objectives.contrastive import ContrastiveObjective, ContrastiveObjectiveConfig
from vlp.towers import TextConfig, VisionConfig


def tiny(**kw):
    cfg = {"embed_dim": 16, "vision": VisionConfig(image_size=16, patch_size=8, width=32, layers=1, heads=2),
           "text": TextConfig(vocab_size=40, context_length=6, width=24, layers=1, heads=2)}
    cfg.update(kw)
    return DualEncoderConfig(**cfg)


def batch(n=4):
    g = torch.Generator().manual_seed(0)
    return {"image": torch.randn(n, 3, 16, 16, generator=g), "text": torch.randint(0, 40, (n, 6), generator=g),
            "text_mask": torch.ones(n, 6, dtype=torch.long)}


def test_dual_encoder_returns_normalised_features_and_scale():
    model = DualEncoder(tiny())
    out = model(**batch())
    assert out.image_features.shape == out.text_features.shape == (4, 16)
    torch.testing.assert_close(out.image_features.norm(dim=-1), torch.ones(4))
    assert out.logit_scale.item() == pytest.approx(1 / 0.07, rel=1e-5)
    assert out.logit_bias is None


def test_siglip_shape_model_has_bias_and_no_image_projection():
    cfg = tiny(embed_dim=32, init_logit_scale=math.log(10), init_logit_bias=-10.0, vision_projection=False,
               text_projection_bias=True,
               vision=VisionConfig(image_size=16, patch_size=8, width=32, layers=1, heads=2, class_token=False,
                                   pool="map", patch_bias=True, ln_pre=False))
    model = DualEncoder(cfg)
    out = model(**batch())
    assert out.logit_bias.item() == -10.0 and out.logit_scale.item() == pytest.approx(10.0)
    assert isinstance(model.visual_projection, torch.nn.Identity)
    with pytest.raises(ValueError, match="vision.width"):
        tiny(vision_projection=False)


@pytest.mark.parametrize("loss", ["clip", "siglip"])
def test_objective_returns_named_loss_and_clamps_the_scale(loss):
    model = DualEncoder(tiny(init_logit_bias=-10.0 if loss == "siglip" else None))
    objective = ContrastiveObjective(model, ContrastiveObjectiveConfig(loss=loss))
    values = objective(batch())
    out = model(**batch())
    expected = (contrastive_loss(out.image_features, out.text_features, out.logit_scale) if loss == "clip"
                else sigmoid_loss(out.image_features, out.text_features, out.logit_scale, out.logit_bias))
    torch.testing.assert_close(values["contrastive_loss"], expected)
    with torch.no_grad():
        model.logit_scale.fill_(7.0)
    objective.after_step()
    assert model.logit_scale.item() == pytest.approx(math.log(100))


def test_siglip_loss_needs_a_bias():
    with pytest.raises(ValueError, match="init_logit_bias"):
        ContrastiveObjective(DualEncoder(tiny()), ContrastiveObjectiveConfig(loss="siglip"))
