"""Splitting documents for long-context work, and ordering passages so the important ones are not lost.

Fixed windows cut a token sequence into `window`-token pieces, consecutive pieces sharing
exactly `overlap` tokens. Semantic chunks cut at section starts (markdown headings) and
paragraph ends (blank lines), merging paragraphs up to `max_tokens`; a paragraph longer than
that is cut at token boundaries. A heading is never left at the end of a chunk, apart from
its section. Both work on the whole document's tokenisation, so no chunk ever splits a token.
"""

from __future__ import annotations

import bisect
import json
import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

STRATEGIES = ("none", "first-last", "reverse")
HEADING = re.compile(r"^#{1,6} ", re.MULTILINE)
PARAGRAPH_END = re.compile(r"\n[ \t]*\n\s*")


def fixed_windows(n_tokens: int, window: int, overlap: int = 0) -> list[tuple[int, int]]:
    """[start, end) spans covering 0..n_tokens (none for no tokens); each starts `window - overlap` after the previous."""
    if window < 1 or not 0 <= overlap < window:
        raise ValueError(f"window={window}, overlap={overlap}: need window >= 1 and 0 <= overlap < window")
    if n_tokens == 0:
        return []
    spans, start = [], 0
    while True:
        end = min(start + window, n_tokens)
        spans.append((start, end))
        if end >= n_tokens:
            return spans
        start = end - overlap


def token_starts(text: str, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Character offset where each token of the whole text's tokenisation starts."""
    return [a for a, _ in tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]]


def char_offset(starts: list[int], text: str, i: int) -> int:
    """Where token boundary i falls in the text: 0 before the first token, the end after the last."""
    return 0 if i == 0 else (len(text) if i >= len(starts) else starts[i])


def _token_at(starts: list[int], pos: int) -> int:
    """Index of the token that holds character `pos`: a cut before it moves no text of `pos`'s token back.
    Byte-level tokens of one character share its offset; the first of them is taken."""
    i = bisect.bisect_right(starts, pos) - 1
    while i > 0 and starts[i - 1] == starts[i]:
        i -= 1
    return max(i, 0)


def boundary_cuts(text: str, starts: list[int]) -> tuple[set[int], set[int]]:
    """(section starts, paragraph ends) as token indices where a chunk may begin."""
    sections = {_token_at(starts, m.start()) for m in HEADING.finditer(text) if m.start() > 0}
    paragraphs = set()
    for m in PARAGRAPH_END.finditer(text):
        last_line = text[:m.start()].rsplit("\n", 1)[-1]
        if m.end() < len(text) and not HEADING.match(last_line):  # a heading stays with its section's body
            paragraphs.add(_token_at(starts, m.end()))
    return sections, paragraphs


def semantic_chunks(text: str, tokenizer: PreTrainedTokenizerBase, max_tokens: int) -> list[str]:
    """Chunks of at most `max_tokens` tokens of the whole text's tokenisation, joined they give the text back.

    Each chunk ends at the last section start that fits if one lies in the second half of the cap
    (a chunk should hold whole sections), else at the last paragraph end that fits, else after
    exactly `max_tokens` tokens. Every cut falls between two tokens of the whole text."""
    if max_tokens < 1:
        raise ValueError(f"max_tokens={max_tokens}: must be >= 1")
    starts = token_starts(text, tokenizer)
    return [span_text(text, starts, s, e) for s, e in semantic_spans(text, starts, max_tokens)]


def span_text(text: str, starts: list[int], begin: int, end: int) -> str:
    """The source text of tokens [begin, end), not a decode: byte tokens cut inside a character decode to junk."""
    return text[char_offset(starts, text, begin):char_offset(starts, text, end)]


def semantic_spans(text: str, starts: list[int], max_tokens: int) -> list[tuple[int, int]]:
    """[start, end) token spans of `semantic_chunks`, given where each token of the text starts (`token_starts`)."""
    if max_tokens < 1:
        raise ValueError(f"max_tokens={max_tokens}: must be >= 1")
    n = len(starts)
    sections, paragraphs = boundary_cuts(text, starts)

    spans, begin = [], 0
    while begin < n:
        limit = begin + max_tokens
        if limit >= n:
            end = n
        else:
            late_sections = [c for c in sections if begin + max_tokens // 2 <= c <= limit and c > begin]
            fitting = [c for c in sections | paragraphs if begin < c <= limit]
            end = max(late_sections or fitting or [limit])
        spans.append((begin, end))
        begin = end
    return spans


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
    from longctx.cli import ArgParser
    from longctx.config import ConfigError
    from longctx.token_count import tokenizer_at

    p = ArgParser(prog="longctx chunk")
    p.add_argument("file", help="a text file (one document), or a .jsonl/.json/.parquet data file whose records "
                                "are documents (text, prompt + completion or messages, as training reads them)")
    p.add_argument("--tokenizer", required=True, help="local tokenizer (or model) directory")
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--window", type=int, help="fixed windows of this many tokens")
    mode.add_argument("--semantic", type=int, metavar="MAX_TOKENS",
                      help="chunks of up to MAX_TOKENS cut at section starts or paragraph ends")
    p.add_argument("--overlap", type=int, default=0, help="--window only: tokens shared by consecutive windows")
    p.add_argument("--out", help="jsonl output (default: stdout)")
    args = p.parse_args(argv)
    if not Path(args.file).is_file():
        raise ConfigError(f"file={args.file}: no such file")
    if args.semantic is not None and args.overlap:
        raise ConfigError(f"--overlap={args.overlap}: applies to --window only; semantic chunks do not overlap")
    if args.semantic is not None and args.semantic < 1:
        raise ConfigError(f"--semantic={args.semantic}: must be >= 1")
    if args.window is not None:
        try:
            fixed_windows(0, args.window, args.overlap)  # checks the arguments alone
        except ValueError as e:
            raise ConfigError(f"--window/--overlap: {e}") from None
    if args.out and not Path(args.out).resolve().parent.is_dir():
        raise ConfigError(f"--out {args.out}: its directory does not exist")
    tokenizer = tokenizer_at(args.tokenizer)
    rows = []
    for document, text in enumerate(documents(args.file)):
        starts = token_starts(text, tokenizer)
        spans = (fixed_windows(len(starts), args.window, args.overlap) if args.window is not None
                 else semantic_spans(text, starts, args.semantic))
        rows += [{"document": document, "start": s, "end": e, "text": span_text(text, starts, s, e)} for s, e in spans]
    lines = "".join(json.dumps(r) + "\n" for r in rows)
    if args.out:
        Path(args.out).write_text(lines)
        print(f"{len(rows)} chunks -> {args.out}", file=sys.stderr)
    else:
        sys.stdout.write(lines)
    return 0


def documents(path: str) -> list[str]:
    """The texts to chunk: each record of a data file (read as training reads it), or a whole text file."""
    from longctx.data import SUFFIXES, check_records
    from longctx.evaluation.common import document_texts

    if SUFFIXES.get(Path(path).suffix) in ("json", "parquet"):
        check_records(path, "file")  # its errors name this command's argument; document_texts' say --data
        return document_texts([path])
    return [Path(path).read_text(encoding="utf-8", errors="replace")]
