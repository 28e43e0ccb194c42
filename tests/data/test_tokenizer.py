import json
import subprocess
import sys

import pytest

from text_samples import varied_strings
from vlp.assets.tokenizer import Tokenizer, TokenizerConfig, train_tokenizer

CAPTIONS = [
    f"a {size} {color} {shape} to the left of a {shape}"
    for size in ("small", "large")
    for color in ("red", "green", "blue")
    for shape in ("circle", "square", "star")
] * 5


@pytest.mark.parametrize("kind", ["bpe", "wordpiece"])
def test_trains_saves_and_loads_at_a_fixed_length(tmp_path, kind):
    cfg = TokenizerConfig(kind=kind, vocab_size=300, context_length=12)
    tok = train_tokenizer(CAPTIONS, cfg)
    ids, mask = tok(["A small RED circle", "a large blue star"])
    assert ids.shape == mask.shape == (2, 12)
    bos, eos, pad = (tok.token_id(t) for t in ("<start_of_text>", "<end_of_text>", "<pad>"))
    assert ids[0, 0] == bos
    length = int(mask[0].sum())
    assert ids[0, length - 1] == eos and (ids[0, length:] == pad).all() and (mask[0, length:] == 0).all()
    assert tok.decode(ids[0].tolist()).replace(" ", "") == "asmallredcircle"  # lowercased
    tok.save(tmp_path)
    again = Tokenizer.from_file(tmp_path)
    assert again.context_length == 12
    assert (again(["A small RED circle", "a large blue star"])[0] == ids).all()


def test_truncation_keeps_the_end_of_text_token():
    tok = train_tokenizer(CAPTIONS, TokenizerConfig(vocab_size=300, context_length=6))
    ids, mask = tok([" ".join(["red circle"] * 20)])
    assert mask.sum() == 6
    assert ids[0, -1] == tok.token_id("<end_of_text>")


def test_sticky_end_of_text_padding_for_siglip():
    cfg = TokenizerConfig(vocab_size=300, context_length=10, bos_token=None, pad_token="<end_of_text>")
    tok = train_tokenizer(CAPTIONS, cfg)
    ids, mask = tok(["red circle"])
    eos = tok.token_id("<end_of_text>")
    assert ids[0, -1] == eos  # last-token pooling always lands on EOS
    assert ids[0, 0] != eos and mask[0, -1] == 0


def test_missing_tokenizer_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="no tokenizer found"):
        Tokenizer.from_file(tmp_path)


VOCABULARY_OF_A_FRESH_PROCESS = """
import json, sys
sys.path.insert(0, "tests")
from text_samples import varied_strings
from vlp.assets.tokenizer import TokenizerConfig, train_tokenizer
tok = train_tokenizer(varied_strings(300), TokenizerConfig(kind=sys.argv[1], vocab_size=600))
print(json.dumps(sorted(tok.backend.get_vocab().items(), key=lambda item: item[1])))
"""


@pytest.mark.parametrize("kind", ["bpe", "wordpiece"])
def test_training_gives_the_same_vocabulary_in_every_process(kind):
    # tokenizers numbers WordPiece's "##" pieces in hash-map order, random per process (tokenizers #1794):
    # without vlp's ordering, three processes had given three vocabularies.
    runs = [subprocess.run([sys.executable, "-c", VOCABULARY_OF_A_FRESH_PROCESS, kind], capture_output=True,
                           text=True, check=True).stdout for _ in range(2)]  # fmt: skip
    assert runs[0] == runs[1]
    vocab = dict(json.loads(runs[0]))
    assert len(vocab) == 600
    if kind == "wordpiece":
        tok = train_tokenizer(varied_strings(300), TokenizerConfig(kind=kind, vocab_size=600))
        # The pieces are ordinary vocabulary: a literal "##a" in a text is split, and decoding keeps them.
        assert tok.backend.encode("red ##a").tokens[2:5] == ["#", "#", "a"]
        pieces = tok.backend.encode("antidisestablishmentarianism").tokens
        assert any(p.startswith("##") for p in pieces)
        assert tok.decode(tok(["antidisestablishmentarianism"])[0][0].tolist()) == "antidisestablishmentarianism"
