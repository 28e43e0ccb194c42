"""Referring-expression grounding: the RefCOCO layout the shapes world writes and its safe reading,
precision@1 by hand, and the baselines."""

import pickle

import pytest

from vlp.data.grounding import read_referring_expressions
from vlp.data.sources import DataError
from vlp.evals.grounding import evaluate_grounding, precision_at_1


def test_the_shapes_world_writes_refcoco_layout_with_unique_relational_expressions(shapes_world):
    test = read_referring_expressions(shapes_world / "refcoco" / "refs(unc).p", split="test")
    train = read_referring_expressions(shapes_world / "refcoco" / "refs(unc).p", split="train")
    assert test and train and all(e.image.is_file() for e in test[:20])
    assert {e.split for e in test} == {"test"}
    assert any(" to the left of the " in e.sentence or " above the " in e.sentence for e in test)
    for expression in test:
        assert expression.box in expression.candidates
    # Each sentence names one object: no other object of the same image carries the same sentence.
    by_image: dict = {}
    for expression in test:
        by_image.setdefault((expression.image, expression.sentence), set()).add(expression.box)
    assert all(len(boxes) == 1 for boxes in by_image.values())


def test_refs_pickles_are_read_as_data_only(tmp_path, shapes_world):
    class Payload:
        def __reduce__(self):
            return (print, ("pwned",))

    bad = tmp_path / "refs(unc).p"
    bad.write_bytes(pickle.dumps([Payload()]))
    with pytest.raises(DataError, match="only lists, dicts"):
        read_referring_expressions(bad, shapes_world / "refcoco" / "instances.json")
    with pytest.raises(DataError, match="no referring expression in split 'val'"):
        read_referring_expressions(shapes_world / "refcoco" / "refs(unc).p", split="val")


def test_precision_at_1_counts_overlaps_of_at_least_half():
    truth = [(0, 0, 10, 10)] * 3
    predicted = [(0, 0, 10, 10), (0, 0, 10, 5), (0, 0, 10, 4.9)]  # IoU 1, 0.5, 0.49
    assert precision_at_1(predicted, truth) == pytest.approx(2 / 3)


def test_baselines_choose_among_the_annotated_regions(shapes_world):
    expressions = read_referring_expressions(shapes_world / "refcoco" / "refs(unc).p", split="test")
    result = evaluate_grounding(lambda es: [e.box for e in es], expressions, method="oracle", dataset="shapes")
    metrics = result.metrics
    assert metrics["precision@1"] == 1.0
    # 1-3 objects per scene: a random region is right about half the time, never always.
    assert 0.3 < metrics["random_proposal_precision@1"] < 0.8
    assert 0.2 < metrics["largest_proposal_precision@1"] < 0.9
