"""The fused RMSNorm kernel against a float64 reference and transformers' RMSNorm; what it saves for backward."""

import pytest
import torch
from helpers import rel_err
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from longctx.kernels.rms_norm import rms_norm, rms_norm_reference, use_fused_rms_norm

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-2}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(2, 7, 64), (3, 5, 100), (1, 1, 4096)])
@pytest.mark.parametrize("weight_grad", [True, False])
def test_values_and_gradients_match_the_reference(shape, dtype, weight_grad):
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(shape, generator=g) * 3).to(DEVICE, dtype).requires_grad_()
    w = (1 + 0.1 * torch.randn(shape[-1], generator=g)).to(DEVICE, dtype).requires_grad_(weight_grad)
    y = rms_norm(x, w, 1e-6)
    dy = torch.randn(shape, generator=g).to(DEVICE, dtype)
    y.backward(dy)
    x64, w64 = x.detach().double().requires_grad_(), w.detach().double().requires_grad_(weight_grad)
    ref = rms_norm_reference(x64, w64, 1e-6)
    ref.backward(dy.double())
    assert y.dtype == dtype and not torch.isnan(y).any()
    assert rel_err(y, ref) < TOLERANCE[dtype]
    assert rel_err(x.grad, x64.grad) < TOLERANCE[dtype]
    if weight_grad:
        assert rel_err(w.grad, w64.grad) < TOLERANCE[dtype]
    else:
        assert w.grad is None


def test_strided_input_and_gradient():
    x = torch.randn(6, 32, device=DEVICE).t().requires_grad_()  # (32, 6), rows not contiguous
    w = torch.rand(6, device=DEVICE) + 0.5
    y = rms_norm(x, w, 1e-5)
    dy = torch.randn(6, 32, device=DEVICE).t()
    y.backward(dy)
    x64 = x.detach().double().requires_grad_()
    rms_norm_reference(x64, w.double(), 1e-5).backward(dy.double())
    assert rel_err(y, rms_norm_reference(x.detach().double(), w.double(), 1e-5)) < 1e-5
    assert rel_err(x.grad, x64.grad) < 1e-5


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="Triton's interpreter truncates on conversion to bf16")
def test_bf16_forward_rounds_where_transformers_does():
    norm = LlamaRMSNorm(256, eps=1e-5).to(DEVICE, torch.bfloat16)
    torch.nn.init.normal_(norm.weight, 1.0, 0.2)
    x = torch.randn(4, 33, 256, device=DEVICE).to(torch.bfloat16)
    ours, theirs = rms_norm(x, norm.weight, 1e-5), norm(x)
    # the same two roundings; float32 sums in another order may move a value by one bf16 step
    ulp = theirs.float().abs() * 2**-7
    assert ((ours.float() - theirs.float()).abs() <= ulp + 1e-6).all()
    assert (ours == theirs).float().mean() > 0.95


def saved_bytes(fn, *args) -> int:
    """Bytes autograd keeps for backward while running fn(*args) (parameters are not counted)."""
    params = {id(p) for p in args if isinstance(p, torch.nn.Parameter)}
    total = 0

    def pack(t):
        nonlocal total
        if id(t) not in params and not isinstance(t, torch.nn.Parameter):
            total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(*args)
    return total


def test_keeps_the_input_in_its_dtype_not_a_float32_copy():
    tokens, hidden = 64, 512
    norm = LlamaRMSNorm(hidden).to(DEVICE, torch.bfloat16).requires_grad_(False)  # frozen, as under LoRA
    x = torch.randn(tokens, hidden, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
    ours = saved_bytes(lambda t: rms_norm(t, norm.weight, norm.variance_epsilon), x)
    theirs = saved_bytes(norm, x)
    assert ours == tokens * hidden * 2 + tokens * 4  # bf16 input, float32 1/rms per token
    assert theirs >= tokens * hidden * 4  # transformers keeps the float32 upcast


def test_patched_model_gives_transformers_logits_and_gradients():
    config = LlamaConfig(vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, attn_implementation="eager")
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(DEVICE)
    for name, p in model.named_parameters():
        if "norm" in name:
            torch.nn.init.normal_(p, 1.0, 0.2)
    ids = torch.randint(0, 101, (2, 24), device=DEVICE)

    def run():
        model.zero_grad()
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        return out.logits.detach(), {k: p.grad.clone() for k, p in model.named_parameters()}

    ref_logits, ref_grads = run()
    patch = use_fused_rms_norm(model)
    assert patch.changes == ["rms norm: 5 LlamaRMSNorm modules -> fused Triton kernel"]
    logits, grads = run()
    assert rel_err(logits, ref_logits) < 1e-5
    for k in ref_grads:
        assert rel_err(grads[k], ref_grads[k]) < 1e-4, k
    patch.undo()
    assert all("forward" not in m.__dict__ for m in model.modules())


def test_other_families_are_refused():
    from transformers import GemmaConfig, GemmaForCausalLM

    model = GemmaForCausalLM(GemmaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1, head_dim=16))
    with pytest.raises(ValueError, match="GemmaRMSNorm from transformers.models.gemma.modeling_gemma"):
        use_fused_rms_norm(model)
    assert all("forward" not in m.__dict__ for m in model.modules())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_offsets_past_2_31_elements():
    # 540,672 tokens x 4096: the last rows start past 2**31 elements. Rows are independent, so the float32
    # reference runs on the last rows alone and the weight gradient is summed chunk by chunk: about 18 GiB
    # at the peak (a whole-tensor reference needs more than an 80 GB GPU holds)
    rows, hidden, eps = 540672, 4096, 1e-5
    x = torch.randn(rows, hidden, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    weight = (1 + 0.1 * torch.randn(hidden, device="cuda")).to(torch.bfloat16).requires_grad_()
    y = rms_norm(x, weight, eps)
    dy = torch.randn_like(y)
    y.backward(dy)
    last = slice(-4096, None)
    x32, w32 = x.detach()[last].float().requires_grad_(), weight.detach().float()
    ref = rms_norm_reference(x32, w32, eps)
    ref.backward(dy[last].float())
    dw = torch.zeros(hidden, device="cuda")
    for chunk in torch.split(torch.arange(rows, device="cuda"), 65536):
        xc = x.detach()[chunk].float()
        dw += (dy[chunk].float() * xc * torch.rsqrt(xc.pow(2).mean(-1, keepdim=True) + eps)).sum(0)
    for name, ours, theirs in [("y", y[last], ref), ("dx", x.grad[last], x32.grad), ("dw", weight.grad, dw)]:
        assert rel_err(ours, theirs) < TOLERANCE[torch.bfloat16], (name, rel_err(ours, theirs))
