"""Flash attention in Triton: forward and backward, causal or not, GQA, packed documents.

One kernel family serves both entry points: `flash_attn_varlen_func` takes packed tokens (total, heads, dim) with
cumulative sequence lengths; `flash_attn_func` (batch, seq, heads, dim) is the varlen case with equal lengths.
Grouped-query attention reads each k/v head for its group of query heads; k and v are never repeated in memory.
Causal masking aligns the last query with the last key (as the flash-attn package does when lengths differ).

- `triton_kernels`: the Triton forward and backward kernels, their tiles and launches;
- `hopper`: on Hopper, the backward of bf16 inputs of head dim 64 or 128 in Gluon kernels instead (the same
  arithmetic, warp-specialised), imported only there;
- `host`: the entry points and their autograd.
"""

from .host import flash_attn_func, flash_attn_varlen_func, reference_attention, uses_hopper_backward

__all__ = ["flash_attn_func", "flash_attn_varlen_func", "reference_attention", "uses_hopper_backward"]
