"""The chunked loss equals transformers' own loss, in value and in every gradient."""

import pytest
import torch
from helpers import rel_err, tiny_llama

from longctx.loss import IGNORE_INDEX, causal_lm_loss, chunked_lm_loss

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("chunk_tokens", [7, 64, 1000])
def test_chunked_loss_equals_transformers_loss_and_grads(chunk_tokens):
    model = tiny_llama(seed=chunk_tokens, vocab_size=211)  # the seed draws the batch below too
    ids = torch.randint(0, 211, (2, 45), device=DEVICE)
    hf_labels = ids.clone()
    hf_labels[torch.rand(ids.shape, device=DEVICE) < 0.3] = IGNORE_INDEX  # ignore_index inside the rows
    positions = torch.arange(45, device=DEVICE).expand(2, -1)

    model.zero_grad()
    ref = model(input_ids=ids, position_ids=positions, labels=hf_labels).loss  # mean, shifts itself
    ref.backward()
    ref_grads = grads(model)

    shifted = torch.full_like(hf_labels, IGNORE_INDEX)
    shifted[:, :-1] = hf_labels[:, 1:]
    model.zero_grad()
    loss_sum, n = causal_lm_loss(model, ids, positions, shifted, chunk_tokens)
    (loss_sum / n).backward()  # a scaled loss: the head's gradient must be scaled too
    ours = grads(model)

    assert n.item() == (hf_labels[:, 1:] != IGNORE_INDEX).sum().item()
    assert abs((loss_sum / n).item() - ref.item()) < 1e-5 * ref.item()
    assert ours.keys() == ref_grads.keys()
    for name, g in ref_grads.items():
        assert rel_err(ours[name], g) < 1e-5, name


def test_chunked_loss_bf16_head_matches_fp32_reference():
    torch.manual_seed(1)
    hidden = torch.randn(3, 50, 32, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
    weight = (torch.randn(300, 32, device=DEVICE) * 0.2).bfloat16().requires_grad_()
    labels = torch.randint(0, 300, (3, 50), device=DEVICE)
    labels[0, :10] = IGNORE_INDEX
    loss = chunked_lm_loss(hidden, weight, labels, chunk_tokens=33)
    (loss * 0.5).backward()

    h, w = hidden.detach().double().requires_grad_(), weight.detach().double().requires_grad_()
    ref = torch.nn.functional.cross_entropy((h @ w.t()).view(-1, 300), labels.view(-1), reduction="sum")
    (ref * 0.5).backward()
    assert weight.grad.dtype == torch.bfloat16 and hidden.grad.dtype == torch.bfloat16
    assert rel_err(loss, ref) < 1e-3
    assert rel_err(hidden.grad, h.grad) < 1e-2
    assert rel_err(weight.grad, w.grad) < 1e-2


def test_chunked_loss_without_grad_gives_the_same_value():
    torch.manual_seed(2)
    hidden = torch.randn(1, 40, 16, device=DEVICE, requires_grad=True)
    weight = torch.randn(50, 16, device=DEVICE)
    labels = torch.randint(0, 50, (1, 40), device=DEVICE)
    with_grad = chunked_lm_loss(hidden, weight, labels, chunk_tokens=9)
    with torch.no_grad():
        without = chunked_lm_loss(hidden, weight, labels, chunk_tokens=9)
    assert not without.requires_grad
    assert torch.equal(with_grad.detach(), without)


def test_all_ignored_tokens_give_zero_loss_and_zero_grads():
    hidden = torch.randn(1, 12, 16, device=DEVICE, requires_grad=True)
    weight = torch.randn(50, 16, device=DEVICE, requires_grad=True)
    labels = torch.full((1, 12), IGNORE_INDEX, device=DEVICE)
    chunked_lm_loss(hidden, weight, labels, chunk_tokens=5).backward()
    assert hidden.grad.abs().max() == 0 and weight.grad.abs().max() == 0
