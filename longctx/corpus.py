"""The embedded corpus: real long documents found on any machine, plus passkey documents.

The Python standard library's own sources are long, varied, human-written text and exist
wherever Python does, so the demo and the tests need no download. Passkey documents add a
retrieval signal: a number stated at a random depth, asked for at the end.
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


def passkey_document(rng: random.Random, n_filler: int) -> tuple[str, str]:
    """A filler text hiding `The pass key is N.` at a random depth; returns (text, key)."""
    key = str(rng.randint(10000, 99999))
    before = rng.randint(0, n_filler)
    needle = f"The pass key is {key}. Remember it. {key} is the pass key. "
    body = FILLER * before + needle + FILLER * (n_filler - before)
    return f"{body}What is the pass key? The pass key is {key}.", key


def passkey_documents(count: int, seed: int = 0) -> Iterator[dict]:
    rng = random.Random(seed)
    for i in range(count):
        text, _ = passkey_document(rng, n_filler=rng.randint(8, 64))
        yield {"text": text, "source": f"passkey/{i}"}


def embedded_corpus(passkeys: int, seed: int = 0, max_files: int | None = None) -> list[dict]:
    """At most `max_files` standard-library sources, then `passkeys` passkey documents."""
    return list(stdlib_sources(max_files)) + list(passkey_documents(passkeys, seed))
