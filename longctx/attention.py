"""The attention our patched models call, registered through transformers' attention interface.

Packed documents are read from `position_ids`: a position 0 starts a document, and no token
attends across a document boundary. Our mask function builds no mask, so transformers never
materialises (seq x seq); each backend enforces documents itself:

    triton  our flash attention (kernels/flash_attn.py), varlen over the documents
    sdpa    torch scaled_dot_product_attention; packed batches use a dense document mask
    flex    torch FlexAttention with a document block mask
    eager   the plain-torch reference (explicit mask), for tests
    auto    per call: triton for packed batches on CUDA, sdpa for a single document per row
            (torch picks cuDNN/flash there); sdpa on CPU. The choice is logged once.

These backends are for training on packed, unpadded sequences: a padding mask is refused.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from longctx.kernels.flash_attn import flash_attn_varlen_func, reference_attention

log = logging.getLogger(__name__)

BACKENDS = ("auto", "triton", "sdpa", "flex", "eager")


@dataclass
class Documents:
    """Document boundaries of a (batch, seq) block flattened to batch * seq tokens."""

    cu_seqlens: torch.Tensor  # int32 [n_docs + 1]
    max_len: int
    ids: torch.Tensor  # document index of every token, [batch * seq]

    @property
    def count(self) -> int:
        return self.cu_seqlens.numel() - 1


_last: tuple[torch.Tensor, Documents] | None = None


def documents(position_ids: torch.Tensor) -> Documents:
    """Documents of a packed batch; every layer of one forward shares the answer."""
    global _last
    if _last is not None and _last[0] is position_ids:
        return _last[1]
    flat = position_ids.reshape(-1)
    starts = flat == 0
    starts[:: position_ids.shape[-1]] = True  # each row starts a document
    begin = torch.nonzero(starts).flatten()
    cu = torch.cat([begin, begin.new_tensor([flat.numel()])]).to(torch.int32)
    docs = Documents(cu, int((cu[1:] - cu[:-1]).max()), torch.cumsum(starts.int(), 0) - 1)
    _last = (position_ids, docs)
    return docs


def _triton(q, k, v, docs: Documents | None, scale: float) -> torch.Tensor:
    b, s, h, d = q.shape
    if docs is None:  # one sequence per row (or a decode step against a cache)
        cu_q = torch.arange(0, (b + 1) * s, s, device=q.device, dtype=torch.int32)
        cu_k = torch.arange(0, (b + 1) * k.shape[1], k.shape[1], device=q.device, dtype=torch.int32)
        out = flash_attn_varlen_func(q.reshape(b * s, h, d), k.flatten(0, 1), v.flatten(0, 1), cu_q, cu_k, s, k.shape[1],
                                     causal=True, softmax_scale=scale)
    else:
        out = flash_attn_varlen_func(q.reshape(b * s, h, d), k.flatten(0, 1), v.flatten(0, 1), docs.cu_seqlens,
                                     docs.cu_seqlens, docs.max_len, docs.max_len, causal=True, softmax_scale=scale)
    return out.view(b, s, h, d)


def _document_mask(docs: Documents, b: int, s: int) -> torch.Tensor:
    ids = docs.ids.view(b, s)
    pos = torch.arange(s, device=ids.device)
    return (ids[:, :, None] == ids[:, None, :]) & (pos[:, None] >= pos[None, :])[None]


def _sdpa(q, k, v, docs: Documents | None, scale: float) -> torch.Tensor:
    b, s = q.shape[:2]
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    gqa = qt.shape[1] != kt.shape[1]
    if docs is None:
        out = F.scaled_dot_product_attention(qt, kt, vt, is_causal=s == k.shape[1], scale=scale, enable_gqa=gqa)
    else:
        mask = _document_mask(docs, b, s)[:, None]
        out = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask, scale=scale, enable_gqa=gqa)
    return out.transpose(1, 2)


@functools.cache
def _flex_fn(device_type: str):
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False) if device_type == "cuda" else flex_attention


def _flex(q, k, v, docs: Documents | None, scale: float) -> torch.Tensor:
    from torch.nn.attention.flex_attention import create_block_mask

    b, s = q.shape[:2]
    ids = (docs.ids if docs is not None else torch.arange(b, device=q.device).repeat_interleave(s)).view(b, s)

    def document_causal(batch, head, qi, ki):
        return (ids[batch, qi] == ids[batch, ki]) & (qi >= ki)

    block_mask = create_block_mask(document_causal, b, None, s, s, device=q.device)
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    out = _flex_fn(q.device.type)(qt, kt, vt, block_mask=block_mask, scale=scale, enable_gqa=qt.shape[1] != kt.shape[1])
    return out.transpose(1, 2)


def _eager(q, k, v, docs: Documents | None, scale: float) -> torch.Tensor:
    b, s, h, d = q.shape
    if docs is None:
        cu = torch.arange(0, (b + 1) * s, s, device=q.device)
        cu_k = torch.arange(0, (b + 1) * k.shape[1], k.shape[1], device=q.device)
    else:
        cu = cu_k = docs.cu_seqlens
    out = reference_attention(q.reshape(b * s, h, d), k.flatten(0, 1), v.flatten(0, 1), cu, cu_k, True, scale)
    return out.view(b, s, h, d)


KERNELS = {"triton": _triton, "sdpa": _sdpa, "flex": _flex, "eager": _eager}


@functools.cache
def _log_auto_choice(device_type: str, packed: bool, choice: str) -> None:
    log.info("attention auto: %s for %s batches on %s", choice, "packed" if packed else "unpacked", device_type)


def _auto(q, k, v, docs: Documents | None, scale: float) -> torch.Tensor:
    packed = docs is not None
    choice = "triton" if q.is_cuda and packed else "sdpa"
    _log_auto_choice(q.device.type, packed, choice)
    return KERNELS[choice](q, k, v, docs, scale)


def attention_forward(backend: str, module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                      position_ids=None, **kwargs):
    """transformers' attention signature: q/k/v (batch, heads, seq, dim) -> ((batch, seq, heads, dim), None)."""
    if attention_mask is not None:
        raise ValueError("longctx attention takes no attention mask: pack documents (position_ids restart at 0) "
                         "instead of padding them")
    if dropout and module.training:
        raise ValueError("longctx attention has no attention dropout; set the model's attention_dropout to 0")
    q, k, v = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)
    scale = scaling if scaling is not None else q.shape[-1] ** -0.5
    docs = None
    if position_ids is not None and q.shape[1] == k.shape[1]:
        found = documents(position_ids)
        docs = found if found.count > q.shape[0] else None  # one document per row needs no document mask
    run = _auto if backend == "auto" else KERNELS[backend]
    return run(q, k, v, docs, scale), None


def no_mask(*args, attention_mask=None, **kwargs) -> None:
    """transformers' mask hook for our names: documents come from position_ids, padding is refused."""
    if attention_mask is not None and not bool(attention_mask.all()):
        raise ValueError("longctx attention does not take padded batches: pack documents (position_ids restart at 0)")
    return None


def attention_implementation(backend: str) -> str:
    """Register `longctx_<backend>` with transformers and return the name for set_attn_implementation."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    if backend not in BACKENDS:
        raise ValueError(f"attention.backend={backend!r}: must be one of {'|'.join(BACKENDS)}")
    name = f"longctx_{backend}"
    AttentionInterface.register(name, functools.partial(attention_forward, backend))
    AttentionMaskInterface.register(name, no_mask)
    return name
