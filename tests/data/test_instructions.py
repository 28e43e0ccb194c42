"""Instruction data: records and templates, the readers of vlp's formats, the shapes world's task suite, and
the balanced mixture sampler (proportions, passes without repeats, resuming, processes)."""

import json
import random
from collections import Counter

import numpy as np
import pytest
import torch

from vlp.data.instruction_batches import (
    InstructionCollate,
    InstructionDataConfig,
    MixtureBatchSampler,
    mixture_probabilities,
    training_records,
)
from vlp.data.instructions import (
    coco_caption_records,
    detection_records,
    nlvr_records,
    read_instructions,
    read_templates,
    vqa_records,
    vqg_records,
)
from vlp.data.sources import BadSamples, DataError


def test_templates_render_one_wording_filled_with_the_fields(tmp_path):
    templates = read_templates()
    assert len(templates["caption"]) == 13 and len(templates["vqa"]) == 10 and len(templates["vqg"]) == 6
    # Short-answer hints in some wordings, not all (the paper's reason: answers are not always brief).
    assert 0 < sum("short" in t.lower() for t in templates["vqa"]) < len(templates["vqa"])
    (tmp_path / "a.png").write_bytes(b"")
    (tmp_path / "r.jsonl").write_text(json.dumps(
        {"image": "a.png", "task": "vqa", "template": "vqa", "fields": {"question": "what colour?"}, "answer": "red"}
    ) + "\n")
    (record,) = read_instructions(str(tmp_path / "r.jsonl"))
    rendered = {record.render(templates, random.Random(seed)) for seed in range(200)}
    assert rendered == {t.format(question="what colour?") for t in templates["vqa"]}
    # A user's file adds names and replaces the shipped ones.
    (tmp_path / "mine.yaml").write_text("vqa: ['Q: {question} A:']\nmine: ['say {x}']\n")
    mine = read_templates(tmp_path / "mine.yaml")
    assert mine["vqa"] == ["Q: {question} A:"] and mine["mine"] == ["say {x}"] and "caption" in mine


def test_unusable_records_are_dropped_and_named_by_file_and_line(tmp_path):
    lines = [
        {"image": "a.png", "task": "caption", "template": "caption", "answer": "a red circle"},
        {"image": "a.png", "task": "vqa", "template": "vqa", "fields": {}, "answer": "red"},  # no {question}
        {"image": "a.png", "task": "x", "template": "nope", "answer": "red"},
        {"task": "x", "instruction": "say it", "answer": "red"},
        {"image": "a.png", "task": "x", "instruction": "say it"},  # no answer
        {"image": "a.png", "task": "x", "instruction": "pick", "answer": "c", "candidates": ["a", "b"]},
        {"image": ["a.png", "b.png"], "task": "pair", "instruction": "true?", "answer": "yes",
         "candidates": [["yes", "true"], ["no", "false"]]},
    ]
    path = tmp_path / "r.jsonl"
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n{not json\n")
    bad = BadSamples(max_fraction=1.0)
    records = read_instructions(str(path), bad=bad)
    assert [r.task for r in records] == ["caption", "pair"]
    assert records[1].label == 0 and len(records[1].images) == 2
    assert bad.dropped == Counter({"bad_record": 6})
    details = " | ".join(bad.examples)
    for expected in ("record 2: template 'vqa' wording", "record 3: unknown template 'nope'", "record 4: 'image'",
                     "record 5: no answer", "record 6: answer 'c' is none of the candidates", "record 8: not JSON"):
        assert expected in details, details
    # Too many bad records stop a run, naming the first ones.
    with pytest.raises(DataError, match="bad"):
        read_instructions(str(path), bad=BadSamples(max_fraction=0.05))
    with pytest.raises(DataError, match="not found"):
        read_instructions(str(tmp_path / "missing.jsonl"))


def test_training_records_must_agree_on_their_number_of_images(tmp_path):
    lines = [{"image": "a.png", "task": "caption", "instruction": "describe", "answer": "a red circle"},
             {"image": ["a.png", "b.png"], "task": "pair", "instruction": "true?", "answer": "yes"}]
    (tmp_path / "r.jsonl").write_text("\n".join(json.dumps(line) for line in lines))
    with pytest.raises(DataError, match="same number of images; task caption has 1 and task pair has 2"):
        training_records(InstructionDataConfig(train=str(tmp_path / "r.jsonl")))


def test_the_readers_turn_vlps_formats_into_records(shapes_world):
    captions = coco_caption_records(shapes_world / "captions_test.json")
    assert captions[0].template == "caption" and captions[0].answer in captions[0].answers
    vqa = vqa_records(shapes_world / "vqa" / "questions_test.json", shapes_world / "vqa" / "annotations_test.json",
                      images_dir=shapes_world, image_pattern="images/test/{image_id:06d}.png")
    assert len(vqa[0].answers) == 10 and vqa[0].fields["question"].endswith("?") and vqa[0].images[0].is_file()
    assert Counter(vqa[0].answers).most_common(1)[0][0] == vqa[0].answer
    vqg = vqg_records(shapes_world / "vqa" / "questions_test.json", shapes_world / "vqa" / "annotations_test.json",
                      images_dir=shapes_world, image_pattern="images/test/{image_id:06d}.png")
    assert vqg[0].answer == vqa[0].fields["question"] and vqg[0].fields == {"answer": vqa[0].answer}
    pairs = nlvr_records(shapes_world / "nlvr_test.json")
    assert all(len(r.images) == 2 and r.label in (0, 1) for r in pairs)
    regions = detection_records(shapes_world / "instances_test.json")
    instances = json.loads((shapes_world / "instances_test.json").read_text())
    first = instances["annotations"][0]
    x, y, w, h = (v / 48 for v in first["bbox"])
    assert regions[0].answer == first["name"]  # "red circle": the annotation's own name over its category's
    assert regions[0].fields["region"] == f"[{x:.2f}, {y:.2f}, {x + w:.2f}, {y + h:.2f}]"


def test_the_shapes_world_suite_holds_ten_formats_and_keeps_the_held_out_ones_out_of_training(shapes_world,
                                                                                              tmp_path):
    from vlp.shapes.instructions import make_instruction_suite

    manifest = make_instruction_suite(shapes_world, tmp_path / "suite", per_task=20)
    tasks = manifest["tasks"]
    assert len(tasks) >= 10 and len({t["category"] for t in tasks.values()}) >= 6
    held_out = {name for name, t in tasks.items() if t["split"] == "held_out"}
    assert {"spatial", "multiple_choice", "pair_statement", "dialog", "classify", "count"} <= held_out
    train = read_instructions(str(tmp_path / "suite" / "train.jsonl"))
    assert {r.task for r in train} == set(tasks) - held_out
    assert all(r.template is not None for r in train)  # wordings are drawn in training
    sizes = Counter(r.task for r in train)
    assert sizes["vqg"] < sizes["region"] < sizes["caption"]  # imbalanced on purpose
    for task in tasks.values():
        records = read_instructions(str(tmp_path / "suite" / task["file"]))
        assert len(records) == 20 and all(r.instruction and all(p.is_file() for p in r.images) for r in records)
        assert (task["method"] == "rank") == all(r.candidates is not None and r.label is not None for r in records)
    dialog = read_instructions(str(tmp_path / "suite" / "test" / "dialog.jsonl"))[0]
    assert len(dialog.candidates) == 10 and "Q:" in dialog.instruction


@pytest.mark.parametrize("sampling", ["sqrt", "proportional", "uniform"])
def test_datasets_are_drawn_in_the_asked_proportions(sampling):
    sizes = {"big": 10_000, "mid": 400, "small": 4}
    weights = {"mid": 2.0}
    p = mixture_probabilities(sizes, sampling, weights)
    raw = {"sqrt": {"big": 100, "mid": 2 * 20, "small": 2}, "proportional": {"big": 10_000, "mid": 800, "small": 4},
           "uniform": {"big": 1, "mid": 2, "small": 1}}[sampling]
    assert p == pytest.approx({k: v / sum(raw.values()) for k, v in raw.items()})
    sampler = iter(MixtureBatchSampler(list(sizes.values()), list(p.values()), 64, seed=1))
    counts = np.zeros(3)
    for _ in range(300):
        for index, _ in next(sampler):
            counts[0 if index < 10_000 else 1 if index < 10_400 else 2] += 1
    expected = np.array(list(p.values())) * counts.sum()
    assert np.all(np.abs(counts - expected) <= 4 * np.sqrt(expected) + 1), (counts, expected)
    with pytest.raises(DataError, match="weights names datasets the data does not have: nope"):
        mixture_probabilities(sizes, sampling, {"nope": 1.0})


def test_the_sampler_covers_each_dataset_once_per_pass_resumes_exactly_and_splits_across_processes():
    sizes, probabilities = [30, 7], [0.5, 0.5]
    whole = iter(MixtureBatchSampler(sizes, probabilities, 8, seed=3))
    batches = [next(whole) for _ in range(40)]
    small = [(i, epoch) for batch in batches for i, epoch in batch if i >= 30]
    for epoch in range(3):  # every pass over the small dataset draws each of its items once
        assert sorted(i for i, e in small if e == epoch) == list(range(30, 37))
    resumed = iter(MixtureBatchSampler(sizes, probabilities, 8, seed=3, start_step=25))
    assert [next(resumed) for _ in range(15)] == batches[25:]
    ranks = [iter(MixtureBatchSampler(sizes, probabilities, 4, seed=3, rank=r, world_size=2)) for r in (0, 1)]
    for batch in batches[:10]:
        assert next(ranks[0]) + next(ranks[1]) == batch


def test_a_batch_stacks_image_pairs_and_tokenises_the_instruction_for_both_sides():
    from vlp.assets.tokenizer import TokenizerConfig, train_tokenizer

    texts = ["is the circle red", "yes", "no", "a red circle left of a blue square"] * 10
    lm = train_tokenizer(texts, TokenizerConfig(vocab_size=200, context_length=16))
    qformer = train_tokenizer(texts, TokenizerConfig(kind="wordpiece", vocab_size=200, context_length=16,
                                                     pad_token="[PAD]", unk_token="[UNK]", bos_token="[CLS]",
                                                     eos_token="[SEP]"))
    items = [{"images": [torch.zeros(3, 8, 8), torch.ones(3, 8, 8)], "instruction": "is the circle red",
              "answer": "yes"}, {"bad": "unreadable"},
             {"images": [torch.ones(3, 8, 8)] * 2, "instruction": "a red circle", "answer": "no"}]
    batch = InstructionCollate(lm, qformer)(items)
    assert batch["bad"] == ["unreadable"]
    assert batch["image"].shape == (2, 2, 3, 8, 8) and batch["image"][0, 1].eq(1).all()
    assert batch["text"][0, 0] == lm.framing_ids()[0] and batch["instruction"][0, 0] == qformer.token_id("[CLS]")
    assert batch["answer"].shape[0] == 2 and batch["size"] == 2
    single = InstructionCollate(lm)([{"images": [torch.zeros(3, 8, 8)], "instruction": "x", "answer": "y"}])
    assert single["image"].shape == (1, 3, 8, 8) and "instruction" not in single


def test_the_suite_and_its_evaluation_refuse_bad_input_in_one_line(shapes_world, tmp_path, capsys):
    from vlp.cli import main

    assert main(["data", "instructions", "--world", str(tmp_path), "--out", str(tmp_path / "s")]) == 2
    assert "is not a shapes world" in capsys.readouterr().err
    assert main(["data", "instructions", "--world", str(shapes_world), "--out", str(tmp_path / "s"),
                 "--per-task", "0"]) == 2
    assert "--per-task: 0 is out of range (must be >= 1)" in capsys.readouterr().err
    assert main(["data", "instructions", "--world", str(shapes_world), "--out", str(tmp_path / "s"),
                 "--per-task", "4"]) == 0
    assert "10 test tasks (6 held out)" in capsys.readouterr().out
    from vlp.tasks import GivenFunctions
    from vlp.tasks.instructions import InstructionsEvalConfig, evaluate_instructions

    def never(*_):
        raise AssertionError("not reached")

    functions = GivenFunctions(answer=never, score_answers=never)
    with pytest.raises(DataError, match="has no task nope"):
        evaluate_instructions(functions, InstructionsEvalConfig(str(tmp_path / "s" / "tasks.json"), task=["nope"]))
    suite = json.loads((tmp_path / "s" / "tasks.json").read_text())
    suite["tasks"]["vqa"]["metric"] = "bleu"
    (tmp_path / "s" / "bad.json").write_text(json.dumps(suite))
    with pytest.raises(DataError, match="task 'vqa' has metric 'bleu'"):
        evaluate_instructions(functions, InstructionsEvalConfig(str(tmp_path / "s" / "bad.json")))


def test_a_long_instruction_loses_its_start_not_the_question_at_its_end():
    from vlp.assets.tokenizer import TokenizerConfig, train_tokenizer

    words = "dialog history q what shape is the red one a circle question how many shapes are there answer"
    tokenizer = train_tokenizer([words] * 20, TokenizerConfig(kind="wordpiece", vocab_size=120, context_length=8,
                                                              pad_token="[PAD]", unk_token="[UNK]", bos_token="[CLS]",
                                                              eos_token="[SEP]"))
    batch = InstructionCollate(tokenizer, tokenizer)([{"images": [torch.zeros(3, 4, 4)], "instruction": words,
                                                       "answer": "two"}])
    for key in ("text", "instruction"):
        ids = batch[key][0].tolist()
        assert (ids[0], ids[-1]) == tokenizer.framing_ids() and tokenizer.decode(ids).endswith("answer"), ids
    assert not tokenizer.decode(tokenizer([words])[0][0].tolist()).endswith("answer")  # the tokenizer cuts the end
