"""Needle in a haystack / passkey retrieval over a length x depth grid, exact match of greedy output.

Variants: one needle (the passkey); several needles with different owners, retrieve one
(multi-key); several pass keys, retrieve all (multi-value).
"""

from __future__ import annotations

import random

import numpy as np
from tqdm import tqdm

from longctx.evaluation.common import Generate

OWNERS = ["red", "blue", "green", "amber", "violet", "silver", "orange", "black"]


def needles(keys: list[str], retrieve: str) -> tuple[list[str], str, list[str]]:
    """(needle sentences, question, answers)."""
    if len(keys) == 1:
        k = keys[0]
        return [f" The pass key is {k}. Remember it. {k} is the pass key. "], " What is the pass key? The pass key is", [k]
    if retrieve == "one":
        texts = [f" The pass key of the {o} door is {k}. " for o, k in zip(OWNERS, keys)]
        return texts, f" What is the pass key of the {OWNERS[0]} door? The pass key of the {OWNERS[0]} door is", [keys[0]]
    texts = [f" One of the pass keys is {k}. " for k in keys]
    return texts, " List every pass key. The pass keys are", keys


def build_prompt(tokenizer, filler: list[int], length: int, depth: float, texts: list[str], question: str,
                 rng: random.Random) -> list[int]:
    """Filler tokens with the needles inserted (the first at `depth`, others at random depths), then the question."""
    needle_ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    q_ids = tokenizer(question, add_special_tokens=False)["input_ids"]
    budget = length - len(q_ids) - sum(map(len, needle_ids))
    if budget < 1:
        raise ValueError(f"length {length} is too short for the needles and the question")
    hay = list(filler[:budget])
    places = [round(depth * budget)] + [rng.randint(0, budget) for _ in needle_ids[1:]]
    for place, ids in sorted(zip(places, needle_ids), key=lambda p: -p[0]):  # from the back: places stay valid
        hay[place:place] = ids
    return hay + q_ids


def score(generated: str, answers: list[str]) -> float:
    """Exact match: the first answer must open the output; for several, every one must appear."""
    text = generated.strip()
    if len(answers) == 1:
        return float(text.startswith(answers[0]))
    return float(all(a in text for a in answers))


def needle_grid(generate: Generate, tokenizer, filler: list[int], lengths: list[int], depths: list[float],
                trials: int = 2, n_needles: int = 1, retrieve: str = "one", seed: int = 0) -> dict:
    rng = random.Random(seed)
    scores = np.zeros((len(depths), len(lengths)))
    cells = []
    with tqdm(total=len(lengths) * len(depths) * trials, desc="needle") as bar:
        for j, length in enumerate(lengths):
            for i, depth in enumerate(depths):
                hits = []
                for _ in range(trials):
                    keys = [str(rng.randint(10000, 99999)) for _ in range(n_needles)]
                    texts, question, answers = needles(keys, retrieve)
                    prompt = build_prompt(tokenizer, filler, length, depth, texts, question, rng)
                    out = tokenizer.decode(generate(prompt, 4 + 6 * len(answers)), skip_special_tokens=True)
                    hits.append(score(out, answers))
                    cells.append({"length": length, "depth": depth, "answers": answers, "output": out, "hit": hits[-1]})
                    bar.update(1)
                scores[i, j] = sum(hits) / trials
    return {"lengths": lengths, "depths": depths, "trials": trials, "needles": n_needles, "retrieve": retrieve,
            "scores": scores.tolist(), "mean": float(scores.mean()), "cells": cells}
