"""`longctx eval ppl|needle|middle --model DIR ...`: reports (JSON + PNG) into --out."""

from __future__ import annotations

from pathlib import Path

from longctx.cli import ArgParser
from longctx.config import ConfigError
from longctx.evaluation.common import load_model, parse_fractions, parse_lengths
from longctx.evaluation.reports import middle_report, needle_report, ppl_report, summary_line


def parser() -> ArgParser:
    p = ArgParser(prog="longctx eval", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="task", required=True, parser_class=ArgParser)
    for name in ("ppl", "needle", "middle"):
        s = sub.add_parser(name)
        s.add_argument("--model", action="append", required=True, help="model directory (ppl: repeat to compare)")
        s.add_argument("--out", default=f"out/eval-{name}")
        s.add_argument("--data", nargs="*", help="text files for the haystack / documents (default: embedded corpus)")
        s.add_argument("rope", nargs="*", help="RoPE override, e.g. rope.method=yarn rope.factor=4")
        if name in ("ppl", "needle"):
            s.add_argument("--lengths", default="1k,2k,4k")
        if name == "ppl":
            s.add_argument("--score-last", type=int, default=0, help="score only the last N tokens of each window")
        if name == "needle":
            s.add_argument("--depths", default="0,0.25,0.5,0.75,1")
            s.add_argument("--trials", type=int, default=3)
            s.add_argument("--needles", type=int, default=1, help="several needles: multi-key / multi-value")
            s.add_argument("--retrieve", choices=("one", "all"), default="one")
        if name == "middle":
            s.add_argument("--passages", type=int, default=6)
            s.add_argument("--trials", type=int, default=3)
            s.add_argument("--reorder", default="none,first-last,reverse")
    return p


def main(argv: list[str]) -> int:
    args = parser().parse_args(argv)
    for f in args.data or []:
        if not Path(f).is_file():
            raise ConfigError(f"--data {f}: no such file")
    out = Path(args.out)
    if args.task == "ppl":
        lengths = parse_lengths(args.lengths)
        models = {"/".join(Path(m).parts[-2:]) + (" " + " ".join(args.rope) if args.rope else ""): load_model(m, args.rope)
                  for m in args.model}
        report = ppl_report(models, lengths, out, args.data, args.score_last)
    elif len(args.model) > 1:
        raise ConfigError(f"--model: {args.task} evaluates one model at a time (got {len(args.model)})")
    elif args.task == "needle":
        lengths, depths = parse_lengths(args.lengths), parse_fractions(args.depths)
        if not 1 <= args.needles <= 8:
            raise ConfigError(f"--needles={args.needles}: must be 1..8")
        model, tokenizer = load_model(args.model[0], args.rope)
        report = needle_report(model, tokenizer, lengths, depths, args.trials, out, args.data, args.needles, args.retrieve)
    else:
        from longctx.chunking import STRATEGIES

        strategies = args.reorder.split(",")
        bad = [s for s in strategies if s not in STRATEGIES]
        if bad:
            raise ConfigError(f"--reorder={args.reorder}: {bad[0]!r} is not one of {'|'.join(STRATEGIES)}")
        model, tokenizer = load_model(args.model[0], args.rope)
        report = middle_report(model, tokenizer, args.passages, args.trials, out, strategies, args.data)
    print(summary_line(args.task, report))
    print(f"reports in {out}")
    return 0
