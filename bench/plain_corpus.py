"""Plain long documents, without passkey episodes, for a `data.path` run of the extension study.

    python bench/plain_corpus.py /root/plain                  # 40M characters: 100 windows of 64K, none repeated
    python bench/plain_corpus.py /root/plain --chars 80e6     # 300 windows, none repeated

The Python sources of transformers' model packages, then of torch (both installed wherever longctx runs), each
package's files in path order under their paths as header lines, joined into documents of at least 320,000
characters (about 90K SmolLM2 tokens, longer than the study's 64K windows), up to --chars characters in all
(SmolLM2 reads about 3.6 characters of this source per token). One .txt file per document.
"""

from __future__ import annotations

import argparse
from pathlib import Path

DOCUMENT_CHARS = 320_000


def sources() -> list[tuple[str, Path]]:
    """(header name, file) of the source files, in the order they are joined."""
    import torch
    import transformers

    roots = [Path(transformers.__file__).parent / "models", Path(torch.__file__).parent]
    return [(str(path.relative_to(root)), path) for root in roots for path in sorted(root.rglob("*.py"))]


def documents(total_chars: int) -> list[str]:
    """The documents, in order, until they hold `total_chars` characters (ValueError if the sources hold fewer)."""
    docs: list[str] = []
    parts: list[str] = []
    size = characters = 0
    for name, path in sources():
        parts.append(f"# {name}\n{path.read_text(encoding='utf-8', errors='replace')}")
        size += len(parts[-1])
        if size >= DOCUMENT_CHARS:
            docs.append("\n\n".join(parts))
            characters, parts, size = characters + len(docs[-1]), [], 0
            if characters >= total_chars:
                return docs
    raise ValueError(f"--chars {total_chars:.0f}: the sources hold {characters:,} characters in whole documents")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", type=Path, help="folder for the .txt documents")
    p.add_argument("--chars", type=float, default=40e6, help="characters in all (default 40e6)")
    args = p.parse_args()
    try:
        docs = documents(int(args.chars))
    except ValueError as e:
        p.exit(2, f"error: {e}\n")  # nothing written
    args.out.mkdir(parents=True, exist_ok=True)
    for i, body in enumerate(docs):
        (args.out / f"doc{i:04d}.txt").write_text(body)
    print(f"plain corpus: {len(docs)} documents, {sum(map(len, docs)) / 1e6:.1f}M characters")


if __name__ == "__main__":
    main()
