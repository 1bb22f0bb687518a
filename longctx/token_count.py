"""`longctx count-tokens PATH --tokenizer DIR [--lengths 4k,32k,128k]`: tokens per file, documents past each length."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from tqdm import tqdm

from longctx.cli import ArgParser
from longctx.config import ConfigError, DataSection

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


def tokenizer_at(path: str, key: str = "--tokenizer") -> PreTrainedTokenizerBase:
    """A tokenizer from a local directory, or a one-line error naming the argument."""
    from transformers import AutoTokenizer

    if not Path(path).is_dir():
        raise ConfigError(f"{key} {path}: not a directory (tokenizers load from local model directories)")
    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise ConfigError(f"{key} {path}: no tokenizer there ({str(e).splitlines()[0]})") from None


def count_documents(path: str, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Tokens of every document as training sees it (text, prompt + completion, or chat; bos/eos included)."""
    from longctx.data import load_documents, record_format, tokenize_record

    ds = load_documents(DataSection(path=path), seed=0)
    fmt = record_format(ds.column_names, path, "path")
    return [len(tokenize_record(r, tokenizer, fmt)["input_ids"]) for r in tqdm(ds, desc=Path(path).name, leave=False)]


def summarize(counts: list[int], lengths: list[int]) -> dict:
    """Totals, and how many documents are longer than each length (they would be cut or need that context)."""
    return {"documents": len(counts), "tokens": sum(counts), "max": max(counts, default=0),
            "longer_than": {str(n): sum(c > n for c in counts) for n in lengths}}


def main(argv: list[str]) -> int:
    from longctx.data import check_records, data_files
    from longctx.evaluation.common import parse_lengths

    p = ArgParser(prog="longctx count-tokens")
    p.add_argument("path", help="a .jsonl/.json/.parquet/.txt file or a folder of them")
    p.add_argument("--tokenizer", required=True, help="local tokenizer (or model) directory")
    p.add_argument("--lengths", default="4k,32k,128k",
                   help="count documents longer than each: 4096, 32k, 1m, comma-separated")
    p.add_argument("--json", action="store_true", help="print JSON instead of the table")
    args = p.parse_args(argv)
    if not Path(args.path).exists():
        raise ConfigError(f"path={args.path}: no such file or directory")
    lengths = parse_lengths(args.lengths)
    tokenizer = tokenizer_at(args.tokenizer)
    files = data_files(args.path, "path")[1]
    for f in files:  # an empty or unreadable file is refused before any is counted
        check_records(f, "path")
    per_file = {f: count_documents(f, tokenizer) for f in files}
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
