"""The image-text matching task: scores of pairs by a matching head or by embeddings, its evaluation's metrics
against hand-computed ones, and the command's bad input as one line."""

import csv
import dataclasses
import json

import pytest

from vlp.cli import main
from vlp.convert import load_pretrained
from vlp.errors import DataError
from vlp.tasks import GivenFunctions, predict_functions
from vlp.tasks.matching import MatchingEvalConfig, evaluate_matching, match_scores, matching_metrics


def test_metrics_are_the_rank_statistics_computed_by_hand():
    # Ranked: 0.9 (+), 0.8 (-), 0.7 (+), 0.1 (-): 3 of the 4 (+, -) pairs are ordered right.
    metrics = matching_metrics([0.9, 0.8, 0.7, 0.1], [1, 0, 1, 0])
    assert metrics["roc_auc"] == pytest.approx(0.75)
    assert metrics["average_precision"] == pytest.approx((1 / 1 + 2 / 3) / 2)
    assert matching_metrics([0.5, 0.5], [1, 0])["roc_auc"] == pytest.approx(0.5)  # a tie counts half
    with pytest.raises(DataError, match="both matching and mismatched"):
        matching_metrics([0.3], [1])


def test_a_trained_model_tells_matching_from_mismatched_pairs_by_either_method(trained_blip, shapes_world, tmp_path):
    functions = predict_functions(load_pretrained(trained_blip), device="cpu")
    captions = json.loads((shapes_world / "captions_test.json").read_text())
    keep = {image["id"] for image in captions["images"][:40]}  # 200 matching and 200 mismatched pairs
    captions["images"] = [image for image in captions["images"] if image["id"] in keep]
    captions["annotations"] = [a for a in captions["annotations"] if a["image_id"] in keep]
    subset = tmp_path / "captions.json"
    subset.write_text(json.dumps(captions))
    config = MatchingEvalConfig(str(subset), images=str(shapes_world))
    by_head = evaluate_matching(functions, config)
    by_embeddings = evaluate_matching(functions, dataclasses.replace(config, method="cosine"))
    assert by_head.protocol.startswith("the matching head") and by_embeddings.protocol.startswith("the cosine")
    # Measured on the 400-step tiny BLIP: AUC 0.94 (head) and 0.96 (embeddings); chance is 0.5.
    for result in (by_head, by_embeddings):
        assert result.metrics["roc_auc"] > 0.7, result.metrics
        assert result.metrics["mean_score_matching"] > result.metrics["mean_score_mismatched"]
    # The same scores through hand-given functions: the evaluation sees only predict functions.
    given = GivenFunctions(pair_similarities=functions.pair_similarities)
    assert evaluate_matching(given, config).metrics == by_embeddings.metrics
    # A labelled CSV, as a user's own pairs come, scored by the command line.
    rows = [(image, text, 1) for image, text in zip(*_first_pairs(shapes_world), strict=True)]
    rows += [(image, "a purple hexagon on its own", 0) for image, _, _ in rows]
    data = tmp_path / "pairs.csv"
    with data.open("w", newline="") as f:
        csv.writer(f).writerows([("filepath", "title", "label"), *rows])
    out = tmp_path / "matching.json"
    assert main(["eval", "matching", "--checkpoint", str(trained_blip), "--data", str(data), "--out", str(out)]) == 0
    assert json.loads(out.read_text())["metrics"]["roc_auc"] > 0.7
    scores, method = match_scores(functions, [rows[0][0], rows[0][0]], [rows[0][1], "a purple hexagon on its own"])
    assert method == "itm" and scores[0] > scores[1]


def _first_pairs(world, count=20):
    captions = json.loads((world / "captions_test.json").read_text())
    files = {image["id"]: str(world / image["file_name"]) for image in captions["images"]}
    pairs = [(files[a["image_id"]], a["caption"]) for a in captions["annotations"][:count]]
    return [p for p, _ in pairs], [t for _, t in pairs]


def test_bad_pairs_and_a_model_that_cannot_match_are_one_line_errors(trained_blip, shapes_world, tmp_path, capsys):
    data = tmp_path / "pairs.csv"
    data.write_text(f"filepath,title,label\n{shapes_world / 'images/test/000001.png'},a red circle,yes\n")
    assert main(["eval", "matching", "--checkpoint", str(trained_blip), "--data", str(data)]) == 2
    assert f"{data} line 2: label 'yes' is not 0 or 1" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # argparse's own refusal: the usage and one error line
        main(["eval", "matching", "--checkpoint", str(trained_blip), "--data", str(data), "--method", "best"])
    assert "argument --method: invalid choice: 'best'" in capsys.readouterr().err
    image = str(shapes_world / "images" / "test" / "000001.png")
    assert main(["match", image, "--texts", "a red circle", "a blue star", "--checkpoint", str(trained_blip)]) == 0
    assert capsys.readouterr().out.count("(itm)") == 2
