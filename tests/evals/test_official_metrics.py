"""The official metrics in their edge cases, each against the definition of the version it names: COCOeval's
undefined values (pycocotools 2.0.x), VisDial v1.0's ranks, sparse metrics and NDCG
(visdial-challenge-starter-pytorch `visdialch/metrics.py`), NLVR2's consistency (lil-lab/nlvr
`nlvr2/eval/metrics.py`) and the REFER API's test split."""

import json
import pickle
import random

import pytest
import torch

from vlp.data.grounding import read_referring_expressions
from vlp.data.instructions import read_instructions
from vlp.data.nlvr import read_nlvr
from vlp.evals.detection import coco_metrics
from vlp.evals.instructions import ndcg, ranked_metrics, score_task
from vlp.tasks.nlvr import nlvr_metrics


def _coco(tmp_path, annotations, categories=("a", "b")):
    from pycocotools.coco import COCO

    path = tmp_path / "gt.json"
    path.write_text(json.dumps({
        "images": [{"id": 1, "file_name": "1.png", "width": 100, "height": 100}],
        "categories": [{"id": i + 1, "name": n} for i, n in enumerate(categories)],
        "annotations": [{"id": i + 1, "image_id": 1, "category_id": c, "bbox": b, "area": b[2] * b[3], "iscrowd": 0}
                        for i, (c, b) in enumerate(annotations)]}))
    return COCO(str(path))


def test_detection_leaves_classes_without_ground_truth_out_of_every_mean(tmp_path):
    coco = _coco(tmp_path, [(1, [10, 10, 20, 20])])
    found = [{"image_id": 1, "category_id": 1, "bbox": [10, 10, 20, 20], "score": 0.9}]
    metrics = coco_metrics(coco, found, novel=[1, 2])
    # COCOeval: class b has no box, so its AP is undefined (-1) and the novel mean is a's alone.
    assert metrics["per_class_AP"] == {"a": pytest.approx(1.0), "b": None}
    assert metrics["AP_novel"] == pytest.approx(1.0)
    assert metrics["AP_base"] is None
    # No large object: APl and ARl are undefined, not 0.
    assert metrics["APl"] is None and metrics["ARl"] is None
    assert metrics["AP"] == pytest.approx(1.0)


def test_detection_with_no_detections_scores_zero_where_there_is_ground_truth(tmp_path):
    metrics = coco_metrics(_coco(tmp_path, [(1, [10, 10, 20, 20])]), [])
    assert metrics["AP"] == 0.0 and metrics["per_class_AP"] == {"a": 0.0, "b": None} and metrics["APl"] is None


def _official_ranks(row):
    # visdialch's scores_to_ranks, with a stable sort so that ties go by index as its docs say.
    order = torch.tensor(row).sort(descending=True, stable=True).indices
    ranks = torch.empty_like(order)
    ranks[order] = torch.arange(len(row))
    return (ranks + 1).tolist()


def _official_ndcg(row, relevance):
    ranks = torch.tensor(_official_ranks(row))
    gains = torch.tensor(relevance, dtype=torch.float)
    k = int((gains != 0).sum())
    rankings = ranks.sort().indices[:k]
    best = gains.sort(descending=True).indices[:k]
    discounts = torch.log2(torch.arange(k).float() + 2)
    return float((gains[rankings] / discounts).sum() / (gains[best] / discounts).sum())


def test_visual_dialog_ranks_ties_by_index_as_visdial():
    metrics = ranked_metrics([[2, 2, 1, 0]], [0])
    assert metrics["mrr"] == 1.0 and metrics["accuracy"] == 1.0 and metrics["mean_rank"] == 1
    assert ranked_metrics([[2, 2, 1, 0]], [1])["mrr"] == 0.5


def test_visual_dialog_metrics_equal_the_official_definitions_on_random_tied_scores():
    rng = random.Random(0)
    scores = [[rng.choice([0.0, 0.5, 1.0, 1.5]) for _ in range(100)] for _ in range(200)]
    labels = [rng.randrange(100) for _ in scores]
    relevance = [[rng.choice([0.0, 0.0, 0.5, 1.0]) for _ in range(100)] for _ in scores]
    ranks = [_official_ranks(row)[label] for row, label in zip(scores, labels, strict=True)]
    metrics = ranked_metrics(scores, labels)
    assert metrics["accuracy"] == sum(r == 1 for r in ranks) / 200
    assert metrics["r@5"] == sum(r <= 5 for r in ranks) / 200 and metrics["r@10"] == sum(r <= 10 for r in ranks) / 200
    assert metrics["mean_rank"] == pytest.approx(sum(ranks) / 200)
    assert metrics["mrr"] == pytest.approx(sum(1 / r for r in ranks) / 200)
    expected = sum(_official_ndcg(s, g) for s, g in zip(scores, relevance, strict=True)) / 200
    assert ndcg(scores, relevance) == pytest.approx(expected, rel=1e-6)


def _visdial(tmp_path):
    (tmp_path / "VisualDialog_val2018_000000000007.jpg").write_bytes(b"")
    answers = [f"answer {i}" for i in range(120)]
    data = {"version": "1.0", "split": "val2018", "data": {
        "questions": ["is it red", "how many"], "answers": answers,
        "dialogs": [{"image_id": 7, "caption": "a red circle", "dialog": [
            {"question": 0, "answer": 3, "answer_options": list(range(100)), "gt_index": 3},
            {"question": 1, "answer": 105, "answer_options": list(range(10, 110)), "gt_index": 95}]}]}}
    (tmp_path / "visdial_1.0_val.json").write_text(json.dumps(data))
    dense = [{"image_id": 7, "round_id": 2, "gt_relevance": [1.0 if i == 95 else 0.0 for i in range(100)]}]
    (tmp_path / "dense.json").write_text(json.dumps(dense))
    return tmp_path / "visdial_1.0_val.json", tmp_path / "dense.json"


def test_visdial_v1_files_are_read_with_history_candidates_and_dense_relevance(tmp_path):
    dialogs, dense = _visdial(tmp_path)
    first, second = read_instructions(str(dialogs), dense=dense)
    assert first.images[0].name == "VisualDialog_val2018_000000000007.jpg"
    assert first.answer == "answer 3" and first.label == 3 and first.relevance is None
    assert second.label == 95 and len(second.candidates) == 100 and second.relevance[95] == 1.0
    assert "a red circle. Q: is it red? A: answer 3." in second.instruction and "how many?" in second.instruction
    scores = [[0.0] * 100, [1.0 if i == 95 else 0.0 for i in range(100)]]
    metrics = score_task([first, second], "mrr", scores=scores)
    assert metrics["r@1"] == 0.5 and metrics["ndcg"] == 1.0 and set(metrics) == {"mrr", "r@1", "r@5", "r@10",
                                                                               "mean_rank", "ndcg"}


def test_nlvr2_official_files_give_accuracy_and_consistency(tmp_path):
    rows = [{"identifier": f"dev-{s}-{p}-{n}", "sentence": f"sentence {s}-{n}", "label": "True" if p else "False",
             "left_url": "", "right_url": ""} for s in (1, 2) for n in (0, 1) for p in (0, 1)]
    (tmp_path / "dev").mkdir()
    (tmp_path / "dev" / "dev-1-0-img0.png").write_bytes(b"")
    path = tmp_path / "dev.json"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    items = read_nlvr(path)
    assert items[0].left == tmp_path / "dev" / "dev-1-0-img0.png" and items[0].right.name == "dev-1-0-img1.png"
    assert items[0].statement == items[1].statement == "dev-1-0" != items[2].statement
    # Right on every example but one: accuracy 7/8, and that one breaks its statement's consistency.
    right = [True] * 8
    right[2] = False
    metrics = nlvr_metrics(right, [i.statement for i in items])
    assert metrics == {"accuracy": 7 / 8, "consistency": 3 / 4}


def test_refcoco_test_split_is_every_test_split_as_the_refer_api(tmp_path):
    (tmp_path / "instances.json").write_text(json.dumps({
        "images": [{"id": 1, "file_name": "1.png"}],
        "annotations": [{"id": 1, "image_id": 1, "bbox": [0, 0, 10, 10]}]}))
    refs = [{"ref_id": i, "ann_id": 1, "split": split, "sentences": [{"sent": split}]}
            for i, split in enumerate(["train", "val", "testA", "testB", "testAB"])]
    (tmp_path / "refs(unc).p").write_bytes(pickle.dumps(refs))
    splits = {name: [e.split for e in read_referring_expressions(tmp_path / "refs(unc).p", split=name)]
              for name in ("test", "testA", "testB", "val")}
    assert splits == {"test": ["testA", "testB", "testAB"], "testA": ["testA", "testAB"], "testB": ["testB", "testAB"],
                      "val": ["val"]}
