"""Needle in a haystack / passkey retrieval over a length x depth grid, exact match of greedy output.

Variants: one needle (the passkey); several needles with different owners, retrieve one
(multi-key: the others are distractors); several pass keys, retrieve all (multi-value).
Every prompt of a length has exactly that many tokens, so a cell's trials run as one batch.
"""

from __future__ import annotations

import random
from typing import TYPE_CHECKING

import numpy as np
from tqdm import tqdm

from longctx.config import ConfigError
from longctx.evaluation.common import Generate, bos, first_numbers_match

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

OWNERS = ["red", "blue", "green", "amber", "violet", "silver", "orange", "black"]
MAX_NEEDLES = len(OWNERS)
KEY_SAMPLES = 64  # keys tried for the minimum length: its longest-tokenizing ones set it
MAX_DRAWS = 100  # key draws per trial before a length is called too short


def needles(keys: list[str], retrieve: str) -> tuple[list[str], str, list[str]]:
    """(needle sentences, question, answers); the first needle is the one placed at the cell's depth."""
    if len(keys) == 1:
        k = keys[0]
        question = " What is the pass key? The pass key is"
        return [f" The pass key is {k}. Remember it. {k} is the pass key. "], question, [k]
    if retrieve == "one":
        texts = [f" The pass key of the {o} door is {k}. " for o, k in zip(OWNERS, keys)]
        question = f" What is the pass key of the {OWNERS[0]} door? The pass key of the {OWNERS[0]} door is"
        return texts, question, [keys[0]]
    texts = [f" One of the pass keys is {k}. " for k in keys]
    return texts, " List every pass key. The pass keys are", keys


def _needle_tokens(tokenizer: PreTrainedTokenizerBase, keys: list[str], retrieve: str) -> int:
    texts, question, _ = needles(keys, retrieve)
    return sum(len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts + [question])


def minimum_length(tokenizer: PreTrainedTokenizerBase, n_needles: int, retrieve: str) -> int:
    """The shortest context that holds bos, the needles, the question and one filler token, for the keys of a fixed
    sample that take the most tokens (a key's tokens depend on its digits); `needle_grid` redraws the rare keys
    that take more."""
    rng = random.Random(0)
    samples = [[str(rng.randint(10000, 99999)) for _ in range(n_needles)] for _ in range(KEY_SAMPLES)]
    return len(bos(tokenizer)) + max(_needle_tokens(tokenizer, keys, retrieve) for keys in samples) + 1


def build_prompt(tokenizer: PreTrainedTokenizerBase, filler: list[int], length: int, depth: float, texts: list[str],
                 question: str, rng: random.Random) -> list[int]:
    """Exactly `length` tokens: bos, filler with the needles inserted (the first at `depth` of the filler, others
    at random depths), then the question. Needles go in at token boundaries of the filler, never inside a token."""
    needle_ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    q_ids = tokenizer(question, add_special_tokens=False)["input_ids"]
    start = bos(tokenizer)
    budget = length - len(start) - len(q_ids) - sum(map(len, needle_ids))
    if budget < 1:
        raise ValueError(f"length {length} is too short for the needles and the question")
    if len(filler) < budget:
        raise ValueError(f"the haystack has {len(filler)} tokens, {budget} needed")
    hay = list(filler[:budget])
    places = [round(depth * budget)] + [rng.randint(0, budget) for _ in needle_ids[1:]]
    for place, ids in sorted(zip(places, needle_ids), key=lambda p: -p[0]):  # from the back: places stay valid
        hay[place:place] = ids
    return start + hay + q_ids


def draw_keys(rng: random.Random, tokenizer: PreTrainedTokenizerBase, length: int, n_needles: int,
              retrieve: str) -> list[str]:
    """Distinct 5-digit keys whose needles and question leave `length` room for bos and one filler token."""
    for _ in range(MAX_DRAWS):
        keys = [str(k) for k in rng.sample(range(10000, 100000), n_needles)]
        if len(bos(tokenizer)) + _needle_tokens(tokenizer, keys, retrieve) + 1 <= length:
            return keys
    raise ConfigError(f"length {length}: {MAX_DRAWS} draws of keys found none whose needles fit; use lengths >= "
                      f"{minimum_length(tokenizer, n_needles, retrieve)}")


def needle_grid(generate: Generate, tokenizer: PreTrainedTokenizerBase, filler: list[int], lengths: list[int],
                depths: list[float], trials: int = 2, n_needles: int = 1, retrieve: str = "one", seed: int = 0) -> dict:
    """scores[depth][length]: the fraction of a cell's trials (each with new keys) answered exactly."""
    rng = random.Random(seed)
    scores = np.zeros((len(depths), len(lengths)))
    cells = []
    with tqdm(total=len(lengths) * len(depths) * trials, desc="needle") as bar:
        for j, length in enumerate(lengths):
            for i, depth in enumerate(depths):
                cases = []
                for _ in range(trials):
                    keys = draw_keys(rng, tokenizer, length, n_needles, retrieve)
                    texts, question, answers = needles(keys, retrieve)
                    cases.append((build_prompt(tokenizer, filler, length, depth, texts, question, rng), answers))
                # the answers as this tokenizer writes them (one token per digit for some), and two tokens more
                n_new = 2 + max(len(tokenizer(" " + ", ".join(answers), add_special_tokens=False)["input_ids"])
                                for _, answers in cases)
                outputs = generate([prompt for prompt, _ in cases], n_new)
                hits = []
                for (_, answers), out in zip(cases, outputs):
                    text = tokenizer.decode(out, skip_special_tokens=True)
                    hits.append(first_numbers_match(text, answers))
                    cells.append({"length": length, "depth": depth, "answers": answers, "output": text,
                                  "hit": hits[-1]})
                scores[i, j] = sum(hits) / trials
                bar.update(trials)
    return {"lengths": lengths, "depths": depths, "trials": trials, "needles": n_needles, "retrieve": retrieve,
            "scores": scores.tolist(), "mean": float(scores.mean()), "cells": cells}
