"""Ulysses sequence parallelism: which tokens a rank holds, and the all-to-all around attention.

Each of the sp ranks of a group holds a consecutive 1/sp of every sequence. Everything but
attention works per token, so it runs on the shard. Inside attention DeepSpeed's
`UlyssesSPAttentionHF` all-to-alls q/k/v so that each rank holds every token for heads/sp of
the heads (key/value heads fewer than sp are repeated first), gathers the global position_ids
(our backends read document boundaries from them), calls the attention underneath, and
all-to-alls the output back to the token shard. S²-Attn's roll of the shifted heads therefore
runs on whole sequences, on the ranks holding those heads; the wrapper tells our attention which
of the model's heads a rank holds.

We wrap our own attention under a new name instead of calling DeepSpeed's
`register_with_transformers`, which overwrites the backend's entry for every model in the
process, builds process groups of its own and refuses any backend whose name is "eager".
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from longctx.config import ConfigError

if TYPE_CHECKING:
    from transformers import PretrainedConfig


def allowed_degrees(heads: int, kv_heads: int) -> list[int]:
    """sp degrees a model's heads allow: q heads split evenly; kv heads split, or repeated to sp."""
    return [s for s in range(1, heads + 1) if heads % s == 0 and (kv_heads % s == 0 or s % kv_heads == 0)]


def check_layout(sp: int, world_size: int, seq_len: int, heads: int, kv_heads: int) -> None:
    """Raise ConfigError, one line naming the key, when sp cannot split this world, sequence or model."""
    if world_size % sp:
        raise ConfigError(f"parallel.sp={sp}: must divide the number of ranks ({world_size})")
    if seq_len % sp:
        raise ConfigError(f"data.seq_len={seq_len}: must be divisible by parallel.sp={sp}")
    if sp not in allowed_degrees(heads, kv_heads):
        why = (f"its {heads} attention heads do not divide by {sp}" if heads % sp else
               f"its {kv_heads} key/value heads neither divide by {sp} nor divide {sp} (to be repeated)")
        allowed = ", ".join(map(str, allowed_degrees(heads, kv_heads)))
        raise ConfigError(f"parallel.sp={sp}: the model cannot be split, {why}; allowed: {allowed}")


def model_heads(config: PretrainedConfig) -> tuple[int, int]:
    """(attention heads, key/value heads) of a transformers config."""
    text = config.get_text_config()
    return text.num_attention_heads, getattr(text, "num_key_value_heads", None) or text.num_attention_heads


def shard_batch(batch: dict[str, torch.Tensor], sp_rank: int, sp_size: int) -> dict[str, torch.Tensor]:
    """This rank's consecutive 1/sp of every row of every (batch, seq) tensor.

    Labels must arrive shifted on the whole sequence (longctx.data does it), or the last token
    of each shard would predict nothing; position_ids stay global, so RoPE on a shard rotates
    by the true positions and documents are still found after the all-to-all gathers them.
    """
    seq_len = batch["input_ids"].shape[1]
    if seq_len % sp_size:
        raise ValueError(f"sequence of {seq_len} tokens does not split into {sp_size} equal shards")
    n = seq_len // sp_size
    return {key: value[:, sp_rank * n : (sp_rank + 1) * n].contiguous() for key, value in batch.items()}


def use_ulysses(model: torch.nn.Module, group: dist.ProcessGroup, micro_batch_size: int) -> str:
    """Run the model's attention under Ulysses over `group`; returns a line for the run log.

    Undo with `model.set_attn_implementation(<the previous name>)`.
    """
    import torch.distributed as dist
    from deepspeed.runtime.sequence_parallel.ulysses_sp import UlyssesSPAttentionHF
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    inner = model.config._attn_implementation
    sp = dist.get_world_size(group)
    text = model.config.get_text_config()
    heads, kv_heads = model_heads(model.config)
    if sp not in allowed_degrees(heads, kv_heads):
        raise ValueError(f"sequence parallel over {sp} ranks: {heads} heads / {kv_heads} kv heads do not split")
    # after the all-to-all this rank holds whole sequences for heads [rank * heads/sp, (rank + 1) * heads/sp):
    # S²-Attn (our attention's only use of it) shifts those of them in the model's second half of heads
    head_range = (dist.get_rank(group) * heads // sp, heads)
    ulysses = UlyssesSPAttentionHF(
        attn=functools.partial(ALL_ATTENTION_FUNCTIONS[inner], head_range=head_range),
        batch_size=micro_batch_size,
        attn_head_count=heads,
        attn_head_size=getattr(text, "head_dim", None) or text.hidden_size // heads,
        kv_head_count=kv_heads,
        num_hidden_layers=text.num_hidden_layers,
        process_group=group,
        seq_length_is_variable=True,  # the shapes are read per call: eval and training lengths may differ
    )
    # the wrapper is bound to this group, head layout and batch size: its name says all of them
    name = f"{inner}_ulysses{sp}_g{group.group_name}_h{heads}kv{kv_heads}b{micro_batch_size}"
    AttentionInterface.register(name, ulysses)
    AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[inner])
    model.set_attn_implementation(name)
    repeat = f", kv heads repeated {sp // kv_heads}x" if kv_heads < sp else ""
    per_rank = f"{heads // sp} heads per rank{repeat}"
    return f"sequence parallel: Ulysses all-to-all over {sp} ranks around {inner} ({per_rank})"
