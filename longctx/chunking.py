"""Splitting documents for long-context work, and ordering passages so the important ones are not lost.

Fixed windows cut a token sequence into `window`-token pieces, consecutive pieces sharing
exactly `overlap` tokens. Semantic chunks cut at paragraph boundaries (blank lines), merging
paragraphs up to `max_tokens`; a paragraph longer than that is cut at token boundaries.
Both work on the whole document's tokenisation, so no chunk ever splits a token.
"""

from __future__ import annotations

import bisect
import json
import re
import sys
from pathlib import Path

STRATEGIES = ("none", "first-last", "reverse")


def fixed_windows(n_tokens: int, window: int, overlap: int = 0) -> list[tuple[int, int]]:
    """[start, end) spans covering 0..n_tokens; each starts `window - overlap` after the previous."""
    if window < 1 or not 0 <= overlap < window:
        raise ValueError(f"window={window}, overlap={overlap}: need window >= 1 and 0 <= overlap < window")
    spans, start = [], 0
    while True:
        end = min(start + window, n_tokens)
        spans.append((start, end))
        if end >= n_tokens:
            return spans
        start = end - overlap


def semantic_chunks(text: str, tokenizer, max_tokens: int) -> list[str]:
    """Chunks of at most `max_tokens` tokens of the whole text's tokenisation, cut at the last paragraph
    end (blank line) that fits, else after exactly `max_tokens` tokens; every cut falls between two
    tokens of the whole text, and the chunks joined give the text back."""
    starts = [a for a, _ in tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]]
    n = len(starts)
    # token index at which each paragraph end falls (a cut there is a cut between tokens)
    paragraph_cuts = sorted({bisect.bisect_left(starts, m.end()) for m in re.finditer(r"\n\n", text)} | {n})

    def char(i: int) -> int:
        return 0 if i == 0 else (len(text) if i >= n else starts[i])

    chunks, begin = [], 0
    while begin < n:
        fits = [c for c in paragraph_cuts if begin < c <= begin + max_tokens]
        end = fits[-1] if fits else begin + max_tokens
        chunks.append(text[char(begin):char(end)])
        begin = end
    return chunks


def reorder(ranked: list, strategy: str) -> list:
    """Place items given best-first: `first-last` puts ranks 1, 3, 5.. at the front and 2, 4, 6.. at the back
    (the best at both ends, the least relevant in the middle); `reverse` puts the best last."""
    if strategy == "none":
        return list(ranked)
    if strategy == "reverse":
        return list(reversed(ranked))
    if strategy == "first-last":
        return list(ranked[0::2]) + list(reversed(ranked[1::2]))
    raise ValueError(f"strategy={strategy!r}: must be one of {'|'.join(STRATEGIES)}")


def main(argv: list[str]) -> int:
    """`longctx chunk FILE --tokenizer DIR (--window N [--overlap M] | --semantic MAX) [--out F.jsonl]`"""
    from transformers import AutoTokenizer

    from longctx.cli import ArgParser
    from longctx.config import ConfigError

    p = ArgParser(prog="longctx chunk", description="split a text file into token windows or semantic chunks")
    p.add_argument("file")
    p.add_argument("--tokenizer", required=True)
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--window", type=int, help="fixed windows of this many tokens")
    mode.add_argument("--semantic", type=int, metavar="MAX_TOKENS", help="paragraph-aligned chunks up to MAX_TOKENS")
    p.add_argument("--overlap", type=int, default=0)
    p.add_argument("--out", help="jsonl output (default: stdout)")
    args = p.parse_args(argv)
    if not Path(args.file).is_file():
        raise ConfigError(f"file={args.file}: no such file")
    text = Path(args.file).read_text(encoding="utf-8", errors="replace")
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    if args.window is not None:
        try:
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            spans = fixed_windows(len(ids), args.window, args.overlap)
        except ValueError as e:
            raise ConfigError(f"--window/--overlap: {e}") from None
        rows = [{"start": s, "end": e, "text": tokenizer.decode(ids[s:e])} for s, e in spans]
    else:
        if args.semantic < 1:
            raise ConfigError(f"--semantic={args.semantic}: must be >= 1")
        rows = [{"text": c} for c in semantic_chunks(text, tokenizer, args.semantic)]
    lines = "".join(json.dumps(r) + "\n" for r in rows)
    if args.out:
        Path(args.out).write_text(lines)
        print(f"{len(rows)} chunks -> {args.out}", file=sys.stderr)
    else:
        sys.stdout.write(lines)
    return 0
