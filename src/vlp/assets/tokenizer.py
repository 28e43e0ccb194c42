"""Tokenizers trained and run by the `tokenizers` library, at a fixed context length.

The whole tokenizer (vocabulary, normaliser, special-token template, padding and truncation to the
context length) is one `tokenizer.json`, saved inside every checkpoint.
"""

from __future__ import annotations

import html
import json
import re
import string
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

import torch
from tokenizers import Tokenizer as BackendTokenizer
from tokenizers import decoders, models, normalizers, pre_tokenizers, processors, trainers

from vlp.config import PositiveInt, Range
from vlp.errors import DataError

TOKENIZER_FILE = "tokenizer.json"
# Python-side text cleaning that a tokenizer.json cannot express (ftfy, HTML entities), kept beside it.
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"

# none: the backend's own normaliser only.
# whitespace: open_clip's Hugging Face tokenizers (ftfy, HTML unescaped twice, whitespace collapsed).
# lower: open_clip's CLIP tokenizer (the same, lowercased).
# canonicalize: open_clip / big_vision SigLIP (as lower, then "_" -> " " and ASCII punctuation removed).
# canonicalize_hf: transformers' SiglipTokenizer (lowercased, ASCII punctuation removed, whitespace collapsed).
TextClean = Literal["none", "whitespace", "lower", "canonicalize", "canonicalize_hf"]
_PUNCTUATION = str.maketrans("", "", string.punctuation)


def _fix_text(text: str) -> str:
    import ftfy  # imported here: only the CLIP and SigLIP cleanings need it

    return html.unescape(html.unescape(ftfy.fix_text(text))).strip()


def clean_text(text: str, mode: TextClean) -> str:
    if mode == "none":
        return text
    if mode == "whitespace":
        return " ".join(_fix_text(text).split())
    if mode == "lower":
        return " ".join(_fix_text(text).split()).lower()
    if mode == "canonicalize":
        text = _fix_text(text).replace("_", " ").translate(_PUNCTUATION).lower()
        return " ".join(text.split())
    if mode == "canonicalize_hf":
        return re.sub(r"\s+", " ", text.lower().translate(_PUNCTUATION)).strip()
    raise ValueError(f"unknown text cleaning '{mode}'; expected none, whitespace, lower, canonicalize or canonicalize_hf")


@dataclass
class TokenizerConfig:
    kind: Literal["bpe", "wordpiece"] = "bpe"
    vocab_size: PositiveInt = 4096
    context_length: Annotated[int, Range(min=2)] = 32  # room for the start and end tokens
    lowercase: bool = True
    bos_token: str | None = "<start_of_text>"
    eos_token: str = "<end_of_text>"
    # SigLIP pads with its end-of-text token ("sticky" EOS) so the last position is always EOS.
    pad_token: str = "<pad>"
    unk_token: str = "<unk>"
    # More special tokens the model writes itself, e.g. BLIP's [ENC] and [DEC]; ids follow the others.
    extra_tokens: tuple[str, ...] = ()
    path: str | None = None  # a tokenizer.json, a folder holding one, or a run or checkpoint folder; None = train one
    clean: TextClean = "none"


class Tokenizer:
    """Text -> (ids [B, L], mask [B, L]) at a fixed length L, with special tokens added."""

    def __init__(self, backend: BackendTokenizer, clean: TextClean = "none"):
        if backend.padding is None or backend.padding.get("length") is None:
            raise ValueError("tokenizer.json has no fixed padding length; vlp tokenizers pad to a context length")
        clean_text("", clean)  # rejects an unknown mode now rather than at the first call
        self.backend = backend
        self.clean = clean
        self.context_length: int = backend.padding["length"]
        self.pad_id: int = backend.padding["pad_id"]
        self._left: Tokenizer | None = None

    @classmethod
    def from_file(cls, path: str | Path) -> Tokenizer:
        path = Path(path)
        if path.is_dir():
            path = path / TOKENIZER_FILE
        if not path.is_file():
            raise FileNotFoundError(f"no tokenizer found at {path}")
        settings = path.with_name(TOKENIZER_CONFIG_FILE)
        try:
            clean = json.loads(settings.read_text()).get("clean", "none") if settings.is_file() else "none"
            backend = BackendTokenizer.from_file(str(path))
        except Exception as err:  # the tokenizers library raises a bare Exception for a broken file
            raise DataError(f"{path} is not a readable tokenizer: {err}") from err
        return cls(backend, clean)

    def save(self, folder: str | Path) -> Path:
        path = Path(folder) / TOKENIZER_FILE
        self.backend.save(str(path))
        path.with_name(TOKENIZER_CONFIG_FILE).write_text(json.dumps({"clean": self.clean}, indent=1))
        return path

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size()

    def token_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def framing_ids(self) -> tuple[int, int]:
        """The ids every text starts and ends with, whatever the tokens are called: the first and last real
        tokens of an empty text (both the end token when the template has no start token)."""
        ids, mask = self("")
        return int(ids[0, 0]), int(ids[0, int(mask[0].sum()) - 1])

    def __call__(self, texts: str | list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(texts, str):
            texts = [texts]
        encodings = self.backend.encode_batch([clean_text(t, self.clean) for t in texts])
        ids = torch.tensor([e.ids for e in encodings], dtype=torch.long)
        mask = torch.tensor([e.attention_mask for e in encodings], dtype=torch.long)
        return ids, mask

    def truncating_left(self) -> Tokenizer:
        """The same tokenizer cutting long texts at their start (InstructBLIP's instructions: the question
        comes last), the start and end tokens kept."""
        if self._left is None:
            backend = BackendTokenizer.from_str(self.backend.to_str())
            backend.enable_truncation(max_length=self.context_length, direction="left")
            self._left = Tokenizer(backend, self.clean)
            self._left._left = self._left
        return self._left

    def with_context_length(self, context_length: int) -> Tokenizer:
        """The same tokenizer padding and truncating to another length (a detector's 16-token queries read by
        its CLIP's tokenizer); the end token survives truncation."""
        if context_length == self.context_length:
            return self
        backend = BackendTokenizer.from_str(self.backend.to_str())
        backend.enable_truncation(max_length=context_length)
        backend.enable_padding(length=context_length, pad_id=self.pad_id, pad_token=backend.padding["pad_token"])
        return Tokenizer(backend, self.clean)

    def decode(self, ids: list[int]) -> str:
        ids = list(ids)
        while ids and ids[-1] == self.pad_id:  # the pad token may be an ordinary one (open_clip pads with "!")
            ids.pop()
        return self.backend.decode(ids, skip_special_tokens=True).strip()


def _special_tokens(cfg: TokenizerConfig) -> list[str]:
    tokens = [cfg.pad_token, cfg.unk_token, cfg.bos_token, cfg.eos_token, *cfg.extra_tokens]
    return list(dict.fromkeys(t for t in tokens if t))  # de-duplicated, order kept


def train_tokenizer(texts: Iterable[str], cfg: TokenizerConfig) -> Tokenizer:
    """Train a byte-level BPE or a WordPiece tokenizer on `texts` and fix it to the context length."""
    cleaned = (clean_text(t, cfg.clean) for t in texts)
    if cfg.kind != "bpe":
        return configure_tokenizer(_train_wordpiece(list(cleaned), cfg), cfg)
    norm = [normalizers.NFC()] + ([normalizers.Lowercase()] if cfg.lowercase else [])
    backend = BackendTokenizer(models.BPE())
    backend.normalizer = normalizers.Sequence(norm)
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=cfg.vocab_size,
        special_tokens=_special_tokens(cfg),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(cleaned, trainer=trainer)
    return configure_tokenizer(backend, cfg)


def _wordpiece_backend(vocab: dict[str, int] | None, cfg: TokenizerConfig) -> BackendTokenizer:
    backend = BackendTokenizer(models.WordPiece(vocab, unk_token=cfg.unk_token))
    backend.normalizer = normalizers.BertNormalizer(lowercase=cfg.lowercase)
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    backend.decoder = decoders.WordPiece()
    return backend


def _train_wordpiece(texts: list[str], cfg: TokenizerConfig) -> BackendTokenizer:
    """WordPiece training that gives the same vocabulary in every process.

    The trainer numbers the "##c" piece of each character met inside a word in hash-map order, which
    changes between processes, and breaks ties between equally frequent merges by those numbers
    (tokenizers #1794): the vocabulary, and so a whole training run, was not reproducible. Here those
    pieces are handed to the trainer first, in sorted order, then kept as ordinary vocabulary entries.
    """
    backend = _wordpiece_backend(None, cfg)
    inside_word: set[str] = set()
    for start in range(0, len(texts), 4096):  # pre-tokenized in chunks: one call per text would be slow
        chunk = backend.normalizer.normalize_str("\n".join(texts[start : start + 4096]))
        for word, _ in backend.pre_tokenizer.pre_tokenize_str(chunk):
            inside_word.update(word[1:])
    specials = _special_tokens(cfg)
    pieces = [f"##{c}" for c in sorted(inside_word)]
    # Every ASCII letter, digit and punctuation mark is a token, as in BERT's vocabulary, so a
    # fine-tuning task whose texts hold characters the pre-training captions lacked (VQA's "2")
    # does not see them as [UNK].
    alphabet = string.ascii_lowercase + string.digits + string.punctuation
    trainer = trainers.WordPieceTrainer(
        vocab_size=cfg.vocab_size,
        special_tokens=specials + pieces,
        show_progress=False,
        initial_alphabet=list(alphabet if cfg.lowercase else alphabet + string.ascii_uppercase),
    )
    backend.train_from_iterator(texts, trainer=trainer)
    # Rebuilt from the vocabulary alone: the trainer also registered the pieces as special tokens, which
    # would split them out of raw text and drop them from decoded captions.
    trained = _wordpiece_backend(backend.get_vocab(with_added_tokens=False), cfg)
    trained.add_special_tokens(specials)
    return trained


def configure_tokenizer(backend: BackendTokenizer, cfg: TokenizerConfig) -> Tokenizer:
    """Add the special-token template and fixed-length padding and truncation to a trained backend."""
    for token in _special_tokens(cfg):
        if backend.token_to_id(token) is None:
            raise ValueError(f"special token '{token}' is not in the vocabulary")
    eos = (cfg.eos_token, backend.token_to_id(cfg.eos_token))
    if cfg.bos_token:
        bos = (cfg.bos_token, backend.token_to_id(cfg.bos_token))
        template = processors.TemplateProcessing(
            single=f"{bos[0]} $A {eos[0]}", pair=f"{bos[0]} $A {eos[0]} $B {eos[0]}", special_tokens=[bos, eos]
        )
    else:
        template = processors.TemplateProcessing(
            single=f"$A {eos[0]}", pair=f"$A {eos[0]} $B {eos[0]}", special_tokens=[eos]
        )
    backend.post_processor = template
    return fix_length(backend, cfg.context_length, cfg.pad_token, cfg.clean)


def fix_length(backend: BackendTokenizer, context_length: int, pad_token: str, clean: TextClean) -> Tokenizer:
    """Pad and truncate every text to `context_length`."""
    pad_id = backend.token_to_id(pad_token)
    if pad_id is None:
        raise ValueError(f"pad token '{pad_token}' is not in the vocabulary")
    # Truncation leaves room for the template's special tokens, so the end-of-text token survives.
    backend.enable_truncation(max_length=context_length)
    backend.enable_padding(length=context_length, pad_id=pad_id, pad_token=pad_token)
    return Tokenizer(backend, clean)


def tokenize_trimmed(tokenizer: Tokenizer, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokenised texts cut to the batch's longest (the tokenizer pads to its full context length)."""
    ids, mask = tokenizer(texts)
    length = int(mask.sum(dim=1).max())
    return ids[:, :length], mask[:, :length]
