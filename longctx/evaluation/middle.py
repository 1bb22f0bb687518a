"""Lost in the middle: k passages, one holds the answer; accuracy by where that passage sits.

Reordering (the mitigation) takes the passages in a retriever's rank order, the relevant
one ranked first, and places them so the best ranked land where models look: `first-last`
alternates them between the two ends, `reverse` puts the best last, next to the question.
"""

from __future__ import annotations

import random

from tqdm import tqdm

from longctx.chunking import reorder
from longctx.evaluation.common import Generate


def passages(k: int, rng: random.Random, filler_words: list[str], words: int) -> tuple[list[str], str, str]:
    """k passages of filler, each stating one code; returns (passages, question, answer of passage 0)."""
    names = rng.sample(["Ada", "Bo", "Cy", "Di", "Ed", "Flo", "Gus", "Hal", "Ivy", "Jo", "Kit", "Lu", "Max", "Ned",
                        "Oz", "Pip", "Quin", "Rex", "Sol", "Tam"], k)
    codes = [str(rng.randint(1000, 9999)) for _ in range(k)]
    out = []
    for name, code in zip(names, codes):
        start = rng.randint(0, max(0, len(filler_words) - words))
        out.append(" ".join(filler_words[start:start + words]) + f" The code of {name} is {code}.")
    return out, f" What is the code of {names[0]}? The code of {names[0]} is", codes[0]


def position_sweep(generate: Generate, tokenizer, filler: str, k: int = 6, trials: int = 2, words: int = 40,
                   strategy: str = "none", seed: int = 0) -> dict:
    rng = random.Random(seed)
    filler_words = filler.split()
    accuracy = []
    for position in tqdm(range(k), desc=f"middle ({strategy})"):
        hits = 0
        for _ in range(trials):
            texts, question, answer = passages(k, rng, filler_words, words)
            ranked = [texts[0]] + texts[1:]  # retriever order: the relevant passage first
            if strategy == "none":
                order = ranked[1:position + 1] + [ranked[0]] + ranked[position + 1:]
            else:
                order = reorder(ranked, strategy)
            prompt = "".join(f"Passage {i + 1}: {t}\n" for i, t in enumerate(order)) + question
            ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
            out = tokenizer.decode(generate(ids, 6), skip_special_tokens=True)
            hits += out.strip().startswith(answer)
        accuracy.append(hits / trials)
    return {"k": k, "trials": trials, "strategy": strategy, "accuracy_by_position": accuracy}
