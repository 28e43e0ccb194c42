"""BLIP captioning, vlp against transformers' `BlipForConditionalGeneration`, measured side by side in one run.

Both hold the same random BLIP-base weights (ViT-B/16 at 384 px, a 12-layer BERT-base decoder, vocabulary
30,524; vlp loads the Hugging Face folder), caption the same shapes-world pixels, end-of-text held off so
that every contender writes the whole budget; greedy and beam search (3 beams), pixels to tokens. Each
precision is compared at equal precision: fp32 against fp32, vlp's bf16 autocast (what `--precision bf16`
runs) against transformers under the same autocast and against transformers loaded in bf16. The greedy
tokens are checked equal in fp32 and under autocast. The vision pass is timed apart as well: at these
shapes it is most of a caption's cost and the same arithmetic in both, which bounds the fp32 ratio.

    .venv-interop/bin/python benchmarks/bench.py --sections blip --out benchmarks/results-blip-captioning.json
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import transformers
from common import interleaved_times, shapes_pairs

import vlp
from vlp.generation import GenerationConfig, generate

TEXT = {"vocab_size": 30524, "hidden_size": 768, "encoder_hidden_size": 768, "intermediate_size": 3072,
        "num_hidden_layers": 12, "num_attention_heads": 12, "max_position_embeddings": 512, "bos_token_id": 30522,
        "sep_token_id": 102, "pad_token_id": 0, "eos_token_id": 2}  # fmt: skip
VISION = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
          "image_size": 384, "patch_size": 16, "layer_norm_eps": 1e-6}  # fmt: skip
DEC, SEP = 30522, 102


def _reference(folder: Path) -> Any:
    """The random-weight reference, saved with a BERT-layout vocabulary (bert-base-uncased's special ids,
    BLIP's [DEC] and [ENC] after them) so that vlp loads the folder as it would a hub download."""
    torch.manual_seed(0)
    model = transformers.BlipForConditionalGeneration(
        transformers.BlipConfig(text_config=TEXT, vision_config=VISION)
    ).eval()
    with torch.no_grad():
        model.text_decoder.cls.predictions.bias[[SEP, TEXT["eos_token_id"]]] = -100.0
        # Released BLIP checkpoints hold the word embeddings as the LM head's weight too (BERT ties them);
        # transformers 5 ties them on load, 4.x reads the stored copy: make the two readings agree.
        embeddings = model.text_decoder.bert.embeddings.word_embeddings.weight
        model.text_decoder.cls.predictions.decoder.weight.copy_(embeddings)
    model.save_pretrained(folder)
    words = [f"w{i}" for i in range(30522 - 104)]
    vocab = ["[PAD]"] + [f"[unused{i}]" for i in range(99)] + ["[UNK]", "[CLS]", "[SEP]", "[MASK]"] + words
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tokenizer = transformers.BertTokenizer(folder / "vocab.txt", bos_token="[DEC]", additional_special_tokens=["[ENC]"])
    tokenizer.save_pretrained(folder)
    return model


def generation_speed(folder: Path, images: torch.Tensor, *, new_tokens: int, steps: int, warmup: int) -> dict[str, Any]:
    reference = _reference(folder)
    model = vlp.load(folder).model.eval()
    hf_bf16 = transformers.BlipForConditionalGeneration.from_pretrained(folder, torch_dtype=torch.bfloat16).eval()
    batch = len(images)
    start = torch.tensor([[DEC, SEP]] * batch)  # transformers drops the trailing [SEP] its processor adds
    outputs: dict[str, Any] = {}
    runners = {}
    for method in ("greedy", "beam"):
        beams = 1 if method == "greedy" else 3
        cfg = GenerationConfig(method=method, max_new_tokens=new_tokens, min_new_tokens=new_tokens, num_beams=3)
        for precision in ("fp32", "bf16"):
            autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")

            # As vlp's CaptionPredictor runs it: no_grad (not inference_mode), the batch under the autocast.
            def vlp_run(step: int, cfg=cfg, autocast=autocast, key=f"vlp {method} {precision}") -> None:
                with torch.no_grad(), autocast:
                    tokens = model.encode_image_tokens(images)[1]
                    outputs[key] = generate(model.caption_decoder(tokens), start[:, :0], cfg)

            def hf_run(step: int, hf=reference, autocast=autocast, beams=beams,
                       key=f"transformers {method} {precision}") -> None:
                with autocast:
                    outputs[key] = hf.generate(pixel_values=images.to(hf.dtype), input_ids=start,
                                               max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                               do_sample=False, num_beams=beams)

            runners[f"vlp {method} {precision}"] = vlp_run
            runners[f"transformers {method} {precision}"] = hf_run
        runners[f"transformers {method} bf16 weights"] = lambda step, m=method: hf_run(
            step, hf=hf_bf16, autocast=torch.autocast("cpu", enabled=False), beams=1 if m == "greedy" else 3,
            key=f"transformers {m} bf16 weights")
    for precision in ("fp32", "bf16"):
        autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")

        def vlp_vision(step: int, autocast=autocast) -> None:
            with torch.no_grad(), autocast:
                model.encode_image_tokens(images)

        def hf_vision(step: int, autocast=autocast) -> None:
            with torch.no_grad(), autocast:
                reference.vision_model(pixel_values=images)

        runners[f"vlp vision {precision}"], runners[f"transformers vision {precision}"] = vlp_vision, hf_vision
    seconds = interleaved_times(runners, steps=steps, warmup=warmup)
    captions = {k: v for k, v in seconds.items() if "vision" not in k}
    tokens_per_s = {name: batch * new_tokens / value for name, value in captions.items()}
    ratios = {}
    for method in ("greedy", "beam"):
        for theirs in ("fp32", "bf16", "bf16 weights"):
            ours = "fp32" if theirs == "fp32" else "bf16"
            ratios[f"{method} {ours} / {theirs}"] = (
                tokens_per_s[f"vlp {method} {ours}"] / tokens_per_s[f"transformers {method} {theirs}"]
            )

    def theirs(key: str) -> list[list[int]]:
        return [row[1:] for row in outputs[key].tolist()]  # after [DEC]

    return {
        "model": "BLIP-base captioning (ViT-B/16 384 px, BERT-base decoder), random weights, end-of-text held off",
        "images": batch,
        "new_tokens": new_tokens,
        "tokens_per_s": tokens_per_s,
        "vlp_over_transformers": ratios,
        "vision_pass_s": {k: v for k, v in seconds.items() if "vision" in k},
        "greedy_tokens_equal": {
            p: outputs[f"vlp greedy {p}"] == theirs(f"transformers greedy {p}") for p in ("fp32", "bf16")
        },
    }


def measure(data: Path, quick: bool) -> dict[str, Any]:
    images, _ = shapes_pairs(data / "shapes384", 4, 384)
    return generation_speed(
        data / "blip-base", images[:2] if quick else images, new_tokens=4 if quick else 20,
        steps=1 if quick else 3, warmup=1,
    )
