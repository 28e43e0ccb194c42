"""InstructBLIP: the instruction reaches the queries (and never the image encoder), the loss is the language
model's on the answer alone, image pairs read frame by frame, ranking picks the most likely candidate, and a
run goes from BLIP-2's two stages to instruction tuning, evaluation and `vlp ask`."""

import json

import pytest
import torch
import torch.nn.functional as F

from vlp.assets import INSTRUCTION
from vlp.losses import sequence_losses
from vlp.objectives.instructblip import InstructBlipObjective, InstructBlipObjectiveConfig
from vlp.registry import create_model


def _model(**overrides):
    torch.manual_seed(0)
    # fp32 tower: a bf16 convolution rounds differently for batches of different sizes
    return create_model("instructblip-tiny", image={"vision_precision": "fp32"}, **overrides).eval()


def _instruction(*rows: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Q-Former ids ([CLS] = 2, [SEP] = 3, padding 0)."""
    width = max(len(r) for r in rows) + 2
    ids = torch.tensor([[2, *r, 3] + [0] * (width - len(r) - 2) for r in rows])
    return ids, (ids != 0).long()


@torch.no_grad()
def test_the_instruction_reaches_the_queries_but_not_the_image_encoder():
    model = _model()
    images = torch.randn(2, 3, 48, 48)
    seen = []
    model.image_encoder.register_forward_hook(lambda module, args, out: seen.append(out.clone()))
    first = model.soft_prompt(images, instruction=_instruction([10, 11], [12])[0],
                              instruction_mask=_instruction([10, 11], [12])[1])
    ids, mask = _instruction([20, 21], [22])
    second = model.soft_prompt(images, instruction=ids, instruction_mask=mask)
    assert first.shape == (2, model.cfg.qformer.num_queries, model.language_model.config.hidden_size)
    assert not torch.allclose(first, second)  # another instruction, other visual features
    torch.testing.assert_close(seen[0], seen[1])  # the image encoder's output never depends on the text
    # Padding of the instruction changes nothing.
    padded = torch.cat([ids, torch.zeros(2, 3, dtype=torch.long)], dim=1)
    torch.testing.assert_close(model.soft_prompt(images, instruction=padded, instruction_mask=(padded != 0).long()),
                               second, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="reads the instruction"):
        model.soft_prompt(images)


@torch.no_grad()
def test_without_text_input_the_queries_ignore_the_instruction():
    """The paper's ablation (LAVIS qformer_text_input=False): the Q-Former has no text side."""
    model = _model(qformer={"text_input": False})
    images = torch.randn(2, 3, 48, 48)
    a, b = _instruction([10], [11]), _instruction([20, 21], [22, 23])
    torch.testing.assert_close(model.soft_prompt(images, instruction=a[0], instruction_mask=a[1]),
                               model.soft_prompt(images, instruction=b[0], instruction_mask=b[1]))
    assert model.qformer.word_embeddings is None


@torch.no_grad()
def test_image_pairs_give_one_soft_prompt_per_image_in_order():
    model = _model()
    pair = torch.randn(2, 2, 3, 48, 48)
    ids, mask = _instruction([10], [11])
    prompt = model.soft_prompt(pair, instruction=ids, instruction_mask=mask)
    q = model.cfg.qformer.num_queries
    assert prompt.shape[1] == 2 * q
    torch.testing.assert_close(prompt[:, q:], model.soft_prompt(pair[:, 1], instruction=ids, instruction_mask=mask))
    swapped = model.soft_prompt(pair.flip(1), instruction=ids, instruction_mask=mask)
    torch.testing.assert_close(swapped[:, :q], prompt[:, q:])


def test_the_loss_is_the_language_models_cross_entropy_on_the_answer_alone():
    """[soft prompt; start, instruction; answer, end]: only the answer and its end token are targets."""
    model = _model()
    model.train()
    images = torch.randn(2, 3, 48, 48)
    text = torch.tensor([[2, 40, 41, 42, 3], [2, 50, 3, 0, 0]])  # the LM's start 2, end 3, padding 0
    answer = torch.tensor([[2, 60, 61, 3], [2, 70, 3, 0]])
    instruction, instruction_mask = _instruction([10, 11], [12])
    batch = {"image": images, "text": text, "text_mask": (text != 0).long(), "answer": answer,
             "answer_mask": (answer != 0).long(), "instruction": instruction, "instruction_mask": instruction_mask}
    loss = InstructBlipObjective(model, InstructBlipObjectiveConfig())(batch)["lm_loss"]
    lm = model.language_model
    expected_terms = []
    for row in range(2):
        prompt = model.soft_prompt(images[row : row + 1], instruction=instruction[row : row + 1],
                                   instruction_mask=instruction_mask[row : row + 1])
        question = text[row][text[row] != 0][:-1]  # start and instruction, no end token
        target = answer[row][answer[row] != 0][1:]  # the answer and its end token
        ids = torch.cat([question, target])[None]
        logits = lm(inputs_embeds=torch.cat([prompt, lm.get_input_embeddings()(ids)], dim=1)).logits[0]
        start = prompt.shape[1] + len(question) - 1
        expected_terms.append(F.cross_entropy(logits[start : start + len(target)].float(), target, reduction="none"))
    torch.testing.assert_close(loss, torch.cat(expected_terms).mean(), atol=1e-4, rtol=1e-4)
    loss.backward()
    assert model.qformer.word_embeddings.weight.grad is not None  # the instruction's side trains
    assert all(p.grad is None for p in model.language_model.parameters())
    assert all(p.grad is None for p in model.image_encoder.visual.parameters())


def test_ranking_picks_the_candidate_of_highest_likelihood(tmp_path):
    from vlp.checkpoint import load_checkpoint
    from vlp.tasks.vqa import VqaPredictor

    checkpoint = _checkpoint(tmp_path)
    pretrained = load_checkpoint(checkpoint)
    predictor = VqaPredictor(pretrained, device="cpu")
    image = str(tmp_path / "x.png")
    candidates = [["red", "blue", "a green star"], [["yes", "true"], ["no", "false"]]]
    scores = predictor.score_answers([image, image], ["what colour?", "is it red?"], candidates)
    # By hand: each word's summed log-likelihood after the same instruction.
    model, tokenizer = pretrained.model, pretrained.tokenizer
    for question, options, row in zip(["what colour?", "is it red?"], candidates, scores, strict=True):
        ids, mask = tokenizer([question])
        qids, qmask = pretrained.assets.tokenizers[INSTRUCTION]([question])
        pixels = predictor.pixels([image])
        with torch.no_grad():
            states = model.encode_question(pixels, ids, mask, qids, qmask)
            for option, score in zip(options, row, strict=True):
                words = [option] if isinstance(option, str) else option
                best = -float("inf")
                for word in words:
                    answer, answer_mask = tokenizer([word])
                    length = int(answer_mask.sum())
                    logits = model.answer_logits(answer[:, :length], answer_mask[:, :length], states, mask)
                    best = max(best, -sequence_losses(logits, answer[:, :length], answer_mask[:, :length]).item())
                assert score == pytest.approx(best, abs=1e-4)
    # The evaluation's choice is the best score.
    from vlp.evals.instructions import ranked_metrics

    assert ranked_metrics([[0.0, -1.0, -2.0]], [0]) == {"accuracy": 1.0, "r@5": 1.0, "r@10": 1.0, "mean_rank": 1.0,
                                                        "mrr": 1.0}
    assert ranked_metrics([[-3.0, -1.0, -2.0]], [0])["mrr"] == pytest.approx(1 / 3)
    # Ties go by index, as VisDial's scores_to_ranks: the first of two tied candidates wins.
    assert ranked_metrics([[-1.0, -1.0]], [0])["accuracy"] == 1.0
    assert ranked_metrics([[-1.0, -1.0]], [1])["accuracy"] == 0.0


def _checkpoint(tmp_path, qformer_tokenizer: bool = True):
    """A random tiny InstructBLIP saved with its two tokenizers (or without the Q-Former's), and an image."""
    from PIL import Image

    from vlp.assets import IMAGE, TEXT, Assets
    from vlp.assets.image import ImageConfig
    from vlp.assets.tokenizer import TokenizerConfig, train_tokenizer
    from vlp.checkpoint import save_checkpoint
    from vlp.registry import parse_model_config

    family, cfg = parse_model_config({"preset": "instructblip-tiny", "image": {"vision_precision": "fp32"}})
    texts = ["a red circle", "two blue squares", "what colour is the circle", "yes no true false green star"] * 20
    tokenizer = train_tokenizer(texts, TokenizerConfig(vocab_size=300, context_length=32))
    qformer = train_tokenizer(texts, TokenizerConfig(kind="wordpiece", vocab_size=300, context_length=32,
                                                     pad_token="[PAD]", unk_token="[UNK]", bos_token="[CLS]",
                                                     eos_token="[SEP]", extra_tokens=("[DEC]",)))
    torch.manual_seed(0)
    tmp_path.mkdir(exist_ok=True)
    Image.new("RGB", (48, 48), (200, 30, 30)).save(tmp_path / "x.png")
    return save_checkpoint(tmp_path / "instructblip", family=family, model_config=cfg, model=family.model_cls(cfg),
                           assets=Assets({TEXT: tokenizer, **({INSTRUCTION: qformer} if qformer_tokenizer else {})},
                                         {IMAGE: ImageConfig(size=48)}))


def test_ask_follows_an_instruction_and_a_checkpoint_without_its_qformer_tokenizer_is_named(tmp_path, capsys):
    from vlp.checkpoint import load_checkpoint
    from vlp.cli import main

    checkpoint = _checkpoint(tmp_path)
    assert INSTRUCTION in load_checkpoint(checkpoint).assets.tokenizers
    image = str(tmp_path / "x.png")
    assert main(["ask", image, "Write a short description for the image.", "--checkpoint", str(checkpoint)]) == 0
    assert capsys.readouterr().out.count("\n") == 1
    broken = _checkpoint(tmp_path / "b", qformer_tokenizer=False)
    assert main(["ask", image, "what?", "--checkpoint", str(broken)]) == 2
    assert "needs its Q-Former's tokenizer" in capsys.readouterr().err


def test_from_blip2_stages_to_instruction_tuning_evaluation_and_ask(shapes_world, tmp_path, capsys):
    """Stage 1 (its Q-Former text side and tokenizer as `sources.qformer`), stage 2 (`train.init_from`),
    instruction tuning on the shapes world's suite: the answer loss falls, the run resumes exactly, and the
    checkpoint is evaluated on every task and answers `vlp ask`."""
    from conftest import tiny_run_overrides
    from vlp.checkpoint import load_checkpoint
    from vlp.cli import main
    from vlp.shapes.instructions import make_instruction_suite
    from vlp.train.config import load_run_config
    from vlp.train.loop import train

    suite = tmp_path / "suite"
    make_instruction_suite(shapes_world, suite, per_task=6)
    data = str(shapes_world / "train.csv")
    common = {"train.batch_size": 16, "train.log_every": 10, "image.size": 48}

    def run(config: str, out, steps: int, data: str, *extra: str):
        overrides = [o for o in tiny_run_overrides(data, steps=steps, **common) if not o.startswith(("model.", "tokenizer."))]
        train(load_run_config(f"configs/{config}", [*overrides, *extra]), tmp_path / out)
        return tmp_path / out

    stage1 = run("blip2-qformer-tiny.yaml", "stage1", 10, data, "tokenizer.vocab_size=512")
    stage2 = run("blip2-tiny.yaml", "stage2", 10, data, f"train.init_from={stage1}", "tokenizer.vocab_size=512",
                 "tokenizer.context_length=48")
    tuned = run("instructblip-tiny.yaml", "tuned", 60, str(suite / "train.jsonl"), f"train.init_from={stage2}",
                f"model.sources.qformer={stage1}", "train.lr=2e-3", "train.save_every=30", "train.keep_checkpoints=3")
    records = [json.loads(line) for line in (tuned / "metrics.jsonl").read_text().splitlines()]
    # The tiny LM is random and frozen: the soft prompt moves its loss only a little (docs/results/instructblip.md's runs on the
    # real SmolLM2 measure what instruction tuning reaches).
    assert records[-1]["lm_loss"] < records[0]["lm_loss"] - 0.05, records
    loaded = load_checkpoint(tuned)
    assert loaded.family.name == "instructblip" and INSTRUCTION in loaded.assets.tokenizers
    assert loaded.assets.tokenizers[INSTRUCTION].vocab_size == load_checkpoint(stage1).tokenizer.vocab_size
    # Resuming from step 30 redraws the same mixture and ends with the same weights.
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    import shutil

    shutil.copytree(tuned / "checkpoints" / "step_00000030", resumed / "checkpoints" / "step_00000030")
    (resumed / "metrics.jsonl").write_text("".join(line + "\n" for line in
                                                   (tuned / "metrics.jsonl").read_text().splitlines()[:3]))
    cfg = load_run_config(None, [], base=json.loads((resumed / "checkpoints" / "step_00000030" / "state.json")
                                                    .read_text())["run"])
    train(cfg, resumed, resume="latest")
    for key, value in load_checkpoint(resumed).model.state_dict().items():
        torch.testing.assert_close(value, loaded.model.state_dict()[key], atol=2e-5, rtol=1e-4)

    assert main(["eval", "instructions", "--checkpoint", str(tuned), "--tasks", str(suite / "tasks.json"),
                 "--limit", "3", "--beams", "1", "--max-new-tokens", "4", "--out", str(tmp_path / "eval.json")]) == 0
    result = json.loads((tmp_path / "eval.json").read_text())
    assert {"held_in/mean", "held_out/mean", "dialog/mrr", "pair_statement/accuracy", "caption/cider"} <= set(
        result["metrics"])
    assert all(len(p) == 3 for p in result["predictions"].values())
    capsys.readouterr()
    image = str(shapes_world / "images" / "test" / "000001.png")
    assert main(["ask", image, "What colour is the circle? Short answer:", "--checkpoint", str(tuned)]) == 0
    assert capsys.readouterr().out.count("\n") == 1
