"""Needle in a haystack / passkey retrieval over a length x depth grid, exact match of greedy output.

Variants: one needle (the passkey); several needles with different owners, retrieve one
(multi-key: the others are distractors); several pass keys, retrieve all (multi-value).
Every prompt of a length has exactly that many tokens, so a cell's trials run as one batch. The task and
its prompt are `longctx.passkey`'s, which the training data's passkey episodes share.
"""

from __future__ import annotations

import random
from typing import TYPE_CHECKING

import numpy as np
from tqdm import tqdm

from longctx.evaluation.common import Generate, first_numbers_match
from longctx.passkey import build_prompt, draw_keys, needles, task_frame

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


def needle_grid(generate: Generate, tokenizer: PreTrainedTokenizerBase, filler: list[int], lengths: list[int],
                depths: list[float], trials: int = 2, n_needles: int = 1, retrieve: str = "one", seed: int = 0,
                chat_template: bool = True) -> dict:
    """scores[depth][length]: the fraction of a cell's trials (each with new keys) answered exactly."""
    rng = random.Random(seed)
    head, tail, how = task_frame(tokenizer, n_needles, retrieve, chat_template)
    scores = np.zeros((len(depths), len(lengths)))
    cells = []
    with tqdm(total=len(lengths) * len(depths) * trials, desc="needle") as bar:
        for j, length in enumerate(lengths):
            for i, depth in enumerate(depths):
                cases = []
                for _ in range(trials):
                    task = needles(draw_keys(rng, tokenizer, length, n_needles, retrieve, len(head) + len(tail)),
                                   retrieve)
                    cases.append((build_prompt(tokenizer, filler, length, depth, task.texts, head, tail, rng),
                                  task.answers))
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
            "prompt": how, "scores": scores.tolist(), "mean": float(scores.mean()), "cells": cells}
