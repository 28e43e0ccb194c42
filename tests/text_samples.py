"""Varied strings for tokenizer parity: punctuation, case, digits, contractions, unicode, over-long text."""

import random

WORDS = [
    "a",
    "photo",
    "of",
    "the",
    "red",
    "Circle",
    "big",
    "DOG",
    "running",
    "café",
    "naïve",
    "über",
    "x-ray",
    "e-mail",
    "3d",
    "2024",
    "it's",
    "don't",
    "we'll",
    "I'm",
    "they've",
    "Zürich",
    "東京",
    "写真",
    "Привет",
    "mañana",
    "😀",
    "🐶",
    "straße",
    "ﬁne",
    "＂quoted＂",
    "rock'n'roll",
    "C++",
    "#hashtag",
    "@user",
    "50%",
]
PUNCTUATION = [
    ".",
    ",",
    "!",
    "?",
    "...",
    ";",
    ":",
    " - ",
    " — ",
    "(",
    ")",
    "[",
    "]",
    '"',
    "'",
    "/",
    "&",
    "&amp;",
    "*",
    "_",
    "~",
    "$",
    "  ",
    "\t",
    "\n",
]


def varied_strings(n: int = 300, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    fixed = [
        "",
        " ",
        "a",
        "A photo of a cat.",
        "Hello,   World!!",
        "  leading and trailing  ",
        "UPPER lower MiXeD",
        "“curly” ‘quotes’",
        "fish &amp; chips &lt;3",
        "tab\tand\nnewline",
        "snake_case_words",
        "1234567890",
        "word " * 200,
        "antidisestablishmentarianism" * 5,
    ]
    out = list(fixed)
    while len(out) < n:
        parts = []
        for _ in range(rng.randint(1, 24)):
            parts.append(rng.choice(WORDS))
            if rng.random() < 0.3:
                parts.append(rng.choice(PUNCTUATION))
        out.append(" ".join(parts) if rng.random() < 0.8 else "".join(parts))
    return out


def train_siglip_spm(path, texts: list[str], vocab_size: int):
    """A SentencePiece unigram model laid out as SigLIP's (eos = pad = </s>, no bos), written to `path`."""
    import io

    import sentencepiece as spm

    buffer = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts), model_writer=buffer, vocab_size=vocab_size, model_type="unigram",
        pad_id=-1, bos_id=-1, eos_id=1, unk_id=2, eos_piece="</s>", unk_piece="<unk>", hard_vocab_limit=False,
    )
    path.write_bytes(buffer.getvalue())
    return path
