"""Checkpointed layers (inputs on the GPU or offloaded to host memory) give the gradients of no checkpointing."""

from functools import partial

import helpers
import pytest
import torch

from longctx.activation_checkpointing import (HostMemoryError, Layout, apply_checkpointing, choose_layout,
                                              decoder_layers, layout_for, require_host_memory,
                                              resident_host_bytes)
from longctx.loss import causal_lm_loss

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
GiB = 2**30
# 4 decoder layers for the layouts to split
tiny_llama = partial(helpers.tiny_llama, vocab_size=101, num_hidden_layers=4, attn_implementation="eager")


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


@pytest.mark.parametrize("layout", [Layout(0, 4, 0), Layout(4, 0, 0), Layout(2, 2, 0), Layout(1, 1, 2),
                                    Layout(2, 0, 2), Layout(0, 0, 4)])
def test_checkpointed_gradients_equal_no_checkpointing(layout):
    model = tiny_llama(attention_dropout=0.2)  # the recompute must replay the dropout masks
    reference = loss_and_grads(model)
    handle = apply_checkpointing(model, layout)
    assert_same(loss_and_grads(model), reference)
    assert_same(loss_and_grads(model), reference)  # second step reuses the host buffers
    assert handle.offloader.host_bytes == layout.host * 2 * 40 * 64 * 4  # exact: rows x seq x hidden x fp32
    handle.undo()


def test_plain_layers_are_not_recomputed():
    model = tiny_llama()
    calls = []
    for layer in decoder_layers(model):
        layer.mlp.register_forward_hook(lambda *_: calls.append(1))
    handle = apply_checkpointing(model, Layout(1, 1, 2))
    loss_and_grads(model)
    assert len(calls) == 4 + 2  # every layer forward, then the two checkpointed ones again in backward
    handle.undo()


def with_layer_outputs_through(model, fn):
    """Every decoder layer's forward returns fn(its output): the layers become a subclass of their class."""
    for layer in decoder_layers(model):
        class Wrapped(type(layer)):
            def forward(self, *args, **kwargs):
                return fn(super().forward(*args, **kwargs))
        layer.__class__ = Wrapped
    return model


def test_recomputed_output_is_freed_before_its_backward():
    outputs = []

    def record(out):
        outputs.append(out)
        return out

    model = with_layer_outputs_through(tiny_llama(), record)
    handle = apply_checkpointing(model, Layout(2, 2, 0))
    loss_and_grads(model)
    forward, recomputed = outputs[:4], outputs[4:]
    assert len(recomputed) == 4 and all(o.untyped_storage().nbytes() == 0 for o in recomputed)
    assert all(o.untyped_storage().nbytes() > 0 for o in forward)
    handle.undo()


def test_a_layer_output_that_backward_reads_is_kept():
    """sigmoid saves its result: a layer ending in one must keep its recomputed output."""
    model = with_layer_outputs_through(tiny_llama(), torch.sigmoid)
    reference = loss_and_grads(model)
    handle = apply_checkpointing(model, Layout(2, 2, 0))
    assert_same(loss_and_grads(model), reference)
    handle.undo()


def test_offloaded_first_layer_input_is_not_kept_with_lora():
    """LoRA is added after checkpointing, as load_model does; the embeddings' output must not outlive forward."""
    import weakref

    from longctx.config import LoraSection
    from longctx.model import add_lora

    model = tiny_llama()
    handle = apply_checkpointing(model, Layout(4, 0, 0))
    model = add_lora(model, LoraSection(enabled=True, r=4))
    embedded = []
    model.get_input_embeddings().register_forward_hook(lambda m, args, out: embedded.append(weakref.ref(out)))
    loss_sum, n = causal_lm_loss(model, *batch(), chunk_tokens=32)
    assert embedded[0]() is None
    (loss_sum / n).backward()
    assert all(p.grad is not None for name, p in model.named_parameters() if "lora_" in name)
    handle.undo()


def test_a_frozen_bottom_layer_over_frozen_embeddings_is_skipped_in_backward():
    model = tiny_llama()
    for name, p in model.named_parameters():
        p.requires_grad_(".layers.0." not in name and "embed_tokens" not in name)
    reference = loss_and_grads(model)
    handle = apply_checkpointing(model, Layout(2, 2, 0))
    assert_same(loss_and_grads(model), reference)
    handle.undo()


def test_offloaded_lora_adapters_get_the_gradients_of_no_checkpointing():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))
    for name, p in model.named_parameters():  # adapters start at B=0; give them values so every grad is non-trivial
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05)
    reference = loss_and_grads(model)
    handle = apply_checkpointing(model, layout_for("offload", 4, gpu_layers=1))
    ours = loss_and_grads(model)
    handle.undo()
    assert all("lora" in k for k in ours[1])  # embeddings are frozen: layer 0's input needs no grad
    assert_same(ours, reference)


def test_undo_restores_the_original_model():
    model = tiny_llama()
    reference = loss_and_grads(model)
    for policy in ("none", "full", "offload"):
        apply_checkpointing(model, layout_for(policy, 4)).undo()
    for layer in decoder_layers(model):
        assert "gradient_checkpointing" not in layer.__dict__ and "_gradient_checkpointing_func" not in layer.__dict__
        assert layer.gradient_checkpointing is False
    assert_same(loss_and_grads(model), reference, tol=0)


def test_eval_forward_saves_nothing():
    model = tiny_llama()
    handle = apply_checkpointing(model, layout_for("offload", 4))
    with torch.no_grad():
        model(input_ids=batch()[0])
    assert handle.offloader.host_bytes == 0
    handle.undo()


def test_two_forwards_before_backward_are_refused():
    model = tiny_llama()
    handle = apply_checkpointing(model, layout_for("offload", 4))
    first, _ = causal_lm_loss(model, *batch(0), chunk_tokens=32)
    causal_lm_loss(model, *batch(1), chunk_tokens=32)  # overwrites the first pass's host buffers
    with pytest.raises(RuntimeError, match="overwritten by a later forward pass"):
        first.backward()
    handle.undo()


def test_layouts_of_the_policies():
    assert layout_for("none", 4) == Layout(0, 0, 4)
    assert layout_for("full", 4) == Layout(0, 4, 0)
    assert layout_for("offload", 4) == Layout(4, 0, 0)
    assert layout_for("offload", 4, gpu_layers=9) == Layout(0, 4, 0)
    with pytest.raises(ValueError, match="train.checkpointing='auto'"):
        layout_for("auto", 4)
    with pytest.raises(ValueError, match="covers 3 decoder layers, the model has 4"):
        apply_checkpointing(tiny_llama(), Layout(1, 1, 1))


def test_choose_layout_fills_the_budget_cheapest_first():
    inp, plain = 100, 1000  # bytes of one layer's input, of one plain layer's activations

    def choose(top_room, recompute_room=10**9):
        return choose_layout(4, inp, plain, recompute_room=recompute_room, top_room=top_room)

    # every input fits: each 900 bytes left over at the top turn one layer plain
    assert choose(4 * inp + 900) == Layout(0, 3, 1)
    assert choose(4 * inp + 899) == Layout(0, 4, 0)
    assert choose(4 * inp + 10**6) == Layout(0, 0, 4)
    # not every input fits (at either moment): as many stay as fit, the rest go to host memory (backward
    # frees the kept inputs, top down, before offloaded ones come back, so both share the same room)
    assert choose(4 * inp - 1) == Layout(1, 3, 0)
    assert choose(10**9, recompute_room=4 * inp - 1) == Layout(1, 3, 0)
    assert choose(2 * inp) == Layout(2, 2, 0)
    assert choose(-5) == Layout(4, 0, 0)
    # inputs on the GPU at the busiest moment of backward: the kept ones, or the two offloaded in flight
    layouts = [Layout(0, 5, 0), Layout(30, 2, 0), Layout(3, 1, 0), Layout(4, 0, 0), Layout(1, 0, 3)]
    assert [layout.inputs_in_backward for layout in layouts] == [5, 2, 2, 2, 1]
    for top in range(0, 6000, 37):  # whatever is chosen fits, unless even all-offloaded does not
        for recompute in (top, 350, 10**6):
            layout = choose(top, recompute)
            on_gpu = layout.inputs_in_backward * inp
            assert layout.layers == 4
            assert on_gpu + layout.plain * plain <= max(top, 2 * inp)
            assert on_gpu <= max(recompute, 2 * inp)


def test_host_memory_is_checked_before_training():
    need = 3 * 2 * 2**20 * 64 * 2
    require_host_memory(need, available_bytes=need + 9 * GiB, resident_bytes=GiB)
    with pytest.raises(HostMemoryError, match=r"need 0\.8 GiB of pinned host memory \(\+3\.0 GiB for the process, "
                                               r"which holds 1\.0\)"):
        require_host_memory(need, available_bytes=need + GiB, resident_bytes=GiB)


def test_host_check_counts_what_the_process_holds_once():
    """MemAvailable already lacks the process's resident memory, so only the rest of its 4 GiB reserve is asked for:
    counted twice, a run the planner passed at launch would be refused here."""
    need = 119 * GiB
    require_host_memory(need, available_bytes=need + GiB, resident_bytes=3 * GiB)
    require_host_memory(need, available_bytes=need, resident_bytes=5 * GiB)
    with pytest.raises(HostMemoryError):
        require_host_memory(need, available_bytes=need + GiB, resident_bytes=2 * GiB)
    assert resident_host_bytes() > 0


