"""Perplexity against context length: each document's first L tokens, loss on the window's last tokens."""

from __future__ import annotations

import math

import torch
from tqdm import tqdm

from longctx.loss import IGNORE_INDEX, causal_lm_loss


def window_nll(model, ids: list[int], score_last: int) -> tuple[float, int]:
    """(sum of NLL, tokens scored) of one window; only the last `score_last` predictions count (0 = all)."""
    device = next(model.parameters()).device
    x = torch.tensor([ids], device=device)
    labels = torch.full_like(x, IGNORE_INDEX)
    labels[0, :-1] = x[0, 1:]
    if score_last:
        labels[0, : max(0, len(ids) - 1 - score_last)] = IGNORE_INDEX
    with torch.no_grad():
        total, count = causal_lm_loss(model, x, torch.arange(len(ids), device=device)[None], labels)
    return total.item(), int(count)


def perplexity_by_length(model, documents: list[list[int]], lengths: list[int], score_last: int = 0,
                         max_documents: int = 8) -> list[dict]:
    rows = []
    for length in lengths:
        usable = [d[:length] for d in documents if len(d) >= length][:max_documents]
        nll, count = 0.0, 0
        for ids in tqdm(usable, desc=f"ppl @ {length}", leave=False):
            s, n = window_nll(model, ids, score_last)
            nll, count = nll + s, count + n
        rows.append({"length": length, "documents": len(usable), "tokens_scored": count,
                     "nll": nll / count if count else None, "ppl": math.exp(nll / count) if count else None})
    return rows
