"""Helpers shared by the test modules (tests/ is on sys.path, as for demo_runs)."""

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from longctx.loss import causal_lm_loss

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative norm error of a against b, computed in float64."""
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def tiny_llama(seed: int = 0, **overrides) -> LlamaForCausalLM:
    """A random-init fp32 Llama on DEVICE in train mode, after torch.manual_seed(seed); overrides go to LlamaConfig."""
    torch.manual_seed(seed)
    config = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256)
    return LlamaForCausalLM(LlamaConfig(**{**config, **overrides})).float().to(DEVICE).train()


def loss_and_grads(model: torch.nn.Module, ids: torch.Tensor, positions: torch.Tensor,
                   labels: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The summed loss (chunks of 16 tokens) and every parameter's gradient of it."""
    model.zero_grad()
    loss_sum, _ = causal_lm_loss(model, ids, positions, labels, chunk_tokens=16)
    loss_sum.backward()
    return loss_sum.detach(), {k: p.grad.clone() for k, p in model.named_parameters()}
