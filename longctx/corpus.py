"""The embedded corpus: real long documents found on any machine, plus passkey documents.

The Python standard library's own sources are long, varied, human-written text and exist
wherever Python does, so the demo and the tests need no download: one document per module
file, or one per package (its files joined: 10K to 5M tokens, documents as long as a
long-context target). Passkey episodes add a retrieval signal: a number stated at a random
depth of training text, asked for at the end, in the evaluation's own prompt. Held out of
training: the English prose of Python's own documentation topics (`pydoc_data`), which the
evaluations read.
"""

from __future__ import annotations

import math
import random
import sysconfig
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import numpy as np

from longctx.config import ConfigError
from longctx.passkey import build_prompt, minimum_length, needles, task_frame

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


def stdlib_sources(max_files: int | None = None) -> Iterator[dict]:
    """Python sources of this interpreter's standard library, in a fixed order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.glob("*.py") if p.is_file())
    for path in files[:max_files]:
        text = path.read_text(encoding="utf-8", errors="replace")
        if text.strip():
            yield {"text": text, "source": f"stdlib/{path.name}"}


HELD_OUT = "pydoc_data"  # never a training document: evaluation text
# machine-made tables (the `encodings` codecs' character maps): near-zero loss, nothing to learn
NOT_PROSE_OR_CODE = {"encodings"}


def stdlib_packages(max_packages: int | None = None) -> Iterator[dict]:
    """One document per standard-library package, its modules joined in path order, each under a header line."""
    root = Path(sysconfig.get_paths()["stdlib"])
    packages = sorted(p for p in root.iterdir() if (p / "__init__.py").is_file() and p.name != HELD_OUT
                      and p.name not in NOT_PROSE_OR_CODE)
    for package in packages[:max_packages]:
        parts = [f"# {path.relative_to(root)}\n{path.read_text(encoding='utf-8', errors='replace')}"
                 for path in sorted(package.rglob("*.py"))]
        yield {"text": "\n\n".join(parts), "source": f"stdlib/{package.name}"}


def held_out_prose() -> list[str]:
    """English prose no training document holds: the topics of Python's documentation, as `help()` shows them."""
    from pydoc_data.topics import topics

    return [topics[name] for name in sorted(topics)]


def check_episode_room(tokenizer: PreTrainedTokenizerBase, seq_len: int) -> int:
    """The fewest tokens a passkey episode takes with this tokenizer; refuses a window shorter than that."""
    shortest = minimum_length(tokenizer, 1, "one") + 8  # + room for the longest key's answer tokens
    if seq_len < shortest:
        raise ConfigError(f"data.seq_len={seq_len}: a passkey episode needs at least {shortest} tokens "
                          f"(or data.passkey_documents=0)")
    return shortest


def passkey_episodes(tokenizer: PreTrainedTokenizerBase, haystack: np.ndarray, count: int, seq_len: int,
                     max_tokens: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """At least `count` passkey episodes filling whole windows of `seq_len`: (token ids, loss mask, lengths).

    An episode is the evaluation's passkey prompt (`longctx.passkey`: instruction, haystack with the key at some
    depth, question, the answer opened in the model's chat template) followed by the key: only the key and the end
    of the turn carry loss, so a window of episodes trains retrieval alone, at full strength. The haystack is
    training text (`haystack`, token ids), never the evaluations' prose. Lengths are drawn log-uniform from 1/32 of
    `max_tokens` to twice it and clipped to it, and a draw that would leave the window less room than the shortest
    episode takes all of it: no episode is cut by a window boundary, and long episodes are common, so the farthest
    keys, the hardest, are not left to a thin tail. Depths follow the arcsine law, dense at both ends, where a key sits
    farthest from the question or right beside the instruction."""
    rng = random.Random(seed)
    head, tail, _ = task_frame(tokenizer, 1, "one")
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    shortest = check_episode_room(tokenizer, seq_len)
    longest = min(max_tokens or seq_len, seq_len)
    low = max(shortest, longest // 32)
    haystack = np.resize(haystack, max(len(haystack), seq_len))  # a small corpus repeats
    ids, mask, lengths, total = [], [], [], 0
    while len(lengths) < count or total % seq_len:
        left = seq_len - total % seq_len
        length = min(longest, round(math.exp(rng.uniform(math.log(low), math.log(2 * max(low, longest))))))
        if length > left - low:  # what would be left is shorter than any episode: take it all
            length = left
        key = str(rng.randint(10000, 99999))
        answer = tokenizer(f" {key}.", add_special_tokens=False)["input_ids"] + eos
        start = rng.randint(0, len(haystack) - length)
        prompt = build_prompt(tokenizer, haystack[start:start + length].tolist(), length - len(answer),
                              math.sin(math.pi / 2 * rng.random()) ** 2, needles([key], "one").texts, head, tail, rng)
        ids.append(np.asarray(prompt + answer, dtype=np.int64))
        mask.append(np.repeat([False, True], [len(prompt), len(answer)]))
        lengths.append(length)
        total += length
    return np.concatenate(ids), np.concatenate(mask), np.asarray(lengths, dtype=np.int64)


def embedded_corpus(max_documents: int | None = None, unit: str = "files") -> list[dict]:
    """At most `max_documents` standard-library documents: one per module file, or one per package."""
    return list(stdlib_sources(max_documents) if unit == "files" else stdlib_packages(max_documents))
