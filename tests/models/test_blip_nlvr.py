"""BLIP-NLVR: two cross-attentions per layer (averaged, then concatenated and projected), started from
BLIP, trained on the shapes world's image-pair statements above the majority baseline."""

import json

import pytest
import torch
from test_blip_vqa import _tiny_pair

from conftest import BLIP_TINY, tiny_run_overrides
from vlp.checkpoint import load_checkpoint
from vlp.cli import main
from vlp.data.nlvr import read_nlvr
from vlp.data.sources import DataError
from vlp.models.blip import BlipNlvr, BlipNlvrConfig, TwoImageLayer
from vlp.train.config import load_run_config
from vlp.train.loop import train


def _tiny_nlvr():
    blip, _ = _tiny_pair()
    model = BlipNlvr(BlipNlvrConfig(vision=blip.cfg.vision, text=blip.cfg.text)).eval()
    return blip, model


def test_layers_average_then_merge_and_start_from_blips_cross_attention():
    blip, model = _tiny_nlvr()
    layers = list(model.text.layers)
    assert all(isinstance(layer, TwoImageLayer) for layer in layers)
    assert [layer.merge is not None for layer in layers] == [False, True]  # 2 layers: first half averages
    model.init_from(blip)
    for ours, theirs in zip(layers, blip.text.layers, strict=True):
        for attention in (ours.cross_attn, ours.cross_attn_right):
            torch.testing.assert_close(attention.q_proj.weight, theirs.cross_attn.q_proj.weight)
    g = torch.Generator().manual_seed(0)
    left, right = torch.randn(2, 3, 16, 16, generator=g), torch.randn(2, 3, 16, 16, generator=g)
    text, mask = torch.randint(6, 40, (2, 6), generator=g), torch.ones(2, 6, dtype=torch.long)
    with torch.no_grad():
        logits = model(left, right, text, mask)
        assert logits.shape == (2, 2)
        # The merge layer tells left from right; an average alone would not.
        assert not torch.allclose(model(right, left, text, mask), logits)
        model.text.layers[1].merge = None
        torch.testing.assert_close(model(right, left, text, mask), model(left, right, text, mask))


def test_reader_names_bad_entries(tmp_path):
    path = tmp_path / "pairs.json"
    path.write_text(json.dumps([{"images": ["a.png", "b.png"], "sentence": "x", "label": "maybe"}]))
    with pytest.raises(DataError, match="not true or false"):
        read_nlvr(path)
    path.write_text(json.dumps([{"images": ["a.png", "b.png"], "sentence": " ", "label": True}]))
    with pytest.raises(DataError, match="empty sentence"):
        read_nlvr(path)


def _fine_tune(world, blip, run, steps):
    overrides = {**BLIP_TINY, "model.family": "blip_nlvr", "train.init_from": str(blip),
                 "train.batch_size": 32, "train.lr": 5e-4}  # fmt: skip
    args = tiny_run_overrides(str(world / "nlvr_train.json"), steps=steps, **overrides)
    train(load_run_config(None, [a for a in args if not a.startswith("model.embed")]), run)
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _eval_command(run, data, world, out):
    assert main(["eval", "nlvr", "--checkpoint", str(run), "--data", str(data), "--images", str(world),
                 "--out", str(out)]) == 0  # fmt: skip
    return json.loads(out.read_text())["metrics"]


def test_fine_tuning_from_blip_and_the_eval_command_run(shapes_world, trained_blip, tmp_path):
    run = tmp_path / "nlvr"
    _fine_tune(shapes_world, trained_blip, run, steps=20)
    assert load_checkpoint(run).family.name == "blip_nlvr"
    metrics = _eval_command(run, shapes_world / "nlvr_test.json", shapes_world, tmp_path / "held_out.json")
    assert 0 <= metrics["accuracy"] <= 1 and 0.5 <= metrics["majority_baseline"] <= 1, metrics


@pytest.mark.slow  # 500 steps: about a minute on 2 cores
def test_fine_tuned_from_blip_learns_the_pair_statements(shapes_world, trained_blip, tmp_path):
    run = tmp_path / "nlvr"
    records = _fine_tune(shapes_world, trained_blip, run, steps=500)
    # Measured: training accuracy 0.49 -> 0.71 over 500 steps (0.64 after 300), 0.69 to 0.72 on 200 training
    # pairs; 0.53 to 0.55 on the 100 held-out pairs between identical runs (majority 0.50), which differ by
    # float rounding. Comparing counts across two images generalises poorly at this size (see docs/results/blip.md),
    # so held-out accuracy is evaluated, not asserted; the eval command is checked on training pairs, which
    # the model has learned.
    assert records[-1]["nlvr_accuracy"] > 0.65 and records[0]["nlvr_accuracy"] < 0.6, records[-1]
    seen = tmp_path / "nlvr_seen.json"
    seen.write_text(json.dumps(json.loads((shapes_world / "nlvr_train.json").read_text())[:200]))
    results = {name: _eval_command(run, data, shapes_world, tmp_path / f"{name}.json")
               for name, data in (("seen", seen), ("held_out", shapes_world / "nlvr_test.json"))}
    assert results["seen"]["accuracy"] > results["seen"]["majority_baseline"] + 0.05, results
    assert 0 <= results["held_out"]["accuracy"] <= 1, results
