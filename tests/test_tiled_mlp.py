"""The tiled MLP (DeepSpeed's TiledMLP over sequence tiles) equals the untiled MLP in values and gradients."""

import math
from functools import partial

import helpers
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from longctx.activation_checkpointing import apply_checkpointing, layout_for
from longctx.loss import causal_lm_loss
from longctx.tiled_mlp import apply_tiled_mlp, use_tiled_mlp

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
tiny_llama = partial(helpers.tiny_llama, vocab_size=101, intermediate_size=160)


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
    llama8b, llama70b, smollm2 = 14336, 28672, 1536  # MLP widths
    assert use_tiled_mlp("auto", 32768, llama8b) and not use_tiled_mlp("auto", 32767, llama8b)
    assert use_tiled_mlp("auto", 16384, llama70b) and not use_tiled_mlp("auto", 16383, llama70b)
    assert use_tiled_mlp("auto", 305835, smollm2) and not use_tiled_mlp("auto", 305834, smollm2)
    assert use_tiled_mlp("always", 8, smollm2) and not use_tiled_mlp("never", 10**6, llama8b)
    with pytest.raises(ValueError, match="train.tiled_mlp='yes'"):
        use_tiled_mlp("yes", 8, llama8b)
    with pytest.raises(ValueError, match="mlp_tile_tokens=0"):
        apply_tiled_mlp(tiny_llama(), 0)


def lora_llama(dropout: float, targets: list[str]) -> torch.nn.Module:
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=101, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)
    model = get_peft_model(LlamaForCausalLM(config).double().to(DEVICE).train(),
                           LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules=targets))
    for name, p in model.named_parameters():
        if "lora_B" in name:  # nonzero adapters, so every adapter matrix has a gradient
            torch.nn.init.normal_(p, std=0.1)
    return model


def fp64_loss(model, rows: int = 2, seq: int = 24) -> torch.Tensor:
    ids = torch.randint(0, 101, (rows, seq), generator=torch.Generator().manual_seed(1)).to(DEVICE)
    labels = torch.roll(ids, -1, 1)
    labels[:, -1] = -100
    torch.manual_seed(7)  # the same dropout masks at every call (seeds CUDA too)
    logits = model(input_ids=ids).logits
    return torch.nn.functional.cross_entropy(logits.reshape(-1, 101), labels.reshape(-1), ignore_index=-100)


def test_tiled_mlp_with_dropout_gives_the_gradient_of_its_own_output():
    # backward recomputes each tile: it must draw that tile's forward dropout masks again, or the gradient
    # belongs to other masks (checked against a central difference of the same seeded loss, float64)
    model = lora_llama(0.3, ["q_proj", "gate_proj", "up_proj", "down_proj"])
    apply_tiled_mlp(model, 8)
    params = [p for p in model.parameters() if p.requires_grad]
    fp64_loss(model).backward()
    direction = [torch.randn_like(p) for p in params]
    analytic = sum((p.grad * d).sum() for p, d in zip(params, direction))
    eps = 1e-4

    @torch.no_grad()
    def loss_moved(by: float) -> torch.Tensor:
        for p, d in zip(params, direction):
            p.add_(by * d)
        loss = fp64_loss(model)
        for p, d in zip(params, direction):
            p.sub_(by * d)
        return loss

    numeric = (loss_moved(eps) - loss_moved(-eps)) / (2 * eps)
    assert abs(float(analytic - numeric)) < 1e-3 * abs(float(numeric))  # the old recompute was 37% off


def test_tiled_mlp_trains_adapters_on_the_mlp_alone():
    # nothing below the MLP is trained: its input has no gradient, yet the adapters must get theirs
    grads = []
    for tile in (None, 8):
        model = lora_llama(0.0, ["gate_proj", "up_proj", "down_proj"])
        if tile:
            apply_tiled_mlp(model, tile)
        fp64_loss(model).backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    for name, reference in grads[0].items():
        torch.testing.assert_close(grads[1][name], reference, rtol=1e-10, atol=1e-12)
