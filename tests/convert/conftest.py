"""Fixtures the converter tests share."""

import json

import pytest
from tokenizers import Regex, models, pre_tokenizers, trainers
from tokenizers import Tokenizer as BackendTokenizer

from text_samples import varied_strings
from vlp.convert.tokenizers import CLIP_SPLIT

CLASSES = ["a photo of a dog.", "a red circle", "two cats on a sofa", "an x-ray of a hand", "the city at night"]


@pytest.fixture(scope="module")
def clip_vocab(tmp_path_factory):
    """vocab.json + merges.txt of a CLIP-style BPE ("</w>" word ends), specials at CLIP's ids 49406/49407."""
    folder = tmp_path_factory.mktemp("clip_vocab")
    backend = BackendTokenizer(models.BPE(end_of_word_suffix="</w>", continuing_subword_prefix=""))
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(CLIP_SPLIT), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=800,
        end_of_word_suffix="</w>",
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    backend.train_from_iterator([s.lower() for s in varied_strings(400, seed=1)] + CLASSES * 5, trainer)
    backend.model.save(str(folder))
    vocab = json.loads((folder / "vocab.json").read_text())
    vocab.update({"<|startoftext|>": 49406, "<|endoftext|>": 49407})
    (folder / "vocab.json").write_text(json.dumps(vocab))
    return folder
