"""Every registered family from its tiny preset: it builds, trains (a few optimiser steps lower its loss on
a repeated batch), saves and loads to identical outputs, and every ability it declares runs through the
predictors. The sweep runs every shipped run config (configs/*.yaml, each naming a tiny preset and its
tokenizer), so a new family gets all of this from its registry entry and its run config."""

import dataclasses
import random
from pathlib import Path

import pytest
import torch
from PIL import Image

from vlp.abilities import ABILITIES
from vlp.assets import IMAGE, INSTRUCTION, TEXT, Assets
from vlp.assets.image import ImageConfig, ImageTransform
from vlp.assets.tokenizer import TokenizerConfig, train_tokenizer
from vlp.checkpoint import Pretrained, load_checkpoint, save_checkpoint
from vlp.config import ConfigError, from_dict, read_mapping
from vlp.data.detection import BOXES, DetectionCollate
from vlp.data.instruction_batches import INSTRUCTION_RECORDS, InstructionCollate
from vlp.data.nlvr import IMAGE_PAIR_STATEMENTS, NlvrCollate
from vlp.data.pipeline import IMAGE_TEXT_PAIRS, Collate
from vlp.data.vqa import VQA_ANSWERS, VqaCollate
from vlp.objectives.recipes import RECIPES, recipe_of
from vlp.registry import FAMILIES, create_model, list_presets, parse_model_config, read_preset
from vlp.tasks import FUNCTIONS, TASKS, predict_functions
from vlp.train.optim import make_optimizer

CONFIGS = sorted((Path(__file__).parent.parent / "configs").glob("*.yaml"))
WORDS = ["red", "blue", "green", "circle", "square", "triangle", "small", "large", "two", "one", "yes", "no"]


def _caption(rng: random.Random) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 6)))


def _image(rng: random.Random, size: int) -> Image.Image:
    return Image.new("RGB", (size, size), tuple(rng.randrange(256) for _ in range(3)))


# One collate and one sample maker per kind of training data: a new family on an existing kind needs nothing here.
def _caption_items(rng, tensor):
    return [{"image": tensor(), "caption": _caption(rng)} for _ in range(8)]


def _vqa_items(rng, tensor):
    return [{"image": tensor(), "question": _caption(rng) + "?", "answers": [(rng.choice(WORDS), 0.7), ("no", 0.3)]}
            for _ in range(8)]  # fmt: skip


def _pair_items(rng, tensor):
    return [{"left": tensor(), "right": tensor(), "sentence": _caption(rng), "label": i % 2} for i in range(8)]


def _instruction_items(rng, tensor):
    return [{"images": [tensor()], "instruction": _caption(rng) + "?", "answer": rng.choice(WORDS)} for _ in range(8)]


def _detection_items(rng, tensor):
    return [{"image": tensor(), "boxes": torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.7, 0.6, 0.3, 0.2]]),
             "labels": [[0], [1]], "queries": [_caption(rng), _caption(rng), _caption(rng)]} for _ in range(8)]


DATA_KINDS = {IMAGE_TEXT_PAIRS: (Collate, _caption_items), VQA_ANSWERS: (VqaCollate, _vqa_items),
         IMAGE_PAIR_STATEMENTS: (NlvrCollate, _pair_items), INSTRUCTION_RECORDS: (InstructionCollate, _instruction_items),
         BOXES: (DetectionCollate, _detection_items)}  # fmt: skip
# The Q-Former's own tokenizer, for families that read instructions there (the tiny presets' special ids).
QFORMER_TOKENIZER = TokenizerConfig(kind="wordpiece", vocab_size=256, context_length=32, pad_token="[PAD]",
                                    unk_token="[UNK]", bos_token="[CLS]", eos_token="[SEP]", extra_tokens=("[DEC]",))


def test_every_family_is_swept_and_every_preset_parses():
    swept = {parse_model_config(read_mapping(path)["model"])[0].name for path in CONFIGS}
    assert swept == set(FAMILIES) == set(RECIPES)
    for name in list_presets():
        family, config = parse_model_config(read_preset(name))
        assert isinstance(config, family.config_cls), name
    with pytest.raises(ConfigError, match="unknown preset 'clip-tinyy'"):
        parse_model_config({"preset": "clip-tinyy"})


def test_a_preset_takes_overrides_and_a_tower_of_another_kind_replaces_its_section():
    _, config = parse_model_config({"preset": "clip-tiny", "embed_dim": 64, "text": {"layers": 2}})
    assert (config.embed_dim, config.text.layers, config.text.width) == (64, 2, 128)
    _, config = parse_model_config({"preset": "clip-tiny", "vision": {"kind": "vit", "image_size": 48,
                                                                      "patch_size": 8, "width": 64, "heads": 4}})
    assert config.vision.kind == "vit" and config.vision.patch_size == 8
    model = create_model("coca-tiny", embed_dim=64)
    assert isinstance(model, FAMILIES["coca"].model_cls) and model.cfg.embed_dim == 64


@pytest.mark.parametrize("config", CONFIGS, ids=lambda path: path.stem)
def test_family_builds_learns_saves_loads_and_runs_its_abilities(config, tmp_path):
    run = read_mapping(config)
    family, model_cfg = parse_model_config(run["model"])
    name = family.name
    recipe = recipe_of(family)
    image_cfg = from_dict(ImageConfig, run.get("image", {}))
    rng = random.Random(0)
    transform = ImageTransform(image_cfg, train=False)
    collate, items = DATA_KINDS[recipe.data]
    samples = items(rng, lambda: transform(_image(rng, 64)))
    texts = [s.get("caption") or s.get("sentence") or s.get("question") or s.get("instruction") or " ".join(s["queries"])
             for s in samples] + WORDS
    texts += [a for s in samples for a, _ in s.get("answers", [])]
    tokenizer = train_tokenizer(texts * 4, from_dict(TokenizerConfig, run.get("tokenizer", {})))
    qformer_tokenizer = train_tokenizer(texts * 4, QFORMER_TOKENIZER) if recipe.tokenizers else None
    batch = (collate(tokenizer, qformer_tokenizer) if qformer_tokenizer else collate(tokenizer))(samples)
    batch.pop("bad")

    torch.manual_seed(0)
    model = family.model_cls(model_cfg).train()
    assert all(isinstance(model, ability) for ability in family.abilities), "a declared ability is not implemented"
    objective_cfg = from_dict(recipe.objective_config_cls, run.get("objective", {}))
    recipe.objective_cls.prepare(model, objective_cfg)
    objective = recipe.objective_cls(model, objective_cfg)
    optimizer = make_optimizer(model, lr=2e-3, weight_decay=0.0, betas=(0.9, 0.98), eps=1e-6)

    def loss() -> torch.Tensor:
        torch.manual_seed(1)  # the same ITM negatives every time
        values = objective(dict(batch))
        return sum(v for k, v in values.items() if k.endswith("_loss"))

    first = loss()
    for _ in range(5):
        optimizer.zero_grad()
        loss().backward()
        optimizer.step()
    with torch.no_grad():
        assert loss() < first

    model.eval()
    tokenizers = {TEXT: tokenizer, **({INSTRUCTION: qformer_tokenizer} if qformer_tokenizer else {})}
    assets = Assets(tokenizers, {IMAGE: image_cfg})
    pretrained = Pretrained(family, model_cfg, model, assets, tmp_path)
    saved = save_checkpoint(tmp_path / "checkpoint", family=family, model_config=model_cfg, model=model,
                            assets=assets)
    loaded = load_checkpoint(saved)
    assert type(loaded.model) is type(model) and loaded.config == model_cfg

    images = [_image(rng, 64) for _ in range(3)]
    files = [str(tmp_path / f"{i}.png") for i in range(len(images))]
    for image, file in zip(images, files, strict=True):
        image.save(file)
    outputs = []
    for which in (pretrained, loaded):
        functions = predict_functions(which, device="cpu")
        results = {}
        for function in FUNCTIONS:
            if all(family.can(ability) for ability in FUNCTIONS[function].abilities):
                results[function] = FUNCTIONS[function].example(functions, images)
            else:
                assert getattr(functions, function) is None, function
        # Every task it can do answers its typed request with its typed response.
        for task in TASKS:
            if task.can(family) and task.respond is not None:
                request = task.example_request(files)
                task_functions = predict_functions(which, options=task.request_options(request), device="cpu")
                response = task.respond(task_functions, request)
                assert isinstance(response, task.response), task.name
                results[f"task {task.name}"] = dataclasses.asdict(response)
        outputs.append(results)
    assert outputs[0], f"{name} declares no ability a predictor uses"
    for key, value in outputs[0].items():
        if torch.is_tensor(value):
            torch.testing.assert_close(value, outputs[1][key], atol=0, rtol=0, msg=key)
        else:
            assert value == outputs[1][key], key
    declared = {a for a in ABILITIES if family.can(a)}
    used = {a for function in outputs[0] if function in FUNCTIONS for a in FUNCTIONS[function].abilities}
    assert declared == used, f"declared abilities no predict function serves: {declared - used}"


def test_the_reference_presets_are_what_the_converters_make_of_the_reference_configs():
    """clip-vit-b-32, clip-vit-l-14, siglip-vit-b-16, blip-base, owlvit-b-32 and owlv2-b-16 are the shapes of
    the Hugging Face configs the parity tests build; coca-vit-b-32 that of open_clip's coca_ViT-B-32.json."""
    transformers = pytest.importorskip("transformers")
    from vlp.convert.hf import config_from_hf
    from vlp.convert.hf_blip import configs_from_hf
    from vlp.convert.open_clip import coca_config_from_open_clip
    from vlp.models.blip import BlipConfig

    def preset(name):
        return parse_model_config({"preset": name})[1]

    large = transformers.CLIPConfig(
        text_config={"hidden_size": 768, "intermediate_size": 3072, "num_attention_heads": 12},
        vision_config={"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24,
                       "num_attention_heads": 16, "patch_size": 14},
        projection_dim=768,
    )  # fmt: skip
    assert config_from_hf(transformers.CLIPConfig().to_dict()) == preset("clip-vit-b-32")
    assert config_from_hf(large.to_dict()) == preset("clip-vit-l-14")
    assert config_from_hf(transformers.SiglipConfig().to_dict()) == preset("siglip-vit-b-16")
    blip = transformers.BlipConfig(
        text_config={"vocab_size": 30524, "num_attention_heads": 12, "bos_token_id": 30522, "sep_token_id": 102},
        vision_config={"image_size": 384, "layer_norm_eps": 1e-6},
    ).to_dict()
    vision, text = configs_from_hf(blip, enc_token_id=30523)
    assert BlipConfig(vision=vision, text=text, embed_dim=blip["image_text_hidden_size"]) == preset("blip-base")
    coca = {
        "embed_dim": 512, "custom_text": True,
        "vision_cfg": {"image_size": 224, "layers": 12, "width": 768, "patch_size": 32, "attentional_pool": True},
        "text_cfg": {"context_length": 76, "vocab_size": 49408, "width": 512, "heads": 8, "layers": 12,
                     "embed_cls": True},
        "multimodal_cfg": {"context_length": 76, "vocab_size": 49408, "width": 512, "heads": 8, "layers": 12},
    }  # fmt: skip
    assert coca_config_from_open_clip(coca) == preset("coca-vit-b-32")
    from vlp.convert.hf_owlvit import config_from_hf as owl_config_from_hf

    assert owl_config_from_hf(transformers.OwlViTConfig().to_dict()) == preset("owlvit-b-32")
    owlv2 = transformers.Owlv2Config(vision_config={"image_size": 960}).to_dict()
    assert owl_config_from_hf(owlv2) == preset("owlv2-b-16")


def test_a_checkpoint_written_before_the_text_towers_shared_their_key_names_still_loads(tmp_path, caplog):
    """BLIP checkpoints name the text positions `max_positions` in model.json before vlp 0.1's towers
    shared `context_length`: they load as they are, and the log says which key was renamed."""
    import json

    family, config = parse_model_config({"preset": "blip-tiny"})
    tokenizer = train_tokenizer(WORDS * 4, TokenizerConfig(kind="wordpiece", vocab_size=64, pad_token="[PAD]",
                                                           unk_token="[UNK]", bos_token="[CLS]", eos_token="[SEP]",
                                                           extra_tokens=("[ENC]", "[DEC]")))  # fmt: skip
    folder = save_checkpoint(tmp_path / "old", family=family, model_config=config, model=family.model_cls(config),
                             assets=Assets({TEXT: tokenizer}, {IMAGE: ImageConfig(size=48)}))
    arch = json.loads((folder / "model.json").read_text())
    arch["text"]["max_positions"] = arch["text"].pop("context_length")
    (folder / "model.json").write_text(json.dumps(arch))
    with caplog.at_level("WARNING"):
        assert load_checkpoint(folder).config == config
    assert "'model.text.max_positions' is now 'model.text.context_length'" in caplog.text
