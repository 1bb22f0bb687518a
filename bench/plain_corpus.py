"""Plain long documents, without passkey episodes, for a `data.path` run of the extension study.

    python bench/plain_corpus.py /root/plain        # then: bench/extension.py ... data.path=/root/plain

The sources of transformers' model packages (installed wherever longctx runs), joined in path order, each file
under its path as a header line, into documents of at least 320,000 characters (about 80K SmolLM2 tokens, longer
than the study's 64K windows), 40M characters in all: enough for 100 steps of 64K tokens without repeating a
window. One .txt file per document.
"""

from __future__ import annotations

import argparse
from pathlib import Path

DOCUMENT_CHARS = 320_000
TOTAL_CHARS = 40_000_000


def write_corpus(out: Path) -> tuple[int, int]:
    """Writes the documents under `out`; returns (documents, characters)."""
    import transformers

    out.mkdir(parents=True, exist_ok=True)
    root = Path(transformers.__file__).parent / "models"
    parts: list[str] = []
    size = documents = characters = 0
    for path in sorted(root.rglob("*.py")):
        parts.append(f"# {path.relative_to(root)}\n{path.read_text(encoding='utf-8', errors='replace')}")
        size += len(parts[-1])
        if size >= DOCUMENT_CHARS:
            body = "\n\n".join(parts)
            (out / f"doc{documents:04d}.txt").write_text(body)
            documents, characters, parts, size = documents + 1, characters + len(body), [], 0
            if characters >= TOTAL_CHARS:
                break
    return documents, characters


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", type=Path, help="folder for the .txt documents")
    documents, characters = write_corpus(p.parse_args().out)
    print(f"plain corpus: {documents} documents, {characters / 1e6:.1f}M characters")


if __name__ == "__main__":
    main()
