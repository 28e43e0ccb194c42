"""`make demo`: make the shapes world, train a tiny CLIP and a tiny SigLIP, evaluate, index the test images
for search, write a report (with a screenshot of the service's page answering a search), and say how to
open that page."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from vlp.convert import load_pretrained
from vlp.data.sources import read_captions
from vlp.evals import EvalResult
from vlp.outputs import write_text
from vlp.report import metrics_table, plot_curves, plot_recall, plot_retrieval_grid, read_metrics
from vlp.shapes import ShapesWorldConfig, make_shapes_world
from vlp.tasks import PredictFunctions, predict_functions
from vlp.tasks.retrieval import RetrievalEvalConfig, evaluate_retrieval
from vlp.tasks.zeroshot import ZeroShotEvalConfig, evaluate_zeroshot
from vlp.train.config import load_run_config
from vlp.train.loop import train

log = logging.getLogger("vlp.demo")

MODELS = ("clip", "siglip")
ZEROSHOT = {
    "zeroshot_shape": ("shape.csv", "shape_classnames.txt"),
    "zeroshot_color_shape": ("color_shape.csv", "color_shape_classnames.txt"),
    "zeroshot_color_shape_heldout": ("color_shape_heldout.csv", "color_shape_classnames.txt"),
}
RETRIEVAL = {"retrieval_test": "captions_test.json", "retrieval_test_heldout": "captions_test_heldout.json"}


def evaluate_all(functions: PredictFunctions, data: Path) -> dict[str, EvalResult]:
    """The demo's evaluations of a model's predict functions on a shapes world, by name."""
    results = {}
    for key, (csv_name, classnames) in ZEROSHOT.items():
        z = data / "zeroshot"
        config = ZeroShotEvalConfig(str(z / csv_name), str(z / classnames), str(z / "templates.txt"))
        results[key] = evaluate_zeroshot(functions, config)
    for key, name in RETRIEVAL.items():
        results[key] = evaluate_retrieval(functions, RetrievalEvalConfig(str(data / name)))
    return results


def run_demo(*, out: Path, data: Path, configs: Path, overrides: list[str] = ()) -> Path:
    if not (data / "manifest.json").is_file():
        log.info("making the shapes world in %s", data)
        make_shapes_world(data, ShapesWorldConfig())
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, dict[str, dict]] = {}
    runs: dict[str, Path] = {}
    for name in MODELS:
        config = configs / f"{name}-tiny.yaml"
        cfg = load_run_config(config, [f"data.train={data / 'train.csv'}", *overrides])
        runs[name] = out / name
        log.info("training %s (%s)", name, config)
        train(cfg, runs[name], resume="latest")  # a re-run continues or reuses a finished run
        evaluated = evaluate_all(predict_functions(load_pretrained(runs[name])), data)
        for result in evaluated.values():
            print(f"[{name}] {result.table()}")
        results[name] = {key: result.to_dict() for key, result in evaluated.items()}
    write_text(out / "results.json", json.dumps(results, indent=1))
    search = index_and_page(out, data, runs["clip"])
    report = write_report(out, data, runs, results, search)
    models = " ".join(f"--checkpoint {name}={run}" for name, run in runs.items())
    print(f"to search the test images and try the models in a browser: vlp serve {models} --index "
          f"test={out / 'index'}  (then open http://127.0.0.1:8000/)")
    return report


SEARCH_QUERY = "a red circle"


def index_and_page(out: Path, data: Path, clip: Path) -> dict[str, object]:
    """An index of the test images by the CLIP (kept: a re-run reuses it) and, where Chromium is installed, a
    screenshot of the service's page answering a text search."""
    from vlp.index import CollectionIndex
    from vlp.index.build import build_index
    from vlp.report import page_screenshot
    from vlp.serve import create_app
    from vlp.serve.run import in_background

    index = out / "index"
    if not (index / "manifest.json").is_file():
        build_index(predict_functions(load_pretrained(clip)), data / "captions_test.json", index, checkpoint=str(clip),
                    progress=False)
    manifest = CollectionIndex(index).manifest
    with in_background(create_app({"clip": str(clip)}, indices={"test": str(index)})) as url:
        shot = page_screenshot(url, SEARCH_QUERY, out / "page.png")
    if not shot:
        log.warning("no screenshot of the page: Debian's chromium and chromium-driver (and selenium) are needed")
    return {"count": manifest["count"], "index": manifest["index"]["type"], "screenshot": shot}


def write_report(out: Path, data: Path, runs: dict[str, Path], results: dict[str, dict[str, dict]],
                 search: dict[str, object] | None = None) -> Path:
    plot_curves(runs, out / "curves.png")
    plot_recall(results, "retrieval_test", out / "recall_at_k.png")
    all_items = read_captions(str(data / "captions_test.json"))
    items = all_items[:8]
    texts = list(dict.fromkeys(c for item in all_items for c in item.captions))  # distinct captions
    functions = predict_functions(load_pretrained(runs["clip"]))
    image_features = functions.require("embed_images")([i.path for i in items])
    scores = image_features @ functions.require("embed_texts")(texts).T  # [8, all test captions]
    top = [[texts[j] for j in row.topk(3).indices] for row in scores]
    plot_retrieval_grid([i.path for i in items], top, [i.captions for i in items], out / "retrieval_grid.png")

    shape_metrics = ["acc1", "acc5", "mean_per_class_recall"]
    recall_metrics = [f"{d}_retrieval_recall@{k}" for d in ("image", "text") for k in (1, 5, 10)]
    timing = []
    for name, run_dir in runs.items():
        records = read_metrics(run_dir)
        if records:
            last = records[-1]
            timing.append(f"| {name} | {last['step']} | {last['elapsed_s'] / 60:.1f} | "
                          f"{sum(r['samples_per_s'] for r in records) / len(records):.0f} | {last['loss']:.3f} |")
    sections = [
        "# vlp demo report",
        (
            f"Tiny CLIP and SigLIP trained on the shapes world (`{data}`), evaluated on its test splits. "
            "Held-out compositions are colour-shape pairs that never appear in the training captions."
        ),
        "## Training",
        "| model | steps | minutes | samples/s | final loss |\n|---|---|---|---|---|\n" + "\n".join(timing),
        "![training curves](curves.png)",
        "## Zero-shot classification: shape (5 classes)",
        metrics_table(results, "zeroshot_shape", shape_metrics),
        "## Zero-shot classification: colour + shape (30 classes)",
        metrics_table(results, "zeroshot_color_shape", shape_metrics),
        "## Zero-shot classification: held-out colour-shape pairs (among all 30 classes)",
        metrics_table(results, "zeroshot_color_shape_heldout", shape_metrics),
        "## Retrieval, test split (1k images, 5 captions each)",
        metrics_table(results, "retrieval_test", recall_metrics),
        "![recall at k](recall_at_k.png)",
        "## Retrieval, test images with a held-out pair",
        metrics_table(results, "retrieval_test_heldout", recall_metrics),
        "## Test images and the CLIP model's top-3 captions (✓ = written for this image)",
        "![retrieval grid](retrieval_grid.png)",
    ]
    if search:
        sections += ["## Searching the test images",
                     (f"The CLIP's index of the {search['count']} test images ({search['index']}, `vlp index`), "
                     f"searched through `vlp serve`'s page for \"{SEARCH_QUERY}\":")]
        sections.append("![the page](page.png)" if search["screenshot"] else
                        "(no screenshot: Debian's chromium and chromium-driver are not installed)")
    report = out / "report.md"
    write_text(report, "\n\n".join(sections) + "\n")
    return report
