"""Checkpointed layers (inputs on the GPU or offloaded to host memory) give the gradients of no checkpointing."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from longctx.checkpointing import (HostMemoryError, apply_checkpointing, choose_checkpointing, decoder_layers,
                                   offload_host_bytes, require_host_memory)
from longctx.loss import causal_lm_loss

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
GiB = 2**30


def tiny_config(**overrides) -> LlamaConfig:
    return LlamaConfig(vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                       attn_implementation="eager", **overrides)


def tiny_llama(**overrides) -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(tiny_config(**overrides)).float().to(DEVICE).train()


def batch(seed: int = 0, rows: int = 2, seq: int = 40):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 101, (rows, seq), generator=g).to(DEVICE)
    labels = torch.roll(ids, -1, dims=1)
    labels[:, -1] = -100
    return ids, torch.arange(seq, device=DEVICE).expand(rows, -1), labels


def loss_and_grads(model, seed: int = 0):
    model.zero_grad()
    torch.manual_seed(123)  # dropout draws the same masks in every run
    loss_sum, n = causal_lm_loss(model, *batch(seed), chunk_tokens=32)
    (loss_sum / n).backward()
    return loss_sum.detach(), {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}


def assert_same(a, b, tol=1e-6):
    assert torch.allclose(a[0], b[0], rtol=tol, atol=0)
    assert a[1].keys() == b[1].keys() and len(a[1]) > 0
    for k in a[1]:
        err = ((a[1][k] - b[1][k]).norm() / b[1][k].norm()).item()
        assert err <= tol, (k, err)


@pytest.mark.parametrize("policy,gpu_layers", [("full", 0), ("offload", 0), ("offload", 2)])
def test_checkpointed_gradients_equal_no_checkpointing(policy, gpu_layers):
    model = tiny_llama(attention_dropout=0.2)  # the recompute must replay the dropout masks
    reference = loss_and_grads(model)
    handle = apply_checkpointing(model, policy, gpu_layers=gpu_layers)
    assert_same(loss_and_grads(model), reference)
    assert_same(loss_and_grads(model), reference)  # second step reuses the host buffers
    if policy == "offload":
        assert handle.offloader.host_bytes == offload_host_bytes(model.config, 40, 2, gpu_layers, dtype_bytes=4)
    handle.undo()


def test_offloaded_lora_adapters_get_the_gradients_of_no_checkpointing():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))
    for name, p in model.named_parameters():  # adapters start at B=0; give them values so every grad is non-trivial
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05)
    reference = loss_and_grads(model)
    handle = apply_checkpointing(model, "offload", gpu_layers=1)
    ours = loss_and_grads(model)
    handle.undo()
    assert all("lora" in k for k in ours[1])  # embeddings are frozen: layer 0's input needs no grad
    assert_same(ours, reference)


def test_undo_restores_the_original_model():
    model = tiny_llama()
    reference = loss_and_grads(model)
    for policy in ("none", "full", "offload"):
        apply_checkpointing(model, policy).undo()
    for layer in decoder_layers(model):
        assert "gradient_checkpointing" not in layer.__dict__ and "_gradient_checkpointing_func" not in layer.__dict__
        assert layer.gradient_checkpointing is False
    assert_same(loss_and_grads(model), reference, tol=0)


def test_eval_forward_saves_nothing():
    model = tiny_llama()
    handle = apply_checkpointing(model, "offload")
    with torch.no_grad():
        model(input_ids=batch()[0])
    assert handle.offloader.host_bytes == 0
    handle.undo()


def test_two_forwards_before_backward_are_refused():
    model = tiny_llama()
    handle = apply_checkpointing(model, "offload")
    first, _ = causal_lm_loss(model, *batch(0), chunk_tokens=32)
    causal_lm_loss(model, *batch(1), chunk_tokens=32)  # overwrites the first pass's host buffers
    with pytest.raises(RuntimeError, match="overwritten by a later forward pass"):
        first.backward()
    handle.undo()


def test_choose_checkpointing_keeps_on_gpu_what_fits():
    config = tiny_config()  # 4 layers; one layer input at 1000 tokens, batch 1, bf16: 128,000 bytes
    per_layer = 1000 * 64 * 2
    assert choose_checkpointing(config, "auto", 1000, 1, gpu_budget_bytes=4 * per_layer) == ("full", 4)
    assert choose_checkpointing(config, "auto", 1000, 1, gpu_budget_bytes=3 * per_layer - 1) == ("offload", 2)
    assert choose_checkpointing(config, "auto", 1000, 1, gpu_budget_bytes=-5) == ("offload", 0)
    assert choose_checkpointing(config, "offload", 1000, 1, 0, gpu_layers=9) == ("offload", 4)
    assert choose_checkpointing(config, "none", 1000, 1, 0) == ("none", 4)
    with pytest.raises(ValueError, match="train.checkpointing='partial'"):
        choose_checkpointing(config, "partial", 1000, 1, 0)


def test_host_memory_is_checked_before_training():
    config = tiny_config()
    need = offload_host_bytes(config, seq_len=2**20, micro_batch=2, gpu_layers=1)
    assert need == 3 * 2 * 2**20 * 64 * 2
    require_host_memory(need, available_bytes=need + 9 * GiB)
    with pytest.raises(HostMemoryError, match=r"need 0\.8 GiB of pinned host memory"):
        require_host_memory(need, available_bytes=need + GiB)
