"""Lost in the middle: k passages, one holds the answer; accuracy by where that passage sits.

A retriever ranks the passages; the sweep moves the relevant one through every rank. Without
reordering (`none`) passages appear in rank order, so rank = position and the sweep shows
the U-shaped curve. The mitigations place passages by rank so the best ranked land where
models look: `first-last` alternates them between the two ends, `reverse` puts the best
last, next to the question. Each strategy sees the same passages (same seed): paired runs.
"""

from __future__ import annotations

import random
from typing import TYPE_CHECKING

from tqdm import tqdm

from longctx.chunking import reorder
from longctx.evaluation.common import Generate, first_numbers_match
from longctx.passkey import bos

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

NAMES = ["Ada", "Bo", "Cy", "Di", "Ed", "Flo", "Gus", "Hal", "Ivy", "Jo", "Kit", "Lu", "Max", "Ned", "Oz", "Pip",
         "Quin", "Rex", "Sol", "Tam"]
MAX_PASSAGES = len(NAMES)


def passages(k: int, rng: random.Random, filler_words: list[str], words: int) -> tuple[list[str], str, str]:
    """k passages of filler, each stating one person's code; returns (passages, question, answer of passage 0)."""
    names = rng.sample(NAMES, k)
    codes = [str(c) for c in rng.sample(range(1000, 10000), k)]
    out = []
    for name, code in zip(names, codes):
        start = rng.randint(0, max(0, len(filler_words) - words))
        out.append(" ".join(filler_words[start:start + words]) + f" The code of {name} is {code}.")
    return out, f" What is the code of {names[0]}? The code of {names[0]} is", codes[0]


def positions_by_rank(k: int, strategy: str) -> list[int]:
    """Where each retriever rank lands in the prompt under a strategy."""
    order = reorder(list(range(k)), strategy)
    return [order.index(rank) for rank in range(k)]


def rank_sweep(generate: Generate, tokenizer: PreTrainedTokenizerBase, filler: str, k: int = 6, trials: int = 2,
               words: int = 40, strategy: str = "none", seed: int = 0) -> dict:
    """Accuracy with the relevant passage at each retriever rank (and so at each prompt position)."""
    rng = random.Random(seed)
    filler_words = filler.split()
    positions = positions_by_rank(k, strategy)
    accuracy = []
    for rank in tqdm(range(k), desc=f"middle ({strategy})"):
        prompts, answers = [], []
        for _ in range(trials):
            texts, question, answer = passages(k, rng, filler_words, words)
            ranked = texts[1:rank + 1] + [texts[0]] + texts[rank + 1:]
            prompt = "".join(f"Passage {i + 1}: {t}\n" for i, t in enumerate(reorder(ranked, strategy))) + question
            prompts.append(bos(tokenizer) + tokenizer(prompt, add_special_tokens=False)["input_ids"])
            answers.append(answer)
        outputs = generate(prompts, 6)
        texts_out = [tokenizer.decode(o, skip_special_tokens=True) for o in outputs]
        accuracy.append(sum(first_numbers_match(t, [a]) for t, a in zip(texts_out, answers)) / trials)
    by_position = [0.0] * k
    for rank, position in enumerate(positions):
        by_position[position] = accuracy[rank]  # a strategy is a permutation: each position holds one rank
    return {"k": k, "trials": trials, "words": words, "strategy": strategy, "accuracy_by_rank": accuracy,
            "position_by_rank": positions, "accuracy_by_position": by_position}
