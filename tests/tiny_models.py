"""Random-weight models of every shipped run config (configs/*.yaml, each a tiny preset), with tokenizers
trained on a few words: what the service and sweep tests run."""

from pathlib import Path

import torch

from vlp.assets import IMAGE, INSTRUCTION, TEXT, Assets
from vlp.assets.image import ImageConfig
from vlp.assets.tokenizer import TokenizerConfig, train_tokenizer
from vlp.checkpoint import Pretrained
from vlp.config import from_dict, read_mapping
from vlp.objectives.recipes import recipe_of
from vlp.registry import parse_model_config

CONFIGS = sorted((Path(__file__).parent.parent / "configs").glob("*.yaml"))
WORDS = ["red", "blue", "green", "circle", "square", "triangle", "small", "large", "two", "one", "yes", "no",
         "what", "color", "is", "the", "shape", "a", "of", "how", "many", "?"]
# The Q-Former's own tokenizer, for families that read instructions there (the tiny presets' special ids).
QFORMER_TOKENIZER = TokenizerConfig(kind="wordpiece", vocab_size=256, context_length=32, pad_token="[PAD]",
                                    unk_token="[UNK]", bos_token="[CLS]", eos_token="[SEP]", extra_tokens=("[DEC]",))


def random_pretrained(config: Path, folder: Path, seed: int = 0) -> Pretrained:
    """The model of a run config with random weights (seeded), in eval mode."""
    run = read_mapping(config)
    family, model_cfg = parse_model_config(run["model"])
    texts = [" ".join(WORDS[i:] + WORDS[:i]) for i in range(len(WORDS))] * 4
    tokenizers = {TEXT: train_tokenizer(texts, from_dict(TokenizerConfig, run.get("tokenizer", {})))}
    if recipe_of(family).tokenizers:
        tokenizers[INSTRUCTION] = train_tokenizer(texts, QFORMER_TOKENIZER)
    torch.manual_seed(seed)
    model = family.model_cls(model_cfg).eval()
    return Pretrained(family, model_cfg, model, Assets(tokenizers, {IMAGE: from_dict(ImageConfig, run.get("image", {}))}),
                      folder)
