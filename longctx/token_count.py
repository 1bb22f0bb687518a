"""`longctx count-tokens PATH --tokenizer DIR [--lengths 4k,32k,128k]`: tokens per file, documents past each length."""

from __future__ import annotations

import json
from pathlib import Path

from longctx.cli import ArgParser
from longctx.config import ConfigError, DataSection


def count_documents(path: str, tokenizer) -> list[dict]:
    """Tokens of every document (its text, or prompt + completion, or chat messages)."""
    from longctx.data import load_documents, record_format, tokenize_record

    ds = load_documents(DataSection(path=path), seed=0)
    fmt = record_format(ds.column_names, path)
    return [{"document": i, "tokens": len(tokenize_record(r, tokenizer, fmt)["input_ids"])} for i, r in enumerate(ds)]


def summarize(counts: list[int], lengths: list[int]) -> dict:
    return {"documents": len(counts), "tokens": sum(counts), "max": max(counts, default=0),
            "longer_than": {str(n): sum(c > n for c in counts) for n in lengths}}


def main(argv: list[str]) -> int:
    from transformers import AutoTokenizer

    from longctx.data import data_files
    from longctx.evaluation.common import parse_lengths

    p = ArgParser(prog="longctx count-tokens", description=__doc__.splitlines()[0])
    p.add_argument("path", help="a .jsonl/.json/.parquet/.txt file or a folder of them")
    p.add_argument("--tokenizer", required=True)
    p.add_argument("--lengths", default="4k,32k,128k")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    if not Path(args.path).exists():
        raise ConfigError(f"path={args.path}: no such file or directory")
    lengths = parse_lengths(args.lengths)
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    per_file = {}
    for f in data_files(args.path)[1]:
        per_file[f] = [r["tokens"] for r in count_documents(f, tokenizer)]
    everything = [c for counts in per_file.values() for c in counts]
    report = {"files": {f: summarize(c, lengths) for f, c in per_file.items()}, "total": summarize(everything, lengths)}
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    for f, s in report["files"].items():
        print(f"{s['tokens']:>12,} tokens  {s['documents']:>7} docs  max {s['max']:>9,}  {f}")
    t = report["total"]
    print(f"{t['tokens']:>12,} tokens  {t['documents']:>7} docs  max {t['max']:>9,}  total")
    for n, count in t["longer_than"].items():
        print(f"  longer than {int(n):>9,} tokens: {count} documents")
    return 0
