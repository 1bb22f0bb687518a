"""The attention our patched models call, registered through transformers' attention interface.

Packed documents are read from `position_ids`: a position 0 starts a document (so does each
row), and no token attends across a document boundary. A caller that already knows the
boundaries (a flattening collator) may pass transformers' own `cu_seq_lens_q` /
`max_length_q` keywords instead; sequence parallelism passes the gathered position_ids. Our mask function builds no mask, so
transformers never materialises (seq x seq); each backend keeps documents apart itself:

    triton  our flash attention (kernels/flash_attn/), varlen over the documents
    sdpa    torch scaled_dot_product_attention, one call per document when packed
            (block-diagonal: exact, memory linear in the sequence)
    flex    torch FlexAttention with a document block mask (compiled on CUDA; on CPU torch
            runs it unfused and has no backward)
    eager   the plain-torch reference (explicit mask), for tests
    auto    per call: on CUDA, triton for packed batches and sdpa with cuDNN first for one
            document per row; on CPU, sdpa (per document when packed). Each choice is logged once.

These backends are for training on packed, unpadded sequences: a padding mask is refused.
Registered with an S²-Attn group (attention.train_pattern=s2), a module in training mode attends
in shifted groups (longctx/s2_attention.py) through the same backend; in eval mode, fully.
"""

from __future__ import annotations

import functools
import logging
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.bias import causal_lower_right

from longctx.config import ATTENTION_BACKENDS, ConfigError
from longctx.kernels.flash_attn import flash_attn_varlen_func, reference_attention
from longctx.s2_attention import group_cuts, shifted_sparse_attention

if TYPE_CHECKING:
    from transformers import PretrainedConfig

log = logging.getLogger(__name__)

# What auto asks of SDPA for one document per row on CUDA: cuDNN measured fastest on H100, also
# with GQA (bench/attention.py); torch takes the next in line where cuDNN refuses a shape. The math
# backend is left out on purpose: it builds (seq x seq), so a shape no fused kernel takes raises.
AUTO_SDPA_ORDER = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]


@dataclass
class Documents:
    """Document boundaries of a (batch, seq) block flattened to batch * seq tokens."""

    cu_seqlens: torch.Tensor  # int32 [n_docs + 1], on the tokens' device
    lengths: list[int]  # on the host: the per-document backends slice by them

    @property
    def count(self) -> int:
        return len(self.lengths)

    @property
    def max_len(self) -> int:
        return max(self.lengths)

    def repeated(self, rows: int) -> Documents:
        """The same documents in each of `rows` rows (position_ids broadcast over the batch)."""
        lengths = self.lengths * rows
        cu = torch.tensor([0] + lengths, device=self.cu_seqlens.device).cumsum(0).to(torch.int32)
        return Documents(cu, lengths)

    def ids(self) -> torch.Tensor:
        """Document index of every token, [batch * seq]."""
        counts = torch.tensor(self.lengths, device=self.cu_seqlens.device)
        return torch.repeat_interleave(torch.arange(self.count, device=counts.device), counts)


def documents_from_cu_seqlens(cu_seqlens: torch.Tensor) -> Documents:
    cu = cu_seqlens.to(torch.int32)
    return Documents(cu, (cu[1:] - cu[:-1]).tolist())


# Every layer of one forward (and its checkpointed recompute) asks about the same position_ids
# tensor: the answer is kept for that tensor, at that version, so the host sync happens once.
# (Under sequence parallelism each layer gathers a new tensor, and pays the sync itself.)
_memo: tuple[torch.Tensor, int, Documents] | None = None


def documents(position_ids: torch.Tensor) -> Documents:
    """Documents of a packed batch: a document starts at each position 0 and at each row start."""
    global _memo
    if _memo is not None and _memo[0] is position_ids and _memo[1] == position_ids._version:
        return _memo[2]
    flat = position_ids.reshape(-1)
    starts = flat == 0
    starts[:: position_ids.shape[-1]] = True
    begin = torch.nonzero(starts).flatten()
    docs = documents_from_cu_seqlens(torch.cat([begin, begin.new_tensor([flat.numel()])]))
    _memo = (position_ids, position_ids._version, docs)
    return docs


def _triton(q, k, v, docs: Documents | None, scale: float) -> torch.Tensor:
    b, s, h, d = q.shape
    t = k.shape[1]
    if docs is None:  # one sequence per row (or queries against a longer cache)
        cu_q = torch.arange(0, (b + 1) * s, s, device=q.device, dtype=torch.int32)
        cu_k = torch.arange(0, (b + 1) * t, t, device=q.device, dtype=torch.int32)
        max_q, max_k = s, t
    else:
        cu_q = cu_k = docs.cu_seqlens
        max_q = max_k = docs.max_len
    out = flash_attn_varlen_func(q.reshape(b * s, h, d), k.flatten(0, 1), v.flatten(0, 1), cu_q, cu_k, max_q, max_k,
                                 causal=True, softmax_scale=scale)
    return out.view(b, s, h, d)


def _sdpa_causal(q, k, v, scale: float) -> torch.Tensor:
    """(batch, heads, seq, dim); the last query sees the last key, as in our kernel."""
    s, t = q.shape[-2], k.shape[-2]
    gqa = q.shape[1] != k.shape[1]
    if s == t:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=gqa)
    mask = None if s == 1 else causal_lower_right(s, t)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=gqa)


def _sdpa(q, k, v, docs: Documents | None, scale: float) -> torch.Tensor:
    if docs is None:
        return _sdpa_causal(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale).transpose(1, 2)
    b, s, h, d = q.shape
    qf, kf, vf = q.reshape(b * s, h, d), k.flatten(0, 1), v.flatten(0, 1)
    outs, start = [], 0
    for n in docs.lengths:  # documents never cross rows, so the flat slices are whole documents
        sl = slice(start, start + n)
        outs.append(_sdpa_causal(qf[sl].transpose(0, 1)[None], kf[sl].transpose(0, 1)[None],
                                 vf[sl].transpose(0, 1)[None], scale)[0].transpose(0, 1))
        start += n
    return torch.cat(outs).view(b, s, h, d)


@functools.cache
def _flex_fn(device_type: str):
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False) if device_type == "cuda" else flex_attention


def _flex(q, k, v, docs: Documents | None, scale: float) -> torch.Tensor:
    from torch.nn.attention.flex_attention import create_block_mask

    b, s = q.shape[:2]
    if k.shape[1] != s:
        raise ValueError("attention.backend=flex runs training-shaped calls only (as many keys as queries)")
    ids = (docs.ids() if docs is not None else torch.arange(b, device=q.device).repeat_interleave(s)).view(b, s)

    def document_causal(batch, head, qi, ki):
        return (ids[batch, qi] == ids[batch, ki]) & (qi >= ki)

    block_mask = create_block_mask(document_causal, b, None, s, s, device=q.device)
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    out = _flex_fn(q.device.type)(qt, kt, vt, block_mask=block_mask, scale=scale, enable_gqa=qt.shape[1] != kt.shape[1])
    return out.transpose(1, 2)


def _eager(q, k, v, docs: Documents | None, scale: float) -> torch.Tensor:
    b, s, h, d = q.shape
    if docs is None:
        cu_q = torch.arange(0, (b + 1) * s, s, device=q.device)
        cu_k = torch.arange(0, (b + 1) * k.shape[1], k.shape[1], device=q.device)
    else:
        cu_q = cu_k = docs.cu_seqlens
    out = reference_attention(q.reshape(b * s, h, d), k.flatten(0, 1), v.flatten(0, 1), cu_q, cu_k, True, scale)
    return out.view(b, s, h, d)


def _auto_sdpa(q, k, v, docs: Documents | None, scale: float) -> torch.Tensor:
    with sdpa_kernel(AUTO_SDPA_ORDER, set_priority=True):
        return _sdpa(q, k, v, docs, scale)


BACKEND_FUNCTIONS = {"triton": _triton, "sdpa": _sdpa, "flex": _flex, "eager": _eager}


HALF = (torch.bfloat16, torch.float16)


def auto_choice(device: torch.device, packed: bool, dtype: torch.dtype) -> str:
    """The backend auto runs for a batch on `device`; packed: several documents in a row."""
    if device.type == "cuda":
        # SDPA's fused kernels take GQA in half precision only; ours takes every dtype
        return "sdpa (cuDNN first)" if not packed and dtype in HALF else "triton"
    return "sdpa per document" if packed else "sdpa"


@functools.cache
def log_auto_choice(device_type: str, packed: bool, dtype: torch.dtype) -> None:
    """One log line per (device, packed, dtype) for the whole process; cache_clear() to hear it again."""
    kind = "packed documents" if packed else "one document per row"
    log.info("attention.backend=auto: %s for %s on %s (%s)", auto_choice(torch.device(device_type), packed, dtype),
             kind, device_type, str(dtype).removeprefix("torch."))


AUTO_RUNS = {"triton": _triton, "sdpa (cuDNN first)": _auto_sdpa, "sdpa per document": _sdpa, "sdpa": _sdpa}


def _auto(q, k, v, docs: Documents | None, scale: float) -> torch.Tensor:
    packed = docs is not None
    log_auto_choice(q.device.type, packed, q.dtype)
    return AUTO_RUNS[auto_choice(q.device, packed, q.dtype)](q, k, v, docs, scale)


# S²-Attn groups of the plain and the shifted half, kept for the Documents object they were cut from (the same
# object for every layer of a forward and its recompute, see `documents`): the host sync happens once.
_s2_memo: tuple[Documents, tuple, tuple[Documents, Documents]] | None = None


def _s2_groups(docs: Documents, batch: int, seq: int, group: int, device: torch.device) -> tuple[Documents, Documents]:
    """The groups the plain and the shifted half of the heads attend in, as documents (longctx/s2_attention.py)."""
    global _s2_memo
    shape = (batch, seq, group, device)
    if _s2_memo is not None and _s2_memo[0] is docs and _s2_memo[1] == shape:
        return _s2_memo[2]
    starts = torch.zeros(batch * seq, dtype=torch.bool, device=device)
    starts[docs.cu_seqlens[:-1].long()] = True
    halves = tuple(documents_from_cu_seqlens(group_cuts(starts.view(batch, seq), group, shifted))
                   for shifted in (False, True))
    _s2_memo = (docs, shape, halves)
    return halves


def attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                      position_ids: torch.Tensor | None = None, cu_seq_lens_q: torch.Tensor | None = None,
                      backend: str = "auto", s2_group: int = 0, head_range: tuple[int, int] | None = None,
                      **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' attention signature: q/k/v (batch, heads, seq, dim) -> ((batch, seq, heads, dim), None).

    Documents come from `cu_seq_lens_q` (cumulative lengths over the flattened batch) when given,
    else from `position_ids`; with neither, each row is one sequence. With `s2_group`, a module in training
    mode runs S²-Attn in groups of that many tokens; `head_range` (first, total) says which of the model's
    heads these are (a Ulysses rank's share), for S²-Attn to know which to shift.
    """
    if attention_mask is not None:
        raise ValueError("longctx attention takes no attention mask: pack documents (position_ids restart at 0) "
                         "instead of padding them")
    if dropout and module.training:
        raise ValueError("longctx attention has no attention dropout; set the model's attention_dropout to 0")
    window = kwargs.get("sliding_window")
    if window is not None and window < key.shape[2]:
        raise ValueError(f"longctx attention is full causal, but this layer attends within a sliding window of {window} "
                         f"tokens over {key.shape[2]}; set the model config's sliding_window to null to train it so")
    q, k, v = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)
    scale = scaling if scaling is not None else q.shape[-1] ** -0.5
    docs = None
    if q.shape[1] == k.shape[1]:  # with a cache (queries shorter than keys) there is one document per row
        if cu_seq_lens_q is not None:
            docs = documents_from_cu_seqlens(cu_seq_lens_q)
        elif position_ids is not None:
            docs = documents(position_ids)
            if position_ids.shape[0] != q.shape[0]:
                docs = docs.repeated(q.shape[0] // position_ids.shape[0])
        if docs is not None and docs.count <= q.shape[0]:
            docs = None  # one document per row needs no document mask
    run = _auto if backend == "auto" else BACKEND_FUNCTIONS[backend]
    if s2_group and module.training:
        if docs is None:  # one document per row: both halves' groups are equal, rows of their own (SDPA takes them)
            def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rolled: bool) -> torch.Tensor:
                rows = (q.shape[0] * q.shape[1] // s2_group, s2_group)
                return run(*(x.reshape(*rows, *x.shape[2:]) for x in (q, k, v)), None, scale).reshape(q.shape)
        else:
            plain, shifted = _s2_groups(docs, q.shape[0], q.shape[1], s2_group, q.device)

            def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rolled: bool) -> torch.Tensor:
                return run(q, k, v, shifted if rolled else plain, scale)

        return shifted_sparse_attention(q, k, v, s2_group, attend, head_range), None
    return run(q, k, v, docs, scale), None


def sliding_window(config: PretrainedConfig) -> int | None:
    """The window of a model whose layers attend only to the last `sliding_window` keys (Mistral; Qwen2 with
    use_sliding_window), or None: full causal attention."""
    text = config.get_text_config()
    window = getattr(text, "sliding_window", None)
    layer_types = getattr(text, "layer_types", None)
    if window is None or (layer_types is not None and "sliding_attention" not in layer_types):
        return None
    return int(window)


def no_mask(*args, attention_mask=None, **kwargs) -> None:
    """transformers' mask hook for our names: documents come from position_ids, padding is refused."""
    if attention_mask is not None and not bool(attention_mask.all()):
        raise ValueError("longctx attention does not take padded batches: pack documents (position_ids restart at 0)")
    return None


def _refuse_unsupported(backend: str, device: torch.device, training: bool) -> None:
    if device.type == "cuda":
        return
    if backend == "flex" and training:
        raise ConfigError(f"attention.backend=flex: torch's FlexAttention trains only on CUDA (no backward on "
                          f"{device.type}); use auto, sdpa or eager")
    if backend == "triton" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ConfigError(f"attention.backend=triton needs a CUDA GPU (device is {device}); on CPU use auto or sdpa "
                         "(TRITON_INTERPRET=1 runs the kernels in Triton's interpreter, for tests)")
    if device.type != "cpu" and backend != "eager":
        raise ConfigError(f"attention.backend={backend}: no backend but eager is built for device {device}")


def attention_implementation(backend: str, device: torch.device | str | None = None, training: bool = False,
                             s2_group: int = 0) -> str:
    """Register `longctx_<backend>` (`longctx_<backend>_s2g<group>` with an S²-Attn group for training) with
    transformers and return the name for set_attn_implementation.

    With `device`, a backend that cannot run there (or cannot train there, with `training`) is refused now,
    before any model is built.
    """
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    if backend not in ATTENTION_BACKENDS:
        raise ConfigError(f"attention.backend={backend!r}: must be one of {'|'.join(ATTENTION_BACKENDS)}")
    if device is not None:
        _refuse_unsupported(backend, torch.device(device), training)
    name = f"longctx_{backend}" + (f"_s2g{s2_group}" if s2_group else "")
    AttentionInterface.register(name, functools.partial(attention_forward, backend=backend, s2_group=s2_group))
    AttentionMaskInterface.register(name, no_mask)
    return name
