"""Every attention backend keeps documents apart: a packed batch trains like its documents run one by one."""

import logging

import pytest
import torch
from helpers import loss_and_grads, tiny_llama

from longctx.attention import attention_forward, attention_implementation, auto_choice, documents, log_auto_choice

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
TOL = 1e-4 if CUDA else 1e-5  # fp32 throughout; GPU kernels sum in another order


def shifted(ids: torch.Tensor) -> torch.Tensor:
    labels = torch.full_like(ids, -100)
    labels[:, :-1] = ids[:, 1:]
    return labels


def random_qkv(batch: int, seq_q: int, seq_k: int, seed: int):
    """q, k, v in transformers' layout (batch, heads, seq, dim): 4 query heads, 2 kv heads."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, h, n, 16, generator=gen).to(DEVICE) for h, n in ((4, seq_q), (2, seq_k), (2, seq_k))]


# FlexAttention has no backward on CPU: its gradients are checked in the GPU tests
BACKENDS = ["triton", "sdpa", "eager", "auto"] + (["flex"] if CUDA else [])


@pytest.mark.parametrize("backend", BACKENDS)
def test_packed_documents_equal_documents_one_by_one(backend):
    model = tiny_llama()
    model.set_attn_implementation(attention_implementation(backend, torch.device(DEVICE)))
    lengths = [1, 13, 7, 20]  # includes a length-1 document
    docs = [torch.randint(0, 97, (1, n), generator=torch.Generator().manual_seed(n)).to(DEVICE) for n in lengths]
    ids = torch.cat(docs, 1)
    positions = torch.cat([torch.arange(n) for n in lengths])[None].to(DEVICE)
    labels = torch.cat([shifted(d) for d in docs], 1)  # no token predicts across a boundary
    packed_loss, packed_grads = loss_and_grads(model, ids, positions, labels)

    total = torch.zeros((), device=DEVICE)
    grads = {k: torch.zeros_like(g) for k, g in packed_grads.items()}
    for d in docs:
        loss, g = loss_and_grads(model, d, torch.arange(d.shape[1], device=DEVICE)[None], shifted(d))
        total += loss
        for k in grads:
            grads[k] += g[k]
    torch.testing.assert_close(packed_loss, total, rtol=TOL, atol=TOL)
    for k in grads:
        torch.testing.assert_close(packed_grads[k], grads[k], rtol=10 * TOL, atol=TOL, msg=k)
    # and the document mask matters: the same tokens as one document give another loss
    whole, _ = loss_and_grads(model, ids, torch.arange(ids.shape[1], device=DEVICE)[None], labels)
    assert (whole - packed_loss).abs() > 1e-3


@pytest.mark.parametrize("backend", ["triton", "auto"])
def test_unpacked_batch_matches_transformers_sdpa(backend):
    model = tiny_llama()
    ids = torch.randint(0, 97, (2, 24), generator=torch.Generator().manual_seed(3)).to(DEVICE)
    with torch.no_grad():
        expected = model(ids).logits
        model.set_attn_implementation(attention_implementation(backend))
        torch.testing.assert_close(model(ids).logits, expected, rtol=10 * TOL, atol=10 * TOL)


def test_documents_from_positions():
    positions = torch.tensor([[0, 1, 2, 0, 0, 1], [3, 4, 0, 1, 2, 3]])  # row 2 continues a document
    docs = documents(positions)
    assert docs.cu_seqlens.tolist() == [0, 3, 4, 6, 8, 12] and docs.lengths == [3, 1, 2, 2, 4]
    assert docs.ids().tolist() == [0, 0, 0, 1, 2, 2, 3, 3, 4, 4, 4, 4]
    positions[0, 1] = 0  # changed in place between two forwards: the boundaries are read again
    assert documents(positions).lengths == [1, 2, 1, 2, 2, 4]


@pytest.mark.parametrize("backend", ["triton", "sdpa", "eager"])
def test_document_sources_agree_cu_seqlens_positions_and_broadcast_positions(backend):
    q, k, v = random_qkv(2, 9, 9, seed=1)
    row = torch.tensor([[0, 1, 2, 3, 0, 1, 0, 1, 2]], device=DEVICE)
    cu = torch.tensor([0, 4, 6, 9, 13, 15, 18], dtype=torch.int32, device=DEVICE)
    outs = [attention_forward(None, q, k, v, None, position_ids=row.expand(2, -1).clone(), backend=backend)[0],
            attention_forward(None, q, k, v, None, position_ids=row, backend=backend)[0],
            attention_forward(None, q, k, v, None, cu_seq_lens_q=cu, backend=backend)[0]]
    # document by document, each as its own sequence
    for start, end in zip(cu[:-1].tolist(), cu[1:].tolist()):
        b, s = divmod(start, 9)
        n = end - start
        alone = attention_forward(None, q[b:b + 1, :, s:s + n], k[b:b + 1, :, s:s + n], v[b:b + 1, :, s:s + n], None,
                                  backend="eager")[0]
        for out in outs:
            torch.testing.assert_close(out[b:b + 1, s:s + n], alone, rtol=TOL, atol=TOL)


@pytest.mark.parametrize("backend", ["triton", "sdpa", "auto"])
def test_queries_against_a_longer_cache_align_the_last_query_with_the_last_key(backend):
    q, k, v = random_qkv(2, 3, 7, seed=2)
    positions = torch.arange(4, 7, device=DEVICE).expand(2, -1)
    expected = attention_forward(None, q, k, v, None, position_ids=positions, backend="eager")[0]
    got = attention_forward(None, q, k, v, None, position_ids=positions, backend=backend)[0]
    torch.testing.assert_close(got, expected, rtol=TOL, atol=TOL)


def test_auto_logs_each_choice_once(caplog):
    log_auto_choice.cache_clear()  # earlier tests may have heard it already
    q, k, v = random_qkv(1, 6, 6, seed=3)
    packed = torch.tensor([[0, 1, 2, 0, 1, 2]], device=DEVICE)
    with caplog.at_level(logging.INFO, logger="longctx.attention"):
        for _ in range(2):
            attention_forward(None, q, k, v, None, position_ids=packed, backend="auto")
            attention_forward(None, q, k, v, None, position_ids=torch.arange(6, device=DEVICE)[None], backend="auto")
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2 and "packed documents" in lines[0] and "one document per row" in lines[1]
    assert ("triton" if CUDA else "sdpa per document") in lines[0]
    # float32 on CUDA: SDPA's fused kernels take no GQA there, so auto runs ours
    assert ("triton" if CUDA else "sdpa for") in lines[1] and "(float32)" in lines[1]


@pytest.mark.parametrize("dtype, expected", [(torch.bfloat16, "sdpa (cuDNN first)"), (torch.float16, "sdpa (cuDNN first)"),
                                             (torch.float32, "triton")])
def test_auto_on_cuda_takes_sdpa_only_in_half_precision(dtype, expected):
    cuda = torch.device("cuda")
    assert auto_choice(cuda, False, dtype) == expected
    assert auto_choice(cuda, True, dtype) == "triton"


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


def test_triton_without_a_gpu_or_the_interpreter_is_refused(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="attention.backend=triton needs a CUDA GPU"):
        attention_implementation("triton", torch.device("cpu"))
    assert attention_implementation("auto", torch.device("cpu")) == "longctx_auto"
