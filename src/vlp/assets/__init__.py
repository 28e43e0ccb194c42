"""What a model is read and written with, kept beside its weights: named tokenizers and image processors.

Every model that reads text has the tokenizer `text`; a model whose image side reads text in a vocabulary
of its own (an instruction-aware image encoder) adds `instruction`. Every model that reads images has the
image processor `image`. A checkpoint folder keeps them as

    tokenizers/<name>/tokenizer.json (+ tokenizer_config.json)
    image_processors/<name>/preprocess.json
    prompts.json              the prompt templates its text queries were trained with (a detector's), if any

Checkpoints written before assets had names keep `tokenizer.json` and `preprocess.json` at the top of the
folder (the `text` tokenizer and the `image` processor) and an instruction tokenizer in its own folder;
they load as they are.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from vlp.assets.image import ImageConfig
from vlp.assets.tokenizer import TOKENIZER_CONFIG_FILE, TOKENIZER_FILE, Tokenizer
from vlp.config import from_dict, to_dict
from vlp.errors import CheckpointError, ConfigError

TEXT = "text"
INSTRUCTION = "instruction"
IMAGE = "image"

TOKENIZERS_DIR = "tokenizers"
IMAGE_PROCESSORS_DIR = "image_processors"
PREPROCESS_FILE = "preprocess.json"
PROMPTS_FILE = "prompts.json"
# The files of the layout before named assets: name -> where that asset was kept.
UNNAMED_TOKENIZER_FOLDERS = {INSTRUCTION: "qformer_tokenizer"}
ASSET_FILES = (TOKENIZERS_DIR, IMAGE_PROCESSORS_DIR, TOKENIZER_FILE, TOKENIZER_CONFIG_FILE, PREPROCESS_FILE, PROMPTS_FILE,
               *UNNAMED_TOKENIZER_FOLDERS.values())


@dataclass
class Assets:
    """A model's tokenizers and image processors (`ImageConfig`), by name, and the prompt templates (each
    with `{}`) its text queries were trained with."""

    tokenizers: dict[str, Tokenizer] = field(default_factory=dict)
    image_processors: dict[str, ImageConfig] = field(default_factory=dict)
    prompts: list[str] = field(default_factory=list)

    def tokenizer(self, name: str = TEXT, *, where: str | Path = "the checkpoint") -> Tokenizer:
        """The tokenizer `name`; an error naming what is missing where when there is none."""
        if name not in self.tokenizers:
            have = ", ".join(self.tokenizers) or "none"
            raise CheckpointError(f"{where} has no '{name}' tokenizer (its tokenizers: {have}); the model needs it")
        return self.tokenizers[name]

    def image_config(self, name: str = IMAGE, *, where: str | Path = "the checkpoint") -> ImageConfig:
        if name not in self.image_processors:
            raise CheckpointError(f"{where} has no '{name}' image processor; the model needs it")
        return self.image_processors[name]

    def save(self, folder: str | Path) -> None:
        """Write every asset under `folder` (which exists) in the named layout."""
        folder = Path(folder)
        for name, tokenizer in self.tokenizers.items():
            (folder / TOKENIZERS_DIR / name).mkdir(parents=True)
            tokenizer.save(folder / TOKENIZERS_DIR / name)
        for name, config in self.image_processors.items():
            (folder / IMAGE_PROCESSORS_DIR / name).mkdir(parents=True)
            (folder / IMAGE_PROCESSORS_DIR / name / PREPROCESS_FILE).write_text(json.dumps(to_dict(config), indent=1))
        if self.prompts:
            (folder / PROMPTS_FILE).write_text(json.dumps(self.prompts, indent=1))

    @classmethod
    def load(cls, folder: str | Path) -> Assets:
        """The assets of a checkpoint folder, in either layout."""
        folder = Path(folder)
        assets = cls()
        if (folder / TOKENIZERS_DIR).is_dir():
            for path in sorted(p for p in (folder / TOKENIZERS_DIR).iterdir() if p.is_dir()):
                assets.tokenizers[path.name] = Tokenizer.from_file(path)
        else:
            if (folder / TOKENIZER_FILE).is_file():
                assets.tokenizers[TEXT] = Tokenizer.from_file(folder)
            for name, old in UNNAMED_TOKENIZER_FOLDERS.items():
                if (folder / old).is_dir():
                    assets.tokenizers[name] = Tokenizer.from_file(folder / old)
        processors = {path.parent.name: path for path in sorted(folder.glob(f"{IMAGE_PROCESSORS_DIR}/*/{PREPROCESS_FILE}"))}
        if not processors and (folder / PREPROCESS_FILE).is_file():
            processors[IMAGE] = folder / PREPROCESS_FILE
        for name, path in processors.items():
            try:
                data = json.loads(path.read_text())
                assets.image_processors[name] = from_dict(ImageConfig, data, prefix="preprocess")
            except (json.JSONDecodeError, UnicodeDecodeError) as err:
                raise CheckpointError(f"{path} is not valid JSON: {err}") from err
            except ConfigError as err:
                raise CheckpointError(f"{path}: {err}") from err
        if (folder / PROMPTS_FILE).is_file():
            assets.prompts = _prompts(folder / PROMPTS_FILE)
        return assets


def _prompts(path: Path) -> list[str]:
    try:
        prompts = json.loads(path.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path} is not valid JSON: {err}") from err
    if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) and "{}" in p for p in prompts):
        raise CheckpointError(f"{path}: expected a list of prompt templates, each with {{}}")
    return prompts


def read_tokenizer(path: str | Path, name: str = TEXT) -> Tokenizer:
    """A tokenizer file, a folder holding one, or the tokenizer `name` of a run or checkpoint folder."""
    path = Path(path)
    if path.is_dir() and not (path / TOKENIZER_FILE).is_file() and (path / TOKENIZERS_DIR / name).is_dir():
        path = path / TOKENIZERS_DIR / name
    return Tokenizer.from_file(path)
