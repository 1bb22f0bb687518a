"""The embedded corpus: real long documents found on any machine, plus passkey documents.

The Python standard library's own sources are long, varied, human-written text and exist
wherever Python does, so the demo and the tests need no download: one document per module
file, or one per package (its files joined: 10K to 5M tokens, documents as long as a
long-context target). Passkey documents add a retrieval signal: a number stated at a random
depth, asked for at the end. Held out of training: the English prose of Python's own
documentation topics (`pydoc_data`), which the evaluations read.
"""

from __future__ import annotations

import random
import sysconfig
from pathlib import Path
from typing import Iterator

FILLER = (
    "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
)


def stdlib_sources(max_files: int | None = None) -> Iterator[dict]:
    """Python sources of this interpreter's standard library, in a fixed order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.glob("*.py") if p.is_file())
    for path in files[:max_files]:
        text = path.read_text(encoding="utf-8", errors="replace")
        if text.strip():
            yield {"text": text, "source": f"stdlib/{path.name}"}


HELD_OUT = "pydoc_data"  # never a training document: evaluation text
FILLER_CHARS_PER_TOKEN = 4  # about, for FILLER under common BPE tokenizers: sizes passkey documents


def stdlib_packages(max_packages: int | None = None) -> Iterator[dict]:
    """One document per standard-library package, its modules joined in path order, each under a header line."""
    root = Path(sysconfig.get_paths()["stdlib"])
    packages = sorted(p for p in root.iterdir() if (p / "__init__.py").is_file() and p.name != HELD_OUT)
    for package in packages[:max_packages]:
        parts = [f"# {path.relative_to(root)}\n{path.read_text(encoding='utf-8', errors='replace')}"
                 for path in sorted(package.rglob("*.py"))]
        yield {"text": "\n\n".join(parts), "source": f"stdlib/{package.name}"}


def held_out_prose() -> list[str]:
    """English prose no training document holds: the topics of Python's documentation, as `help()` shows them."""
    from pydoc_data.topics import topics

    return [topics[name] for name in sorted(topics)]


def passkey_document(rng: random.Random, n_filler: int) -> tuple[str, str]:
    """A filler text hiding `The pass key is N.` at a random depth, framed as the passkey evaluation asks
    (what to find before the text, the question after it); returns (text, key)."""
    key = str(rng.randint(10000, 99999))
    before = rng.randint(0, n_filler)
    needle = f"The pass key is {key}. Remember it. {key} is the pass key. "
    body = FILLER * before + needle + FILLER * (n_filler - before)
    return (f"There is a pass key hidden in the following text. Find it and memorize it. I will quiz you about "
            f"the pass key.\n\n{body}\n\nWhat is the pass key? The pass key is {key}."), key


def passkey_documents(count: int, seed: int = 0, tokens: int = 0) -> Iterator[dict]:
    """`count` passkey documents of a quarter of `tokens` up to about all of it, so keys are asked for from every
    distance (`tokens` 0: short ones, 200 to 1,400 tokens)."""
    rng = random.Random(seed)
    per_filler = len(FILLER) // FILLER_CHARS_PER_TOKEN
    for i in range(count):
        n_filler = rng.randint(tokens // 4, tokens * 15 // 16) // per_filler if tokens else rng.randint(8, 64)
        text, _ = passkey_document(rng, n_filler=n_filler)
        yield {"text": text, "source": f"passkey/{i}"}


def embedded_corpus(passkeys: int, seed: int = 0, max_documents: int | None = None, unit: str = "files",
                    passkey_tokens: int = 0) -> list[dict]:
    """At most `max_documents` standard-library documents (one per module file, or one per package), then
    `passkeys` passkey documents of about `passkey_tokens` tokens."""
    sources = stdlib_sources(max_documents) if unit == "files" else stdlib_packages(max_documents)
    return list(sources) + list(passkey_documents(passkeys, seed, passkey_tokens))
