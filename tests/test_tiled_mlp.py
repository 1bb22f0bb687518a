"""The tiled MLP (DeepSpeed's TiledMLP over sequence tiles) equals the untiled MLP in values and gradients."""

import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from longctx.checkpointing import apply_checkpointing, layout_for
from longctx.loss import causal_lm_loss
from longctx.tiled_mlp import AUTO_MIN_TOKENS, apply_tiled_mlp, use_tiled_mlp

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=101, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    return LlamaForCausalLM(config).float().to(DEVICE).train()


def loss_and_grads(model, rows: int, seq: int):
    g = torch.Generator().manual_seed(seq)
    ids = torch.randint(0, 101, (rows, seq), generator=g).to(DEVICE)
    labels = torch.roll(ids, -1, dims=1)
    labels[:, -1] = -100
    model.zero_grad()
    loss_sum, n = causal_lm_loss(model, ids, torch.arange(seq, device=DEVICE).expand(rows, -1), labels, 16)
    (loss_sum / n).backward()
    return loss_sum.detach(), {k: p.grad.clone() for k, p in model.named_parameters()}


def assert_close(a, b, tol=1e-5):
    assert ((a[0] - b[0]).abs() / b[0].abs()).item() < tol
    for k in b[1]:
        assert ((a[1][k] - b[1][k]).norm() / b[1][k].norm()).item() < tol, k


@pytest.mark.parametrize("rows,seq,tile", [(1, 50, 16), (2, 37, 8), (1, 20, 64)])
def test_tiled_mlp_equals_untiled(rows, seq, tile):
    model = tiny_llama()
    reference = loss_and_grads(model, rows, seq)
    undo = apply_tiled_mlp(model, tile)
    calls = []
    hooks = [layer.mlp.down_proj.register_forward_hook(lambda *_: calls.append(1)) for layer in model.model.layers]
    tiled = loss_and_grads(model, rows, seq)
    for hook in hooks:
        hook.remove()
    undo()
    tiles = math.ceil(seq / tile)
    # each tile runs without grad in forward and again in backward; one tile is the plain MLP
    assert len(calls) == len(hooks) * (2 * tiles if tiles > 1 else 1)
    assert_close(tiled, reference)
    assert_close(loss_and_grads(model, rows, seq), reference, tol=1e-7)  # undone: the original again


def test_tiled_mlp_inside_offloaded_checkpointing_equals_plain():
    model = tiny_llama()
    reference = loss_and_grads(model, 1, 48)
    undo_mlp = apply_tiled_mlp(model, 10)
    handle = apply_checkpointing(model, layout_for("offload", 2, gpu_layers=1))
    ours = loss_and_grads(model, 1, 48)
    handle.undo()
    undo_mlp()
    assert_close(ours, reference)


def test_tiled_mlp_setting():
    assert use_tiled_mlp("auto", AUTO_MIN_TOKENS) and not use_tiled_mlp("auto", AUTO_MIN_TOKENS - 1)
    assert use_tiled_mlp("always", 8) and not use_tiled_mlp("never", 10**6)
    with pytest.raises(ValueError, match="train.tiled_mlp='yes'"):
        use_tiled_mlp("yes", 8)
    with pytest.raises(ValueError, match="mlp_tile_tokens=0"):
        apply_tiled_mlp(tiny_llama(), 0)
