"""Captioning metrics with the COCO caption evaluation code (`pycocoevalcap`): BLEU-1..4, METEOR,
ROUGE-L, CIDEr. SPICE is reported as unavailable: its scorer downloads Stanford CoreNLP on first use."""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from vlp.data.sources import read_captions


def _simple_tokenize(text: str) -> str:
    """Lower-case words without punctuation: PTB tokenisation's effect on plain captions, without Java."""
    return " ".join(re.findall(r"[a-z0-9]+", text.lower()))


def caption_metrics(
    references: Sequence[Sequence[str]], candidates: Sequence[str], *, meteor: bool = True, ptb: bool = False
) -> dict[str, float | None]:
    """Corpus scores of one candidate caption per image against that image's references.
    meteor and ptb (the official PTB tokeniser) start Java, ~10 s."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    if len(references) != len(candidates):
        raise ValueError(f"{len(candidates)} candidates for {len(references)} images")
    gts = {i: list(refs) for i, refs in enumerate(references)}
    res = {i: [candidate] for i, candidate in enumerate(candidates)}
    if ptb:
        from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

        tokenizer = PTBTokenizer()
        gts = tokenizer.tokenize({i: [{"caption": c} for c in refs] for i, refs in gts.items()})
        res = tokenizer.tokenize({i: [{"caption": c} for c in cands] for i, cands in res.items()})
    else:
        gts = {i: [_simple_tokenize(c) for c in refs] for i, refs in gts.items()}
        res = {i: [_simple_tokenize(c) for c in cands] for i, cands in res.items()}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    scores: dict[str, float | None] = {f"bleu{n}": float(b) for n, b in enumerate(bleu, start=1)}
    if meteor:
        from pycocoevalcap.meteor.meteor import Meteor

        scores["meteor"] = float(Meteor().compute_score(gts, res)[0])
    scores["rouge_l"] = float(Rouge().compute_score(gts, res)[0])
    scores["cider"] = float(Cider().compute_score(gts, res)[0])
    scores["spice"] = None
    return scores


def evaluate_captioning(
    caption: Callable[[list[Path]], list[str]], data: str | Path, images_dir: str | Path | None = None, *,
    meteor: bool = True, ptb: bool = False,
) -> dict[str, Any]:
    """Caption every image of a COCO-format (or CSV) caption file and score against its captions."""
    items = read_captions(str(data), images_dir=images_dir)
    candidates = caption([item.path for item in items])
    metrics = caption_metrics([item.captions for item in items], candidates, meteor=meteor, ptb=ptb)
    return {
        "task": "captioning",
        "dataset": str(data),
        "metrics": metrics,
        "unavailable": {"spice": "needs Stanford CoreNLP, which its scorer downloads"},
        "captions": [{"image": str(item.path), "caption": c} for item, c in zip(items, candidates, strict=True)],
    }
