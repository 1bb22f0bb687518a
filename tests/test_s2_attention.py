"""S²-Attn (attention.train_pattern=s2) equals the paper's definition, written plainly in float64: values and
gradients through every backend (Triton in its interpreter on CPU), with packed documents, GQA, the wrap-around
at the sequence end, a Ulysses rank's share of heads, and a tiny Llama trained through patch_model."""

import sys

import pytest
import torch
from demo_runs import TINY, finish, launch, metrics
from helpers import loss_and_grads, rel_err, tiny_llama
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

from longctx.attention import attention_forward, attention_implementation, no_mask
from longctx.config import ConfigError, load_recipe, s2_group
from longctx.model import patch_model
from longctx.s2_attention import kv_repeat, reference_s2_attention

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
TOL = 1e-4 if CUDA else 1e-5  # fp32 against float64, by relative norm error
DEMO = "recipes/demo-cpu.yaml"
G = 8  # tokens per group: rows of 32 tokens hold 4 groups
# row 0 is one document (the paper's setting: the wrap-around joins its ends); row 1 packs documents of 1, 2, 26
# and 3 tokens, the third reaching from the row's first half-group to its last
PACKED = torch.cat([torch.arange(32), torch.cat([torch.arange(n) for n in (1, 2, 26, 3)])]).view(2, 32)
ONE_PER_ROW = torch.arange(32).expand(2, 32)


def starts_of(positions: torch.Tensor) -> torch.Tensor:
    starts = positions == 0
    starts[:, 0] = True
    return starts


def training_module() -> torch.nn.Module:
    return torch.nn.Module().train()


def qkv(heads: int, kv_heads: int, seq: int = 32, seed: int = 0) -> list[torch.Tensor]:
    """q, k, v in transformers' layout (batch, heads, seq, dim), fp32 leaves."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(2, h, seq, 16, generator=gen).to(DEVICE).requires_grad_() for h in (heads, kv_heads, kv_heads)]


def reference(q, k, v, positions):
    """The float64 reference, in and out in transformers' layout."""
    leaves = [x.detach().double().requires_grad_() for x in (q, k, v)]
    out = reference_s2_attention(*(x.transpose(1, 2) for x in leaves), starts_of(positions).to(q.device), G,
                                 q.shape[-1] ** -0.5)
    return out, leaves


# MHA, GQA, MQA, an odd number of kv heads, an odd number of heads (SmolLM2's: 4 plain, 5 shifted)
HEAD_LAYOUTS = [(4, 4), (4, 2), (8, 2), (4, 1), (6, 3), (9, 3)]
# packed rows attend in groups cut as documents, rows of one document in equal groups reshaped into rows: the
# interpreted kernel (the slow one) runs the second path for one head layout only
CASES = [(backend, heads, kv_heads, layout) for backend in ("triton", "sdpa", "eager")
         for heads, kv_heads in HEAD_LAYOUTS for layout in ("packed", "one-document-per-row")
         if backend != "triton" or CUDA or layout == "packed" or (heads, kv_heads) == (4, 2)]


@pytest.mark.parametrize("backend, heads, kv_heads, layout", CASES)
def test_values_and_gradients_equal_the_paper_definition(backend, heads, kv_heads, layout):
    positions = PACKED if layout == "packed" else ONE_PER_ROW
    q, k, v = qkv(heads, kv_heads)
    out, _ = attention_forward(training_module(), q, k, v, None, position_ids=positions.to(DEVICE), backend=backend,
                               s2_group=G)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    out.backward(grad)
    ref, leaves = reference(q, k, v, positions)
    ref.backward(grad.double())
    for name, ours, theirs in [("out", out, ref), ("dq", q.grad, leaves[0].grad), ("dk", k.grad, leaves[1].grad),
                               ("dv", v.grad, leaves[2].grad)]:
        assert rel_err(ours, theirs) < TOL, (name, rel_err(ours, theirs))


def saved_bytes(s2: int, heads: int, kv_heads: int) -> int:
    """Bytes of the distinct storages autograd keeps for backward through one attention call on a row of one
    document, in the model's setting: q, k and v come out of an op that does not keep them (RoPE needs only its
    angles)."""
    q, k, v = (x[:1] * 1 for x in qkv(heads, kv_heads, seq=64))
    storages = {}

    def keep(t: torch.Tensor) -> torch.Tensor:
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        attention_forward(training_module(), q, k, v, None, position_ids=torch.arange(64)[None].to(DEVICE),
                          backend="sdpa", s2_group=s2)
    return sum(storages.values())


@pytest.mark.parametrize("heads, kv_heads", [(8, 2), (4, 4), (9, 3)])
def test_s2_keeps_q_k_v_and_the_output_once(heads, kv_heads):
    # the halves attend as views of one tensor per input (the shifted heads rolled in): the inputs themselves
    # are not kept beside a rolled copy of their second half. Beyond full attention's, S² keeps per-group
    # log-sum-exps and, where a kv head serves both halves (9 heads over 3), the repeated kv heads, as the
    # planner counts them
    full, s2 = saved_bytes(0, heads, kv_heads), saved_bytes(16, heads, kv_heads)
    repeated = 2 * (kv_repeat(heads, kv_heads, heads // 2) - 1) * kv_heads * 64 * 16 * 4  # k and v, fp32
    assert full + repeated <= s2 <= 1.05 * (full + repeated), (full, repeated, s2)


def visible_keys(out: torch.Tensor, v: torch.Tensor, row: int, token: int, head: int) -> list[int]:
    """The tokens whose values reach the output of (row, token, head)."""
    (grad,) = torch.autograd.grad(out[row, token, head].sum(), v, retain_graph=True)
    return torch.nonzero(grad[row, :, head].abs().sum(-1)).flatten().tolist()


def test_which_tokens_each_half_sees_written_out():
    # 2 heads: head 0 plain, head 1 shifted by G/2 = 4; the reference itself, checked by hand
    q, k, v = (torch.randn(2, 32, 2, 16, dtype=torch.float64) for _ in range(3))
    v.requires_grad_()
    out = reference_s2_attention(q, k, v, starts_of(PACKED), G, 0.25)
    assert visible_keys(out, v, 0, 10, 0) == [8, 9, 10]  # plain: causal inside its group [8, 16)
    assert visible_keys(out, v, 0, 13, 1) == [12, 13]  # shifted: groups [4, 12), [12, 20), ...
    # the wrap-around: the row's first G/2 tokens share a group with its last G/2, after them
    assert visible_keys(out, v, 0, 1, 1) == [0, 1, 28, 29, 30, 31]
    assert visible_keys(out, v, 0, 30, 1) == [28, 29, 30]
    # row 1 is packed: no group crosses a document start, the wrap-around group included (token 3 opens the
    # 26-token document whose last token, 28, is in that group too)
    assert visible_keys(out, v, 1, 3, 1) == [3]
    assert visible_keys(out, v, 1, 5, 0) == [3, 4, 5]
    assert visible_keys(out, v, 1, 30, 1) == [29, 30]
    assert visible_keys(out, v, 1, 1, 1) == [1]
    # 3 heads: head 0 plain, heads 1 and 2 shifted (the paper's code shifts heads [H//2, H))
    q, k, v = (torch.randn(1, 32, 3, 16, dtype=torch.float64) for _ in range(3))
    v.requires_grad_()
    out = reference_s2_attention(q, k, v, starts_of(torch.arange(32).view(1, 32)), G, 0.25)
    assert [visible_keys(out, v, 0, 13, head) for head in range(3)] == [[8, 9, 10, 11, 12, 13], [12, 13], [12, 13]]


@pytest.mark.parametrize("heads, kv_heads, sp", [(8, 2, 2), (8, 2, 4), (6, 3, 3), (9, 3, 3)])
def test_a_ulysses_rank_shifts_the_model_heads_it_holds(heads, kv_heads, sp):
    # what each rank's attention sees after the all-to-all: whole sequences for heads/sp of the heads, kv heads
    # split the same way, or repeated to sp first when fewer (DeepSpeed's UlyssesSPAttentionHF). With 6 heads over
    # 3 ranks, rank 1 holds heads 2 and 3, one on each side of the middle, and their one kv head
    q, k, v = (x.detach().double() for x in qkv(heads, kv_heads))
    positions = PACKED.to(DEVICE)
    whole = attention_forward(training_module(), q, k, v, None, position_ids=positions, backend="eager", s2_group=G)[0]
    if kv_heads < sp:
        k, v = k.repeat_interleave(sp // kv_heads, 1), v.repeat_interleave(sp // kv_heads, 1)
    share, kv_share = heads // sp, k.shape[1] // sp
    parts = [attention_forward(training_module(), q[:, r * share:(r + 1) * share], k[:, r * kv_share:(r + 1) * kv_share],
                               v[:, r * kv_share:(r + 1) * kv_share], None, position_ids=positions, backend="eager",
                               s2_group=G, head_range=(r * share, heads))[0] for r in range(sp)]
    torch.testing.assert_close(torch.cat(parts, 2), whole, rtol=1e-12, atol=1e-12)


def reference_attention_fn(module, query, key, value, attention_mask, scaling=None, position_ids=None, **kwargs):
    """The float64 reference plugged into transformers as an attention implementation."""
    out = reference_s2_attention(*(x.transpose(1, 2).double() for x in (query, key, value)), starts_of(position_ids),
                                 G, scaling)
    return out.to(query.dtype), None


@pytest.mark.parametrize("backend", ["triton", "auto"])
def test_tiny_llama_trains_like_the_reference_and_evaluates_with_full_attention(backend, tmp_path):
    ids = torch.randint(0, 97, (2, 32), generator=torch.Generator().manual_seed(2)).to(DEVICE)
    positions = PACKED.to(DEVICE)
    labels = torch.roll(ids, -1, 1)
    labels[torch.roll(positions, -1, 1) == 0] = -100  # no token predicts across a document or row boundary
    AttentionInterface.register("s2_reference", reference_attention_fn)
    AttentionMaskInterface.register("s2_reference", no_mask)
    model = tiny_llama()
    model.set_attn_implementation("s2_reference")
    ref_loss, ref_grads = loss_and_grads(model, ids, positions, labels)

    # both recomputed treatments: the bottom layer's input in host memory, the top one's on the device
    recipe = load_recipe(DEMO, [f"attention.backend={backend}", "attention.train_pattern=s2", f"attention.s2_group={G}",
                                "data.seq_len=32", "train.micro_batch_size=2", "train.checkpointing=offload",
                                "train.gpu_checkpoint_layers=1", f"train.out_dir={tmp_path}"])
    patch = patch_model(model, recipe, torch.device(DEVICE))
    assert any("S²-Attn in training" in line and "export use full attention" in line for line in patch.changes)
    loss, grads = loss_and_grads(model, ids, positions, labels)
    torch.testing.assert_close(loss, ref_loss, rtol=TOL, atol=TOL)
    for name, g in grads.items():
        assert rel_err(g, ref_grads[name]) < 10 * TOL, name

    with torch.no_grad():
        s2_logits = model.eval()(ids, position_ids=positions).logits
        model.set_attn_implementation(attention_implementation("sdpa"))
        full_logits = model(ids, position_ids=positions).logits
    torch.testing.assert_close(s2_logits, full_logits, rtol=TOL, atol=TOL)  # evaluation attends fully
    full_loss, _ = loss_and_grads(model.train(), ids, positions, labels)
    assert (full_loss - loss).abs() > 1e-3  # and training did not
    patch.undo()


def test_recipe_keys_are_checked(tmp_path):
    out = f"train.out_dir={tmp_path}"
    assert s2_group(load_recipe(DEMO, ["attention.train_pattern=s2", out])) == 256  # a quarter of data.seq_len=1024
    for overrides, message in [
        (["attention.train_pattern=s2", "attention.s2_group=96"],
         "attention.s2_group=96: must be an even divisor of data.seq_len=1024; allowed: 128|256|512|..."),
        (["attention.train_pattern=s2", "data.seq_len=36"],
         "attention.s2_group=0 (a quarter of data.seq_len: 9): must be an even divisor of data.seq_len=36; allowed: "
         "6|12|18|..."),
        (["attention.s2_group=128"], "attention.s2_group=128: applies to attention.train_pattern=s2 only (got full)"),
        (["attention.train_pattern=sparse"], "attention.train_pattern='sparse': must be one of full|s2"),
    ]:
        with pytest.raises(ConfigError) as e:
            load_recipe(DEMO, [*overrides, out])
        assert str(e.value) == message


def test_a_pretrained_model_trains_with_s2_attention(tiny_model_dir, tmp_path):
    # from_pretrained hands back a model in eval mode, where S²-Attn (and dropout) stay off: a run that did not
    # switch it to training would train with full attention, and its first loss would equal the full run's
    runs = {pattern: launch([sys.executable, "launcher/run.py", "--config", DEMO, *TINY, f"model.path={tiny_model_dir}",
                             "train.max_steps=1", "train.save_every=0", "train.export=false", "eval.at_end=[]",
                             f"attention.train_pattern={pattern}", f"train.out_dir={tmp_path / pattern}"],
                            tmp_path / f"{pattern}.log") for pattern in ("full", "s2")}
    for pattern, proc in runs.items():
        assert finish(proc) == 0, (tmp_path / f"{pattern}.log").read_text()[-3000:]
    full, s2 = (metrics(tmp_path / pattern)[0]["loss"] for pattern in runs)
    assert abs(full - s2) > 1e-6 * full, (full, s2)  # equal to the last bit when S²-Attn stays off
