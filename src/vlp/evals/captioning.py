"""Captioning metrics with the COCO caption evaluation code (`pycocoevalcap`): BLEU-1..4, METEOR,
ROUGE-L, CIDEr. SPICE is reported as unavailable: its scorer downloads Stanford CoreNLP on first use.

The standard protocol, which papers report, tokenises references and candidates with the PTB tokeniser
(Stanford CoreNLP's, run in Java by `pycocoevalcap`): the default. The `simple` tokeniser needs no Java but
splits "t-shirt", "3.5" and "man's" and drops accented letters, so its scores differ (CIDEr reads ~6%
higher on such captions); results say which tokeniser made them.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Literal

CaptionTokenizer = Literal["ptb", "simple"]
PROTOCOLS = {
    "ptb": "COCO caption evaluation (pycocoevalcap), PTB tokeniser",
    "simple": "pycocoevalcap scorers on a regex tokeniser, not the standard protocol: scores differ from papers'",
}


def _simple_tokenize(text: str) -> str:
    """Lower-case runs of ASCII letters and digits."""
    return " ".join(re.findall(r"[a-z0-9]+", text.lower()))


def caption_metrics(
    references: Sequence[Sequence[str]], candidates: Sequence[str], *, meteor: bool = True,
    tokenizer: CaptionTokenizer = "ptb",
) -> dict[str, float | None]:
    """Corpus scores of one candidate caption per image against that image's references.
    METEOR and the PTB tokeniser start Java (a few seconds each)."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    if len(references) != len(candidates):
        raise ValueError(f"{len(candidates)} candidates for {len(references)} images")
    gts = {i: list(refs) for i, refs in enumerate(references)}
    res = {i: [candidate] for i, candidate in enumerate(candidates)}
    if tokenizer == "ptb":
        from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

        ptb = PTBTokenizer()
        gts = ptb.tokenize({i: [{"caption": c} for c in refs] for i, refs in gts.items()})
        res = ptb.tokenize({i: [{"caption": c} for c in cands] for i, cands in res.items()})
    elif tokenizer == "simple":
        gts = {i: [_simple_tokenize(c) for c in refs] for i, refs in gts.items()}
        res = {i: [_simple_tokenize(c) for c in cands] for i, cands in res.items()}
    else:
        raise ValueError(f"unknown caption tokenizer {tokenizer!r}; expected ptb or simple")
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    scores: dict[str, float | None] = {f"bleu{n}": float(b) for n, b in enumerate(bleu, start=1)}
    if meteor:
        from pycocoevalcap.meteor.meteor import Meteor

        scores["meteor"] = float(Meteor().compute_score(gts, res)[0])
    scores["rouge_l"] = float(Rouge().compute_score(gts, res)[0])
    scores["cider"] = float(Cider().compute_score(gts, res)[0])
    scores["spice"] = None
    return scores
