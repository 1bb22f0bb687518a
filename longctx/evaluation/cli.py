"""`longctx eval ppl|needle|middle --model DIR ...`: reports (JSON + PNG) into --out.

Every argument is checked before a model loads, so bad input costs nothing and writes nothing.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from longctx.chunking import STRATEGIES
from longctx.cli import ArgParser
from longctx.config import EVALUATIONS, ConfigError
from longctx.evaluation.common import (document_texts, load_pretrained, model_name, parse_fractions, parse_lengths,
                                       rope_override, rope_variants)
from longctx.evaluation.middle import MAX_PASSAGES
from longctx.passkey import MAX_NEEDLES
from longctx.evaluation.reports import (check_needle_lengths, long_documents, middle_report, needle_report, ppl_report,
                                        summary_line)

# what from_pretrained loads weights from (sharded checkpoints through their index)
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


def parser() -> ArgParser:
    p = ArgParser(prog="longctx eval")
    sub = p.add_subparsers(dest="task", required=True, parser_class=ArgParser, help="which evaluation",
                           metavar="{ppl,needle,middle}")  # a missing task is then named with the allowed ones
    summaries = {"ppl": "perplexity of documents at each context length",
                 "needle": "pass-key retrieval at each length and depth",
                 "middle": "accuracy by the rank of the relevant passage (lost in the middle)"}
    for name in EVALUATIONS:
        s = sub.add_parser(name, prog=f"longctx eval {name}", help=summaries[name], description=summaries[name])
        s.add_argument("--model", action="append", required=True,
                       help="local model directory" + (" (repeat to compare models)" if name == "ppl" else ""))
        s.add_argument("--out", default=f"out/eval-{name}", help="report directory")
        s.add_argument("--data", action="append",
                       help="documents (.jsonl/.json/.parquet/.txt or a folder; repeatable); default: embedded corpus")
        s.add_argument("rope", nargs="*", metavar="rope.KEY=VALUE",
                       help="RoPE override, e.g. rope.method=yarn rope.factor=4"
                            + (" (rope.method=none,linear,yarn: one line per method)" if name == "ppl" else ""))
        if name in ("ppl", "needle"):
            s.add_argument("--lengths", default="1k,2k,4k", help="context lengths: 4096, 32k, 1m, comma-separated")
        if name == "ppl":
            how = s.add_mutually_exclusive_group()
            how.add_argument("--score-last", type=int, default=0, help="score only the last N tokens of each window")
            how.add_argument("--stride", type=int, default=0, help="sliding windows every N tokens (N < every length)")
            s.add_argument("--batch-size", type=int, default=4, help="windows scored together (>= 1)")
        if name == "needle":
            s.add_argument("--depths", default="0,0.25,0.5,0.75,1",
                           help="where the needle sits, fractions of the context in [0, 1], comma-separated")
            s.add_argument("--trials", type=int, default=3, help="needles per cell, each with new keys (>= 1)")
            s.add_argument("--needles", type=int, default=1, help=f"1..{MAX_NEEDLES}; several: multi-key / multi-value")
            s.add_argument("--retrieve", choices=("one", "all"), default="one",
                           help="with several needles: ask for one key's value (multi-key) or every value (multi-value)")
        if name == "middle":
            s.add_argument("--passages", type=int, default=6, help=f"k passages, 2..{MAX_PASSAGES}")
            s.add_argument("--words", type=int, default=40, help="words of filler per passage")
            s.add_argument("--trials", type=int, default=3, help="questions per rank, each with new passages (>= 1)")
            s.add_argument("--reorder", default=",".join(STRATEGIES), metavar="{" + ",".join(STRATEGIES) + "}[,...]",
                           help="passage placements to compare, comma-separated: none (rank order), first-last (the "
                                "best at both ends), reverse (the best next to the question)")
    return p


def _at_least(value: int, minimum: int, key: str) -> None:
    if value < minimum:
        raise ConfigError(f"{key}={value}: must be >= {minimum}")


def check(args: argparse.Namespace) -> None:
    """Every argument, before anything loads; raises ConfigError naming the argument."""
    for d in args.model:
        if not (Path(d) / "config.json").is_file():
            raise ConfigError(f"--model {d}: not a directory with a config.json (models load from local dirs)")
        if not any((Path(d) / f).is_file() for f in WEIGHT_FILES):
            raise ConfigError(f"--model {d}: no weights in it (expected one of {', '.join(WEIGHT_FILES)})")
    if args.task != "ppl" and len(args.model) > 1:
        raise ConfigError(f"--model: {args.task} evaluates one model at a time (got {len(args.model)})")
    labels = [model_name(d) for d in args.model]
    for i, label in enumerate(labels):
        if label in labels[:i]:
            raise ConfigError(f"--model {args.model[i]}: reported as {label!r}, as {args.model[labels.index(label)]} is; "
                              f"models need directories whose last two parts differ")
    if Path(args.out).exists() and not Path(args.out).is_dir():
        raise ConfigError(f"--out {args.out}: a file, not a directory")
    for f in args.data or []:
        if not Path(f).exists():
            raise ConfigError(f"--data {f}: no such file or directory")
    if args.rope:
        from transformers import AutoConfig

        for d in args.model:  # applying the override to the config alone is cheap and names the bad key
            for overrides in rope_variants(args.rope):
                if overrides:
                    rope_override(AutoConfig.from_pretrained(d), overrides)
    if args.task in ("ppl", "needle"):
        args.lengths = sorted(set(parse_lengths(args.lengths)))
    if args.task == "ppl":
        _at_least(args.batch_size, 1, "--batch-size")
        _at_least(args.score_last, 0, "--score-last")
        if args.stride and not 0 < args.stride < min(args.lengths):
            raise ConfigError(f"--stride={args.stride}: must be in 1..{min(args.lengths) - 1} (below the shortest "
                              f"length), or windows would skip tokens")
        if args.score_last >= min(args.lengths):
            raise ConfigError(f"--score-last={args.score_last}: must be below the shortest length {min(args.lengths)}")
    if args.task == "needle":
        args.depths = parse_fractions(args.depths)
        _at_least(args.trials, 1, "--trials")
        if not 1 <= args.needles <= MAX_NEEDLES:
            raise ConfigError(f"--needles={args.needles}: must be 1..{MAX_NEEDLES}")
    if args.task == "middle":
        _at_least(args.trials, 1, "--trials")
        _at_least(args.words, 1, "--words")
        if not 2 <= args.passages <= MAX_PASSAGES:
            raise ConfigError(f"--passages={args.passages}: must be 2..{MAX_PASSAGES}")
        args.reorder = args.reorder.split(",")
        bad = [s for s in args.reorder if s not in STRATEGIES]
        if bad:
            raise ConfigError(f"--reorder: {bad[0]!r} is not one of {'|'.join(STRATEGIES)}")


def main(argv: list[str]) -> int:
    from transformers import AutoTokenizer

    args = parser().parse_args(argv)
    check(args)
    texts = document_texts(args.data) if args.data else None
    tokenizer = AutoTokenizer.from_pretrained(args.model[0])
    out = Path(args.out)
    if args.task == "ppl":
        variants = {}
        for d in args.model:
            # documents first: a length no document reaches is refused before any model loads
            documents = long_documents(AutoTokenizer.from_pretrained(d), max(args.lengths), texts)
            for overrides in rope_variants(args.rope):
                label = model_name(d) + (" " + " ".join(o[len("rope."):] for o in overrides) if overrides else "")
                variants[label] = (lambda d=d, o=overrides: load_pretrained(d, o), documents)
        report = ppl_report(variants, args.lengths, out, args.score_last, args.stride, args.batch_size)
    elif args.task == "needle":
        check_needle_lengths(tokenizer, args.lengths, args.needles, args.retrieve, "--lengths")
        model, tokenizer = load_pretrained(args.model[0], args.rope)
        report = needle_report(model, tokenizer, args.lengths, args.depths, args.trials, out, texts, args.needles,
                               args.retrieve, model_name(args.model[0]))
    else:
        model, tokenizer = load_pretrained(args.model[0], args.rope)
        report = middle_report(model, tokenizer, args.passages, args.trials, out, args.reorder, texts, args.words,
                               model_name(args.model[0]))
    print(summary_line(args.task, report))
    print(f"reports in {out}")
    return 0
