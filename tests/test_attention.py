"""Every attention backend keeps documents apart: a packed batch trains like its documents run one by one."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from longctx.attention import attention_implementation, documents
from longctx.loss import causal_lm_loss


DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = 1e-4 if DEVICE == "cuda" else 1e-5  # fp32 throughout; GPU kernels sum in another order


def tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    return LlamaForCausalLM(config).float().to(DEVICE)


def shifted(ids: torch.Tensor) -> torch.Tensor:
    labels = torch.full_like(ids, -100)
    labels[:, :-1] = ids[:, 1:]
    return labels


def loss_and_grads(model, ids, positions, labels):
    model.zero_grad()
    loss_sum, n = causal_lm_loss(model, ids, positions, labels, chunk_tokens=16)
    loss_sum.backward()
    return loss_sum.detach(), n, {k: p.grad.clone() for k, p in model.named_parameters()}


# FlexAttention has no backward on CPU: its gradients are checked in the GPU tests
BACKENDS = ["triton", "sdpa", "eager", "auto"] + (["flex"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("backend", BACKENDS)
def test_packed_documents_equal_documents_one_by_one(backend):
    model = tiny_llama()
    model.set_attn_implementation(attention_implementation(backend))
    lengths = [1, 13, 7, 20]  # includes a length-1 document
    docs = [torch.randint(0, 97, (1, n), generator=torch.Generator().manual_seed(n)).to(DEVICE) for n in lengths]
    ids = torch.cat(docs, 1)
    positions = torch.cat([torch.arange(n) for n in lengths])[None].to(DEVICE)
    labels = torch.cat([shifted(d) for d in docs], 1)  # no token predicts across a boundary
    packed_loss, packed_n, packed_grads = loss_and_grads(model, ids, positions, labels)

    total = torch.zeros((), device=DEVICE)
    grads = {k: torch.zeros_like(g) for k, g in packed_grads.items()}
    for d in docs:
        loss, _, g = loss_and_grads(model, d, torch.arange(d.shape[1], device=DEVICE)[None], shifted(d))
        total += loss
        for k in grads:
            grads[k] += g[k]
    torch.testing.assert_close(packed_loss, total, rtol=TOL, atol=TOL)
    for k in grads:
        torch.testing.assert_close(packed_grads[k], grads[k], rtol=10 * TOL, atol=TOL, msg=k)
    # and the document mask matters: the same tokens as one document give another loss
    whole, _, _ = loss_and_grads(model, ids, torch.arange(ids.shape[1], device=DEVICE)[None], labels)
    assert (whole - packed_loss).abs() > 1e-3


def test_unpacked_batch_matches_transformers_sdpa():
    model = tiny_llama()
    ids = torch.randint(0, 97, (2, 24), generator=torch.Generator().manual_seed(3)).to(DEVICE)
    with torch.no_grad():
        expected = model(ids).logits
        model.set_attn_implementation(attention_implementation("triton"))
        torch.testing.assert_close(model(ids).logits, expected, rtol=10 * TOL, atol=10 * TOL)


def test_documents_from_positions():
    positions = torch.tensor([[0, 1, 2, 0, 0, 1], [3, 4, 0, 1, 2, 3]])  # row 2 continues a document
    docs = documents(positions)
    assert docs.cu_seqlens.tolist() == [0, 3, 4, 6, 8, 12] and docs.max_len == 4
    assert docs.ids.tolist() == [0, 0, 0, 1, 2, 2, 3, 3, 4, 4, 4, 4]


def test_flex_forward_keeps_documents_apart():
    model = tiny_llama().eval()
    docs = [torch.randint(0, 97, (1, n), generator=torch.Generator().manual_seed(n)).to(DEVICE) for n in (5, 11, 1)]
    with torch.no_grad():
        expected = torch.cat([model(d).logits for d in docs], 1)
        model.set_attn_implementation(attention_implementation("flex"))
        positions = torch.cat([torch.arange(d.shape[1]) for d in docs])[None].to(DEVICE)
        packed = model(torch.cat(docs, 1), position_ids=positions).logits
    torch.testing.assert_close(packed, expected, rtol=10 * TOL, atol=10 * TOL)


def test_padding_masks_and_unknown_backends_are_refused():
    model = tiny_llama()
    model.set_attn_implementation(attention_implementation("sdpa"))
    ids = torch.randint(0, 97, (2, 8), device=DEVICE)
    mask = torch.ones_like(ids)
    model(ids, attention_mask=mask)  # an all-ones mask is no padding
    mask[1, :3] = 0
    with pytest.raises(ValueError, match="does not take padded batches"):
        model(ids, attention_mask=mask)
    with pytest.raises(ValueError, match="attention.backend='fast'"):
        attention_implementation("fast")
