"""patch_model says what it changed and can put the model back as transformers built it."""

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from longctx.config import load_recipe
from longctx.model import patch_model


def test_patch_model_undo_restores_transformers_own_model(demo_dir):
    recipe = load_recipe("recipes/demo-cpu.yaml", ["train.tiled_mlp=always", "train.mlp_tile_tokens=64",
                                                  "train.checkpointing=offload", "attention.backend=sdpa"])
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(demo_dir))

    def state():
        return model.config._attn_implementation, {name: sorted(m.__dict__) for name, m in model.named_modules()}

    ids = torch.randint(0, model.config.vocab_size, (1, 96), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(ids).logits
    before = state()
    patch = patch_model(model, recipe, torch.device("cpu"))
    assert any("MLP: tiles of 64 tokens" in c for c in patch.changes) and state() != before
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, logits, rtol=1e-4, atol=1e-4)  # other kernels, same function
    patch.undo()
    assert state() == before
    with torch.no_grad():
        assert torch.equal(model(ids).logits, logits)  # transformers' own code again, bit for bit
