"""Shared fixtures. Without CUDA, Triton kernels run in its interpreter (set before any import)."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
    torch.set_num_threads(min(2, torch.get_num_threads()))

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "longctx" / "assets" / "demo-llama"
os.chdir(ROOT)  # recipes name their model directories relative to the repository root, as users run them


@pytest.fixture(scope="session")
def demo_dir() -> Path:
    """The shipped demo model directory: tokenizer + tiny Llama config, no weights."""
    return DEMO


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A saved random-init tiny Llama with the demo tokenizer, loadable by from_pretrained."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    out = tmp_path_factory.mktemp("tiny-llama")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(DEMO), dtype=torch.float32)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(DEMO).save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def smollm2_dir(tmp_path_factory) -> Path:
    """SmolLM2-135M imported once per session from the packaged GGUF file (the set-up installs its package)."""
    from longctx import cli

    out = tmp_path_factory.mktemp("smollm2") / "smollm2-135m"
    assert cli.main(["model", "import", "smollm2-135m", "--out", str(out)]) == 0
    return out
