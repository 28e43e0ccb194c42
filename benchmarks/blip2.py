"""BLIP-2, measured side by side in one run.

- Caption generation: vlp's BLIP-2 against transformers' `Blip2ForConditionalGeneration` holding the same
  random weights (vlp loads the HF folder), BLIP-2's vision and Q-Former shapes (EVA ViT-g/14 1408 x 39,
  32 queries x 768) with a SmolLM2-135M-shaped Llama as the language model, greedy and beam 3, bf16 and
  fp32. The greedy tokens are checked equal. Measured end to end (pixels -> tokens) and, separately, the
  decoding after the soft prompt, where the two differ most.
- Stage-1 training steps: the frozen tower computed in bf16 under no_grad (vlp's default), in fp32, and the
  same tower trained end to end (what BLIP-2 avoids), through vlp's trainer step.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import transformers
from common import interleaved_times, shapes_pairs

import vlp
from vlp.distributed import ParallelModel
from vlp.generation import GenerationConfig, generate
from vlp.models.blip2 import Blip2Qformer, Blip2QformerConfig
from vlp.objectives.blip2 import Blip2QformerObjective, Blip2QformerObjectiveConfig
from vlp.towers import VisionConfig
from vlp.towers.frozen_image import FrozenImageConfig
from vlp.towers.qformer import QFormerConfig
from vlp.train.optim import make_optimizer
from vlp.train.step import TrainStep

VIT_G = {"hidden_size": 1408, "intermediate_size": 6144, "num_hidden_layers": 39, "num_attention_heads": 16,
         "image_size": 224, "patch_size": 14, "layer_norm_eps": 1e-6}  # fmt: skip
QFORMER = {"vocab_size": 30523, "hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
           "intermediate_size": 3072, "cross_attention_frequency": 2, "encoder_hidden_size": 1408}  # fmt: skip
# SmolLM2-135M's shape (vocabulary cut to 32k + the image placeholder, to keep the folder small).
SMOLLM2 = {"model_type": "llama", "vocab_size": 32001, "hidden_size": 576, "intermediate_size": 1536,
           "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3,
           "max_position_embeddings": 2048, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2,
           "tie_word_embeddings": True, "rope_theta": 100000.0}  # fmt: skip
IMAGE_TOKEN = 32000


def _reference(folder: Path) -> tuple[Any, Any]:
    torch.manual_seed(0)
    config = transformers.Blip2Config(vision_config=VIT_G, qformer_config=QFORMER, text_config=SMOLLM2,
                                      num_query_tokens=32, image_token_index=IMAGE_TOKEN)
    reference = transformers.Blip2ForConditionalGeneration(config).eval()
    with torch.no_grad():
        reference.query_tokens.normal_(0.0, 0.5)
    reference.save_pretrained(folder)
    from tokenizers import Tokenizer, models, pre_tokenizers

    backend = Tokenizer(models.WordLevel({f"t{i}": i for i in range(32000)}, unk_token="t0"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text('{"bos_token": "t1", "eos_token": "t2", "pad_token": "t2"}')
    return reference, vlp.load(folder)


def generation_speed(folder: Path, images: torch.Tensor, *, new_tokens: int, steps: int, warmup: int) -> dict[str, Any]:
    reference, pretrained = _reference(folder)
    models = {"fp32": pretrained.model.eval()}
    # vlp's bf16 path as its BLIP-2 configs set it (frozen tower and LM stored in bf16, the rest under a bf16
    # autocast), against transformers loaded with torch_dtype=bfloat16.
    bf16 = vlp.load(folder)
    bf16.model.image_encoder.visual.to(torch.bfloat16)
    bf16.model.image_encoder.tower_dtype = torch.bfloat16
    bf16.model.language_model.to(torch.bfloat16)
    models["bf16"] = bf16.model.eval()
    batch = len(images)
    start = torch.full((batch, 1), 1)
    placeholders = torch.full((batch, 32), IMAGE_TOKEN)
    outputs: dict[str, Any] = {}
    runners = {}
    for precision in ("fp32", "bf16"):
        autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")
        hf = reference if precision == "fp32" else transformers.Blip2ForConditionalGeneration.from_pretrained(
            folder, torch_dtype=torch.bfloat16).eval()
        for method in ("greedy", "beam"):
            beams = 1 if method == "greedy" else 3
            # End-of-text is held off until the budget: every contender generates all the tokens.
            cfg = GenerationConfig(method=method, max_new_tokens=new_tokens, min_new_tokens=new_tokens, num_beams=3)

            def vlp_run(step: int, cfg=cfg, autocast=autocast, model=models[precision],
                        key=f"vlp {method} {precision}") -> None:
                with torch.inference_mode(), autocast:
                    prompt = model.encode_image_tokens(images)[1]
                    outputs[key] = generate(model.caption_decoder(prompt), start[:, :0], cfg)

            def hf_run(step: int, hf=hf, beams=beams, key=f"transformers {method} {precision}") -> None:
                with torch.inference_mode():
                    pixels = images.to(hf.dtype)
                    outputs[key] = hf.generate(pixel_values=pixels, input_ids=torch.cat([placeholders, start], 1),
                                               max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                                               num_beams=beams)

            runners[f"vlp {method} {precision}"] = vlp_run
            runners[f"transformers {method} {precision}"] = hf_run
    seconds = interleaved_times(runners, steps=steps, warmup=warmup)
    tokens_per_s = {name: batch * new_tokens / value for name, value in seconds.items()}
    ratios = {k.removeprefix("vlp "): tokens_per_s[k] / tokens_per_s[k.replace("vlp", "transformers")]
              for k in tokens_per_s if k.startswith("vlp")}
    theirs = [row[33:] for row in outputs["transformers greedy fp32"].tolist()]
    return {
        "model": "BLIP-2 ViT-g/14 (39 blocks) + Q-Former 32 x 768 + a SmolLM2-135M-shaped Llama, random weights",
        "images": batch,
        "new_tokens": new_tokens,
        "tokens_per_s": tokens_per_s,
        "vlp_over_transformers": ratios,
        "greedy_tokens_equal_fp32": outputs["vlp greedy fp32"] == theirs,
    }


def _stage1(precision: str, frozen: bool) -> Blip2Qformer:
    vision = VisionConfig(image_size=64, patch_size=8, width=256, layers=6, heads=4, ln_pre=False, ln_post=False,
                          patch_bias=True)
    qformer = QFormerConfig(vocab_size=49408, context_length=77, width=256, layers=4, heads=4, num_queries=16,
                            pad_token_id=0, cls_token_id=49406, eos_token_id=49407, dec_token_id=49405)
    model = Blip2Qformer(Blip2QformerConfig(image=FrozenImageConfig(vision=vision, vision_feature_layer=-2,
                                                                    vision_precision=precision),
                                            qformer=qformer, embed_dim=128))
    if not frozen:  # the tower trained with everything else, as an end-to-end model would
        model.image_encoder.visual.float().requires_grad_(True)
        model.image_encoder.tower_tokens = lambda images: model.image_encoder.visual.forward_features(images)
    return model


def stage1_steps(data: Path, *, batch: int, steps: int, warmup: int) -> dict[str, Any]:
    import open_clip

    images, captions = shapes_pairs(data / "shapes64", batch, 64)
    texts = open_clip.tokenize(captions)
    step_batch = {"image": images, "text": texts, "text_mask": (texts != 0).long(), "size": batch}
    contenders = {"frozen tower bf16 (no_grad)": _stage1("bf16", True), "frozen tower fp32 (no_grad)":
                  _stage1("fp32", True), "tower trained (end to end)": _stage1("fp32", False)}  # fmt: skip
    runners, trained = {}, {}
    for name, model in contenders.items():
        trained[name] = sum(p.numel() for p in model.parameters() if p.requires_grad)
        parallel = ParallelModel(model.train(), "ddp", torch.device("cpu"))
        optimizer = make_optimizer(model, lr=1e-4, weight_decay=0.05, betas=(0.9, 0.98), eps=1e-6)
        objective = Blip2QformerObjective(model, Blip2QformerObjectiveConfig())
        train_step = TrainStep(parallel, objective, optimizer, precision="bf16")
        runners[name] = lambda step, train_step=train_step: train_step(step_batch)
    seconds = interleaved_times(runners, steps=steps, warmup=warmup)
    pairs = {name: batch / value for name, value in seconds.items()}
    return {"batch_size": batch, "trained_parameters": trained, "pairs_per_s": pairs,
            "speedup_over_end_to_end": {n: v / pairs["tower trained (end to end)"] for n, v in pairs.items()}}


def measure(data: Path, quick: bool) -> dict[str, Any]:
    images, _ = shapes_pairs(data / "shapes224", 2 if quick else 4, 224)
    return {
        "generation": generation_speed(data / "blip2-vitg", images, new_tokens=4 if quick else 20,
                                       steps=1 if quick else 3, warmup=1),
        "stage1_train_step": stage1_steps(data, batch=8 if quick else 32, steps=2 if quick else 10,
                                          warmup=1 if quick else 2),
    }
