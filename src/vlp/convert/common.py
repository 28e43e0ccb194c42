"""What the converters share: their error, Hugging Face config and weight reading, activation names,
tokenizer saving and image-processor reading. The key rules are `keymap`'s."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from vlp.assets.image import CLIP_MEAN, CLIP_STD, ImageConfig
from vlp.assets.tokenizer import Tokenizer
from vlp.checkpoint import CheckpointError
from vlp.convert.keymap import read_state_dict
from vlp.errors import ConversionError

log = logging.getLogger(__name__)

# Hugging Face `hidden_act` names <-> vlp's activations.
FROM_HF_ACTIVATION = {"quick_gelu": "quick_gelu", "gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh"}
TO_HF_ACTIVATION = {"quick_gelu": "quick_gelu", "gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh"}
HF_RESAMPLE = {2: "bilinear", 3: "bicubic"}  # PIL resampling filters in image processors


def activation_from_hf(name: str, where: str) -> str:
    if name not in FROM_HF_ACTIVATION:
        raise ConversionError(f"{where}.hidden_act '{name}' has no vlp equivalent ({', '.join(FROM_HF_ACTIVATION)})")
    return FROM_HF_ACTIVATION[name]


def is_hf_folder(path: Path) -> bool:
    return (path / "config.json").is_file()


def read_hf_config(folder: Path) -> dict[str, Any]:
    try:
        config = json.loads((folder / "config.json").read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{folder / 'config.json'} is not valid JSON: {err}") from err
    if not isinstance(config, dict):
        raise CheckpointError(f"{folder / 'config.json'} must hold a mapping")
    return config


def read_hf_weights(folder: Path) -> tuple[dict[str, torch.Tensor], Path]:
    """The folder's tensors, from one file or from the shards its index names; and the file to blame."""
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (folder / name).is_file():
            return read_state_dict(folder / name), folder / name
    for name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = folder / name
        if index.is_file():
            state: dict[str, torch.Tensor] = {}
            for shard in sorted(set(json.loads(index.read_text())["weight_map"].values())):
                state.update(read_state_dict(folder / shard))
            return state, index
    raise CheckpointError(f"{folder} holds config.json but no model.safetensors, pytorch_model.bin or shard index")


def save_hf_tokenizer(tokenizer: Tokenizer, out: Path) -> None:
    """tokenizer.json + a tokenizer_config.json that AutoTokenizer reads; vlp's cleaning mode is recorded
    for its own reload, since tokenizer.json cannot hold it."""
    tokenizer.backend.save(str(out / "tokenizer.json"))
    settings = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": tokenizer.context_length,
        "pad_token": tokenizer.backend.id_to_token(tokenizer.pad_id),
        "eos_token": tokenizer.backend.id_to_token(tokenizer.framing_ids()[1]),
        "vlp_text_clean": tokenizer.clean,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(settings, indent=1))


def blip_image_processor(image: ImageConfig) -> dict[str, Any]:
    """The preprocessor_config.json of BLIP's and BLIP-2's `BlipImageProcessor`: a square resize, no crop."""
    return {
        "image_processor_type": "BlipImageProcessor", "do_resize": True,
        "size": {"height": image.size, "width": image.size}, "resample": 2 if image.interpolation == "bilinear" else 3,
        "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": list(image.mean),
        "image_std": list(image.std), "do_convert_rgb": True,
    }  # fmt: skip


def _side(size: int | dict[str, int], default: int) -> int:
    if isinstance(size, dict):
        return int(size.get("height", size.get("shortest_edge", default)))
    return int(size)


def hf_image_processor_settings(folder: Path) -> tuple[dict[str, Any], Path]:
    """A Hugging Face folder's image-processor settings and the file they came from: preprocessor_config.json,
    or the `image_processor` of processor_config.json (where transformers 5.25 and later write them). A
    folder with neither loads with the model type's defaults, and says so."""
    for path, key in ((folder / "preprocessor_config.json", None), (folder / "processor_config.json", "image_processor")):
        if path.is_file():
            try:
                data = json.loads(path.read_bytes())
            except (json.JSONDecodeError, UnicodeDecodeError) as err:
                raise ConversionError(f"{path} is not valid JSON: {err}") from err
            settings = data.get(key) if key else data
            if isinstance(settings, dict):
                return settings, path
    log.warning("%s has no image processor settings (preprocessor_config.json, or image_processor in "
                "processor_config.json): preprocessing with the model type's defaults", folder)
    return {}, folder / "preprocessor_config.json"


def image_config_from_hf(
    folder: Path, image_size: int, *, crop: bool, mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD
) -> ImageConfig:
    """A Hugging Face image processor (`hf_image_processor_settings`) as vlp's preprocessing: `crop` (whether
    the processor center-crops by default), `mean` and `std` are the model type's defaults."""
    settings, path = hf_image_processor_settings(folder)
    resample = settings.get("resample", 3)
    if resample not in HF_RESAMPLE:
        raise ConversionError(f"{path}: resample {resample} is not bilinear (2) or bicubic (3)")
    crop = settings.get("do_center_crop", crop)
    size = _side(settings.get("crop_size" if crop else "size", image_size), image_size)
    resize = _side(settings.get("size", size), size)
    if crop and resize != size:
        raise ConversionError(
            f"{path}: resizing to {resize} before a {size} crop is not supported; vlp resizes to the crop size"
        )
    return ImageConfig(
        size=size,
        mean=tuple(settings.get("image_mean", mean)),
        std=tuple(settings.get("image_std", std)),
        interpolation=HF_RESAMPLE[resample],
        resize_mode="shortest" if crop else "squash",
    )
