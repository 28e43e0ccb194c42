"""The recorded figures of every benchmark and experiment, written into the docs as tables: each results JSON
(`benchmarks/results*.json`, `experiments/results-*.json`) becomes a table, with the command that
reproduces it, between the markers `<!-- results: PATH -->` and `<!-- /results -->` of its page.

    .venv/bin/python benchmarks/results_docs.py           # rewrite the tables from the JSON files
    .venv/bin/python benchmarks/results_docs.py --check   # exit 1 if a page's tables differ from its JSON

The prose around the tables is written by hand; the tables are never edited by hand (a test runs --check).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
BENCH = ".venv-interop/bin/python benchmarks/bench.py"
# (page, results file, the command that writes it, what it measures)
RESULTS = [
    ("docs/results/clip.md", "benchmarks/results.json", "make bench",
     "vlp beside open_clip and transformers: training and embedding speed, loss memory (CPU)"),
    ("docs/results/clip.md", "benchmarks/results-cuda-h100.json",
     f"{BENCH} --device cuda --sections train,embed --out benchmarks/results-cuda-h100.json",
     "the same on one H100"),
    ("docs/results/clip.md", "experiments/results-siglip-batch.json",
     (".venv/bin/python experiments/siglip_batch.py --world data/shapes --runs runs/siglip-batch "
      "--batch-sizes 16 32 64 128 --seeds 0 1"),
     "SigLIP against CLIP by batch size at 64k pairs: zero-shot shape acc1 of every run"),
    ("docs/usage.md", "experiments/results-bad-fraction-rule.json", ".venv/bin/python experiments/bad_fraction_rule.py",
     "the bad-data rule, simulated over 2,000 runs each: share of runs stopped, samples drawn when they stop"),
    ("docs/results/blip.md", "benchmarks/results-blip-text-length.json",
     ".venv/bin/python benchmarks/blip_text_length.py", "training speed with captions cut to the batch's longest"),
    ("docs/results/blip.md", "experiments/results-blip-table1.json",
     ".venv/bin/python experiments/blip_table1.py --out runs/blip-table1 --seeds 0 1 2",
     "CapFilt, BLIP's Table 1 on the shapes world, every seed"),
    ("docs/results/blip.md", "experiments/results-blip-table1-vague.json",
     (".venv/bin/python experiments/blip_table1.py --out runs/blip-table1-vague --web-vague 0.4 --seeds 0 1 "
      "--rows web C F C+F"), "CapFilt on vague web text, every seed"),
    ("docs/results/blip.md", "benchmarks/results-blip-captioning.json",
     f"{BENCH} --sections blip --out benchmarks/results-blip-captioning.json",
     "captioning speed against transformers"),
    ("docs/results/coca.md", "experiments/results-coca-quality.json",
     ".venv/bin/python experiments/coca_quality.py --out runs/coca-quality --seeds 0 1",
     "CoCa against the tiny CLIP and BLIP, every seed"),
    ("docs/results/coca.md", "benchmarks/results-coca.json", f"{BENCH} --sections coca --out benchmarks/results-coca.json",
     "training and captioning speed against open_clip"),
    ("docs/results/blip2.md", "experiments/results-blip2-claims.json",
     (".venv/bin/python experiments/blip2_claims.py --data data/shapes --out runs/blip2-claims --seeds 0 1 "
      "--parts a,b --lm models/smollm2"), "stage 1 against an end-to-end BLIP (a), stage 2 with and without stage 1 (b)"),
    ("docs/results/blip2.md", "benchmarks/results-blip2.json",
     f"{BENCH} --sections blip2 --out benchmarks/results-blip2.json", "captioning and stage-1 speed against transformers"),
    ("docs/results/instructblip.md", "experiments/results-instructblip-claims.json",
     ".venv/bin/python experiments/instructblip_claims.py (its docstring gives the runs it reads)",
     "instruction tuning's arms: held-in and held-out task scores"),
    ("docs/results/owlvit.md", "experiments/results-owlvit-claims.json",
     ".venv/bin/python experiments/owlvit_claims.py --world data/shapes --clip runs/clip-tiny --runs runs/owl-claims",
     "the detector's arms: base, novel and held-out-pair AP"),
    ("docs/results/owlvit.md", "experiments/results-owlvit-grounding.json",
     ('.venv/bin/vlp eval grounding --checkpoint runs/owl-claims/OWL-ViT-seed0 --refs "data/shapes/refcoco/refs(unc).p" '
      "--split test --out experiments/results-owlvit-grounding.json"), "grounding referring expressions"),
    ("docs/results/owlvit.md", "benchmarks/results-detection.json",
     f"{BENCH} --sections detection --out benchmarks/results-detection.json", "detection speed against transformers"),
]
MARKER = re.compile(r"<!-- results: (?P<path>\S+) -->\n.*?<!-- /results -->\n", re.DOTALL)


def _cell(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return str(value).lower() if value is not None else "null"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list) and all(not isinstance(v, (dict, list)) for v in value):
        return ", ".join(_cell(v) for v in value)
    return str(value).replace("|", "\\|").replace("\n", " ")


def rows(data: Any, prefix: str = "") -> list[tuple[str, str]]:
    """(dotted key, value) of every leaf; lists of scalars stay one cell."""
    if isinstance(data, dict):
        return [row for key, value in data.items() for row in rows(value, f"{prefix}{key}.")]
    if isinstance(data, list) and any(isinstance(v, (dict, list)) for v in data):
        return [row for index, value in enumerate(data) for row in rows(value, f"{prefix}{index}.")]
    return [(prefix.rstrip("."), _cell(data))]


def table(path: str, command: str, title: str) -> str:
    data = json.loads((ROOT / path).read_text())
    lines = [f"<!-- results: {path} -->", f"**{title[0].upper()}{title[1:]}** (`{path}`, written by `{command}`):", "",
             "| figure | value |", "|---|---|"]
    lines += [f"| {key} | {value} |" for key, value in rows(data)]
    return "\n".join(lines) + "\n<!-- /results -->\n"


def render(page: str) -> str:
    """The page with its results tables rewritten; a page without a table's marker gets it at its end."""
    text = (ROOT / page).read_text()
    for doc, path, command, title in RESULTS:
        if doc != page:
            continue
        block = table(path, command, title)
        marker = f"<!-- results: {path} -->\n"
        if marker in text:
            text = MARKER.sub(lambda m, p=path, b=block: b if m["path"] == p else m[0], text)
        else:
            text = text.rstrip("\n") + "\n\n" + block
    return text


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="exit 1 if a page's tables differ from the JSON files")
    args = parser.parse_args()
    stale = []
    for page in dict.fromkeys(doc for doc, *_ in RESULTS):
        text = render(page)
        if text != (ROOT / page).read_text():
            stale.append(page)
            if not args.check:
                (ROOT / page).write_text(text)
    if args.check and stale:
        print(f"results tables out of date in {', '.join(stale)}: run benchmarks/results_docs.py", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
