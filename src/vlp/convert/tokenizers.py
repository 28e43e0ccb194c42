"""Tokenizers of pretrained checkpoints, rebuilt as `tokenizers` pipelines that give the reference ids.

- CLIP's byte-level BPE with its `</w>` end-of-word suffix, from `vocab.json` + `merges.txt` or from
  open_clip's `bpe_simple_vocab_16e6.txt.gz`;
- SentencePiece unigram models (`spiece.model`, SigLIP) read from the model's protobuf;
- WordPiece from a BERT `vocab.txt`;
- or a `tokenizer.json` a folder already holds.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
from pathlib import Path
from typing import Any

from tokenizers import Regex, decoders, models, normalizers, pre_tokenizers, processors
from tokenizers import Tokenizer as BackendTokenizer

from vlp.assets.tokenizer import TextClean, Tokenizer, fix_length
from vlp.errors import CheckpointError

# Words, single digits, runs of other symbols and English contractions: CLIP's pre-tokenisation.
CLIP_SPLIT = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
OPEN_CLIP_VOCAB = "bpe_simple_vocab_16e6.txt.gz"


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from bytes to printable characters, in the order CLIP's vocabulary lists them."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = list(printable)
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars)))


def clip_bpe(
    vocab: dict[str, int],
    merges: list[tuple[str, str]],
    *,
    bos_token: str,
    eos_token: str,
    pad_token: str,
    context_length: int,
    clean: TextClean,
) -> Tokenizer:
    backend = BackendTokenizer(
        models.BPE(
            vocab=vocab,
            merges=merges,
            continuing_subword_prefix="",
            end_of_word_suffix="</w>",
            fuse_unk=False,
            unk_token=eos_token,
        )
    )
    backend.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
    )
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(CLIP_SPLIT), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    # "</w>" ends a word: make it a byte-level space, then map the byte-level characters back to bytes.
    backend.decoder = decoders.Sequence([decoders.Replace("</w>", "Ġ"), decoders.ByteLevel()])
    backend.add_special_tokens(list(dict.fromkeys([bos_token, eos_token])))
    backend.post_processor = processors.TemplateProcessing(
        single=f"{bos_token} $A {eos_token}",
        pair=f"{bos_token} $A {eos_token} $B {eos_token}",
        special_tokens=[(t, vocab[t]) for t in dict.fromkeys([bos_token, eos_token])],
    )
    return fix_length(backend, context_length, pad_token, clean)


def open_clip_bpe(path: str | Path, context_length: int = 77) -> Tokenizer:
    """open_clip's CLIP tokenizer from its `bpe_simple_vocab_16e6.txt.gz`: 49,408 ids, padded with 0."""
    with gzip.open(path, "rt", encoding="utf-8") as file:
        lines = file.read().split("\n")
    merges = [tuple(line.split()) for line in lines[1 : 49152 - 256 - 2 + 1]]
    byte_chars = list(bytes_to_unicode().values())
    tokens = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(m) for m in merges]
    tokens += ["<start_of_text>", "<end_of_text>"]
    vocab = {token: i for i, token in enumerate(tokens)}
    return clip_bpe(
        vocab,
        merges,
        bos_token="<start_of_text>",
        eos_token="<end_of_text>",
        pad_token="!",
        context_length=context_length,
        clean="lower",
    )


def find_open_clip_vocab() -> Path | None:
    """The CLIP vocabulary that the installed open_clip package ships, if any (open_clip is not imported)."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / OPEN_CLIP_VOCAB
    return path if path.is_file() else None


def sentencepiece_unigram(
    path: str | Path, *, eos_token: str, pad_token: str, context_length: int, clean: TextClean
) -> Tokenizer:
    """A SentencePiece unigram model, normaliser included, with SigLIP's "sticky" end-of-text padding."""
    try:
        from sentencepiece import sentencepiece_model_pb2
    except ImportError as error:
        raise ImportError(
            f"reading {path} needs the sentencepiece and protobuf packages: pip install sentencepiece protobuf"
        ) from error
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(Path(path).read_bytes())
    if proto.trainer_spec.model_type != 1:
        raise ValueError(f"{path}: only SentencePiece unigram models are supported")
    vocab = [(piece.piece, piece.score) for piece in proto.pieces]
    backend = BackendTokenizer(models.Unigram(vocab, proto.trainer_spec.unk_id, proto.trainer_spec.byte_fallback))
    steps = [normalizers.Replace(Regex(" {2,}"), " ")]
    if proto.normalizer_spec.precompiled_charsmap:
        steps.insert(0, normalizers.Precompiled(proto.normalizer_spec.precompiled_charsmap))
    backend.normalizer = normalizers.Sequence(steps)
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    backend.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    backend.add_special_tokens(list(dict.fromkeys([eos_token, pad_token])))
    eos_id = backend.token_to_id(eos_token)
    backend.post_processor = processors.TemplateProcessing(
        single=f"$A {eos_token}", pair=f"$A {eos_token} $B {eos_token}", special_tokens=[(eos_token, eos_id)]
    )
    return fix_length(backend, context_length, pad_token, clean)


def bert_wordpiece(path: str | Path, *, context_length: int, lowercase: bool = True) -> Tokenizer:
    """BERT's WordPiece from `vocab.txt`: [CLS] text [SEP], padded with [PAD]."""
    tokens = Path(path).read_text(encoding="utf-8").split("\n")
    vocab = {token: i for i, token in enumerate(t for t in tokens if t)}
    backend = BackendTokenizer(models.WordPiece(vocab, unk_token="[UNK]", max_input_chars_per_word=100))
    backend.normalizer = normalizers.BertNormalizer(lowercase=lowercase, strip_accents=None, clean_text=True)
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    backend.decoder = decoders.WordPiece()
    backend.add_special_tokens(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"])
    backend.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
    )
    return fix_length(backend, context_length, "[PAD]", "none")


def _special(settings: dict, name: str, default: str) -> str:
    value = settings.get(name, default)
    return value["content"] if isinstance(value, dict) else value


def hf_tokenizer(folder: Path, *, context_length: int, model_type: str) -> Tokenizer:
    """The tokenizer of a Hugging Face model folder, as transformers would build it for `model_type`."""
    config_path = folder / "tokenizer_config.json"
    settings = json.loads(config_path.read_text()) if config_path.is_file() else {}
    if set(settings) == {"clean"}:  # a vlp checkpoint's own tokenizer
        return Tokenizer.from_file(folder)
    if "vlp_text_clean" in settings:  # a folder vlp exported: its tokenizer.json and cleaning are complete
        return fix_length(
            BackendTokenizer.from_file(str(folder / "tokenizer.json")),
            context_length,
            _special(settings, "pad_token", None),
            settings["vlp_text_clean"],
        )
    lm_kind = model_type if model_type in ("causal_lm", "seq2seq_lm") else _lm_kind(folder)
    if lm_kind is not None:
        return _lm_tokenizer(folder, settings, context_length, seq2seq=lm_kind == "seq2seq_lm")
    if model_type == "siglip":
        if (folder / "spiece.model").is_file():
            return sentencepiece_unigram(
                folder / "spiece.model",
                eos_token=_special(settings, "eos_token", "</s>"),
                pad_token=_special(settings, "pad_token", "</s>"),
                context_length=context_length,
                clean="canonicalize_hf" if settings.get("do_lower_case", True) else "none",
            )
    elif (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
        vocab = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
        lines = (folder / "merges.txt").read_text(encoding="utf-8").split("\n")
        merges = [tuple(line.split()) for line in lines if line and not line.startswith("#version")]
        return clip_bpe(
            vocab,
            merges,
            bos_token=_special(settings, "bos_token", "<|startoftext|>"),
            eos_token=_special(settings, "eos_token", "<|endoftext|>"),
            # OWL-ViT's processors pad queries with "!" (id 0), CLIP's with end-of-text.
            pad_token=_special(settings, "pad_token", "!" if model_type in ("owlvit", "owlv2") else "<|endoftext|>"),
            context_length=context_length,
            clean="none",
        )
    if (folder / "tokenizer.json").is_file():
        backend = BackendTokenizer.from_file(str(folder / "tokenizer.json"))
        pad = _special(settings, "pad_token", None) or _special(settings, "eos_token", None)
        if pad is None:
            raise ValueError(f"{folder}: tokenizer_config.json names no pad or eos token to pad with")
        clean = "canonicalize_hf" if model_type == "siglip" and settings.get("do_lower_case", True) else "none"
        return fix_length(backend, context_length, pad, clean)
    if (folder / "vocab.txt").is_file():
        return bert_wordpiece(
            folder / "vocab.txt", context_length=context_length, lowercase=settings.get("do_lower_case", True)
        )
    raise FileNotFoundError(
        f"{folder} holds no tokenizer (tokenizer.json, vocab.json + merges.txt, spiece.model or vocab.txt)"
    )


def _lm_tokenizer(folder: Path, settings: dict, context_length: int, *, seq2seq: bool) -> Tokenizer:
    """A language model's tokenizer.json, each text framed by the model's start and end tokens (BLIP-2's
    captions), which a language model's tokenizer.json leaves to the caller: a causal LM's bos token, or an
    encoder-decoder's decoder start token (its pad token, T5's rule). Padded with the pad token, else the end
    token."""
    if not (folder / "tokenizer.json").is_file():
        raise FileNotFoundError(f"{folder} has no tokenizer.json (re-save the tokenizer with transformers' "
                                "save_pretrained to write one)")
    backend = BackendTokenizer.from_file(str(folder / "tokenizer.json"))
    bos = _special(settings, "pad_token" if seq2seq else "bos_token", None)
    eos = _special(settings, "eos_token", None)
    if bos is None or eos is None:
        start = "pad_token" if seq2seq else "bos_token"
        raise ValueError(f"{folder}: tokenizer_config.json must name the {start} and eos_token")
    backend.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A {eos}", pair=f"{bos} $A {eos} $B {eos}",
        special_tokens=[(bos, backend.token_to_id(bos)), (eos, backend.token_to_id(eos))],
    )
    return fix_length(backend, context_length, _special(settings, "pad_token", None) or eos, "none")


def _lm_kind(folder: Path) -> str | None:
    """"causal_lm" or "seq2seq_lm" for a Hugging Face language model's folder (by the architecture its
    config names), else None."""
    config = folder / "config.json"
    if not config.is_file():
        return None
    architectures = json.loads(config.read_text()).get("architectures") or []
    if any(name.endswith("ForCausalLM") for name in architectures):
        return "causal_lm"
    if any(name.endswith(("ForConditionalGeneration", "ForSeq2SeqLM")) for name in architectures) and not any(
            name.startswith(("Blip", "Blip2", "InstructBlip")) for name in architectures):
        return "seq2seq_lm"
    return None


def tokenizer_from_path(path: str | Path, *, context_length: int, model_type: str = "clip") -> Tokenizer:
    """A tokenizer the user names: a folder (vlp or Hugging Face), open_clip's vocabulary, an spm model
    or a vlp tokenizer.json."""
    path = Path(path)
    if path.is_dir():
        return hf_tokenizer(path, context_length=context_length, model_type=model_type)
    if path.name.endswith(".txt.gz"):
        return open_clip_bpe(path, context_length)
    if path.suffix == ".model":
        return sentencepiece_unigram(
            path, eos_token="</s>", pad_token="</s>", context_length=context_length, clean="canonicalize_hf"
        )
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer not found: {path}")
    return Tokenizer.from_file(path)


def open_clip_tokenizer(model_cfg: dict[str, Any], folder: Path | None, tokenizer: str | Path | None) -> Tokenizer:
    """The tokenizer of an open_clip model config: the one given, its Hugging Face tokenizer folder, or the CLIP BPE
    vocabulary open_clip ships."""
    text = model_cfg.get("text_cfg", {})
    context_length = text.get("context_length", 77)
    clean = (text.get("tokenizer_kwargs") or {}).get("clean")
    if tokenizer is not None:
        loaded = tokenizer_from_path(tokenizer, context_length=context_length)
        return Tokenizer(loaded.backend, clean) if clean else loaded
    if text.get("hf_tokenizer_name"):
        name = Path(text["hf_tokenizer_name"])
        for candidate in (name, folder / name if folder else None, folder):
            if (
                candidate is not None
                and candidate.is_dir()
                and any((candidate / f).is_file() for f in ("tokenizer.json", "vocab.json", "spiece.model"))
            ):
                loaded = hf_tokenizer(candidate, context_length=context_length, model_type="clip")
                return Tokenizer(loaded.backend, clean or "whitespace")
        raise CheckpointError(
            f"open_clip text_cfg.hf_tokenizer_name '{name}' is not a local folder; pass the tokenizer "
            "folder (tokenizer.json or vocab.json + merges.txt) with --tokenizer"
        )
    vocab = find_open_clip_vocab()
    if vocab is None:
        raise CheckpointError(
            "this open_clip model uses the CLIP BPE tokenizer: pass its vocabulary with --tokenizer "
            "(bpe_simple_vocab_16e6.txt.gz, or a Hugging Face CLIP folder with vocab.json + merges.txt), "
            "or install open_clip_torch, which ships it"
        )
    return open_clip_bpe(vocab, context_length)
