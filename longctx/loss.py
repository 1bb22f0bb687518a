"""Causal-LM loss without full logits: the output projection and cross-entropy run per chunk.

Labels arrive already shifted (labels[t] is the token that position t predicts, -100 where
nothing is predicted), so chunks and sequence-parallel shards need no neighbour's token.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100


def unwrap_causal_lm(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers causal LM inside a PEFT wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _chunk_loss(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    logits = F.linear(hidden, weight).float()
    return F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="sum")


def chunked_lm_loss(
    hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk_tokens: int
) -> torch.Tensor:
    """Sum of token losses; each chunk's logits are recomputed in backward, never kept."""
    hidden = hidden.reshape(-1, hidden.shape[-1])
    labels = labels.reshape(-1)
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, hidden.shape[0], chunk_tokens):
        end = start + chunk_tokens
        total = total + checkpoint(_chunk_loss, hidden[start:end], weight, labels[start:end], use_reentrant=False)
    return total


def causal_lm_loss(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    position_ids: torch.Tensor,
    labels: torch.Tensor,
    chunk_tokens: int = 4096,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of token losses, number of predicted tokens) for one micro-batch."""
    lm = unwrap_causal_lm(model)
    hidden = lm.get_decoder()(input_ids=input_ids, position_ids=position_ids, use_cache=False).last_hidden_state
    head = lm.get_output_embeddings()
    if head.bias is not None:
        raise ValueError("chunked loss supports bias-free output projections only")
    loss_sum = chunked_lm_loss(hidden, head.weight, labels, chunk_tokens)
    return loss_sum, (labels != IGNORE_INDEX).sum()
