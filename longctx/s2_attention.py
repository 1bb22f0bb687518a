"""LongLoRA's shifted sparse attention (S²-Attn, Chen et al., ICLR 2024), for training only.

Every head attends causally inside groups of G tokens; the second half of the heads sees the
sequence rolled by -G/2, so its groups straddle the first half's and information crosses group
borders from layer to layer. Attention costs O(n * G) instead of O(n^2).

It runs on any varlen attention: group-local attention is attention over "documents" that are the
groups, cut further at each real document start, so no group crosses a document. The shifted half
is rolled by -G/2 along the sequence, attends in equal groups of the rolled order, and its output is
rolled back by +G/2. q and k carry RoPE already (transformers applies it before the attention
function), so every token keeps its own position, as in the paper. The roll puts the last G/2 tokens
of a row in one group with its first G/2 (the paper's wrap-around: those first tokens see the
last ones); in a row of several documents that group is cut at the row start, as any group is at
a document boundary.

Heads are split by their index in the model: [0, H//2) plain, [H//2, H) shifted (as the paper's code splits
them: with an odd number of heads, such as SmolLM2's 9, the shifted part has one more). A GQA key/value
head goes with its query heads; one whose query heads straddle the middle (an odd number of kv
heads) is repeated so that each half reads its own copy. Under Ulysses sequence parallelism the
all-to-all gives each rank whole sequences for a consecutive share of the heads, so the roll runs
there on whole sequences, exactly as on one rank; the caller says which heads the rank holds.
"""

from __future__ import annotations

import math
from typing import Callable

import torch


def group_cuts(starts: torch.Tensor, group: int, shifted: bool) -> torch.Tensor:
    """cu_seqlens (int32) over the flattened (batch, seq) tokens, in the order a half attends them (rolled by
    -group/2 when `shifted`): groups of `group` tokens, cut at every document start. `starts` (batch, seq) is
    True at each document's first token, and at each row's first."""
    seq = starts.shape[1]
    if seq % group or group % 2:
        raise ValueError(f"S²-Attn: a sequence of {seq} tokens does not split into groups of {group} (an even "
                         f"divisor of the sequence length is needed)")
    cuts = starts.clone()
    if shifted:
        cuts[:, 0] = starts[:, 1:].any(1)  # the row start cuts the wrap-around group only between two documents
        cuts = cuts.roll(-(group // 2), 1)
    cuts[:, ::group] = True
    begin = torch.nonzero(cuts.flatten()).flatten()
    return torch.cat([begin, begin.new_tensor([cuts.numel()])]).to(torch.int32)


def kv_repeat(heads: int, kv_heads: int, plain: int) -> int:
    """How many copies of each kv head the halves need, the first `plain` query heads being one half: 1 unless a kv
    head serves query heads of both halves (then every kv head is repeated, so that each half keeps one kv head per
    equal number of its query heads)."""
    per_kv = heads // kv_heads
    return per_kv // math.gcd(per_kv, plain)


def roll_from(x: torch.Tensor, first: int, by: int) -> torch.Tensor:
    """x (batch, seq, heads, dim) in one new tensor, with heads [first:] rolled by `by` along the sequence."""
    return torch.cat([x[:, :, :first], x[:, :, first:].roll(by, 1)], 2)


def shifted_sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group: int,
                             attend: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, bool], torch.Tensor],
                             head_range: tuple[int, int] | None = None) -> torch.Tensor:
    """S²-Attn of q (batch, seq, heads, dim), k/v (batch, seq, kv_heads, dim) -> (batch, seq, heads, dim).

    `attend(q, k, v, shifted)` runs causal varlen attention over the groups `group_cuts(..., shifted)` gives.
    `head_range` (first, total): these are heads [first, first + heads) of the model's `total` (a Ulysses
    rank's share); default: all of them.
    """
    heads = q.shape[2]
    first, total = head_range or (0, heads)
    plain = min(max(total // 2 - first, 0), heads)  # this rank's heads below the model's middle
    half = group // 2
    repeat = kv_repeat(heads, k.shape[2], plain)
    if repeat > 1:
        k, v = k.repeat_interleave(repeat, 2), v.repeat_interleave(repeat, 2)
    kv_plain = plain * k.shape[2] // heads
    # one tensor per input with the shifted heads rolled in, each half attending as a view of it: the kernels keep
    # those views, so q, k and v are kept once, as full attention keeps them (views of the inputs would keep the
    # inputs whole, beside a rolled copy of their second half)
    q, k, v = roll_from(q, plain, -half), roll_from(k, kv_plain, -half), roll_from(v, kv_plain, -half)
    outs = []
    if plain:
        outs.append(attend(q[:, :, :plain], k[:, :, :kv_plain], v[:, :, :kv_plain], False))
    if plain < heads:
        outs.append(attend(q[:, :, plain:], k[:, :, kv_plain:], v[:, :, kv_plain:], True).roll(half, 1))
    return torch.cat(outs, 2)


def reference_s2_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, starts: torch.Tensor, group: int,
                           scale: float) -> torch.Tensor:
    """The paper's definition in plain torch, for tests (use float64): kv heads repeated to every query head; the
    heads [h//2, h) rolled by -group/2 along the sequence; causal attention inside each group of
    `group` tokens among the tokens of one document (`starts` (batch, seq): True where a document starts, and at
    each row start); the second half's output rolled back."""
    b, s, h, _ = q.shape
    per_kv = h // k.shape[2]
    k, v = k.repeat_interleave(per_kv, 2), v.repeat_interleave(per_kv, 2)
    document = starts.cumsum(1)
    # in a row of several documents the wrap-around group joins two ends of the row that are different text:
    # for the shifted half, the tokens that wrap (the row's first group/2) count as a document apart there
    wraps = (torch.arange(s, device=q.device) < group // 2) & (starts.sum(1, keepdim=True) > 1)
    halves = torch.tensor([h // 2, h - h // 2], device=q.device)
    document = torch.stack([document, document + s * wraps], 2).repeat_interleave(halves, 2)  # (batch, seq, heads)

    def roll_second_half(x: torch.Tensor, by: int) -> torch.Tensor:
        return torch.cat([x[:, :, : h // 2], x[:, :, h // 2 :].roll(by, 1)], 2)

    def grouped(x: torch.Tensor) -> torch.Tensor:  # (batch, groups, heads, group, ...)
        return x.unflatten(1, (s // group, group)).transpose(2, 3)

    q, k, v, document = (grouped(roll_second_half(x, -(group // 2))) for x in (q, k, v, document))
    causal = torch.ones(group, group, dtype=torch.bool, device=q.device).tril()
    visible = causal & (document[..., :, None] == document[..., None, :])
    probs = (q @ k.transpose(-1, -2) * scale).masked_fill(~visible, float("-inf")).softmax(-1)
    return roll_second_half((probs @ v).transpose(2, 3).flatten(1, 2), group // 2)
