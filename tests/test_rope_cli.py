"""`longctx rope show|scale`: readable output, a loadable scaled copy, one-line errors."""

import json
import re

import pytest

from longctx import rope
from longctx.cli import main


def test_show_prints_type_original_context_and_wavelengths(demo_dir, capsys):
    assert main(["rope", "show", str(demo_dir)]) == 0
    out = capsys.readouterr().out
    assert "rope_type" in out and "default" in out and "original context" in out and "256" in out


def test_scale_writes_a_copy_with_the_scaling_and_linked_files(tiny_model_dir, tmp_path, capsys):
    from transformers import AutoConfig, AutoModelForCausalLM

    out = tmp_path / "yarn"
    assert main(["rope", "scale", str(tiny_model_dir), "--target", "1k", "--method", "yarn", "--beta-fast", "16",
                 "--out", str(out)]) == 0
    config = AutoConfig.from_pretrained(out)
    assert config.rope_parameters["rope_type"] == "yarn" and config.rope_parameters["factor"] == 4.0
    assert config.rope_parameters["beta_fast"] == 16.0 and config.max_position_embeddings == 1024
    assert (out / "model.safetensors").is_symlink()
    model = AutoModelForCausalLM.from_pretrained(out)  # weights through the link
    assert model.model.rotary_emb.attention_scaling == pytest.approx(rope.inv_freq(config)[1])
    assert main(["rope", "show", str(out), "--json"]) == 0
    shown = json.loads(capsys.readouterr().out.split("\n", 1)[1])
    assert shown["rope_type"] == "yarn" and shown["original_context"] == 256


@pytest.mark.parametrize(
    "args, message",
    [
        (["--target", "lots"], "argument --target: 'lots' is not a length"),
        (["--target", "0"], "argument --target: '0' is not a length"),
        (["--target", "1k", "--method", "llama3", "--beta-fast", "3"],
         "--beta-fast=3.0: only applies to --method=yarn, not --method=llama3"),
        (["--target", "128"], "--target=128: below the original context 256"),
        (["--target", "1k", "--method", "longrope", "--short-factor", "1,x"], "'1,x' is not a comma-separated list"),
        (["--target", "1k", "--method", "magic"], "argument --method: invalid choice: 'magic'"),
        (["--target", "1k", "--method", "theta", "--theta", "0"], "argument --theta: '0': must be a finite number >= 1.0"),
        (["--target", "1k", "--method", "yarn", "--factor", "nan"], "argument --factor: 'nan': must be a finite number"),
        (["--target", "128", "--method", "ntk"], "--target=128: below the context 256 (ntk factor 0.5 < 1)"),
    ],
)
def test_bad_arguments_exit_2_with_one_line_and_write_nothing(demo_dir, tmp_path, capsys, args, message):
    out = tmp_path / "o"
    assert main(["rope", "scale", str(demo_dir), *args, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not out.exists()


def test_scale_takes_longrope_factor_lists(tiny_model_dir, tmp_path):
    from transformers import AutoConfig

    half = rope.rotary_dim(AutoConfig.from_pretrained(tiny_model_dir)) // 2
    short, long = ",".join(["1.0"] * half), ",".join(["4.0"] * half)
    out = tmp_path / "longrope"
    assert main(["rope", "scale", str(tiny_model_dir), "--target", "1k", "--method", "longrope",
                 "--short-factor", short, "--long-factor", long, "--out", str(out)]) == 0
    config = AutoConfig.from_pretrained(out)
    assert config.rope_parameters["long_factor"] == [4.0] * half
    assert rope.inv_freq(config, seq_len=1024)[0].allclose(rope.inv_freq(config)[0] / 4)


def test_show_refuses_a_directory_without_a_config(tmp_path, capsys):
    assert main(["rope", "show", str(tmp_path)]) == 2
    assert "not a directory with a config.json" in capsys.readouterr().err



def test_scale_advice_names_only_values_the_command_accepts(tiny_model_dir, tmp_path, capsys):
    """A target below the model's own scaling: the advice may not send the user to `--method=none`,
    which `scale` refuses (it always writes a scaling)."""
    yarn = tmp_path / "yarn"
    assert main(["rope", "scale", str(tiny_model_dir), "--target", "1k", "--method", "yarn", "--out", str(yarn)]) == 0
    capsys.readouterr()
    out = tmp_path / "shrunk"
    assert main(["rope", "scale", str(yarn), "--target", "512", "--method", "yarn", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "would shrink it" in err and not out.exists()
    assert "Keep it by using the model as it is (no `rope scale`)" in err
    accepted = ("auto",) + rope.METHODS
    assert all(m in accepted for m in re.findall(r"--method[= ](\w+)", err)), err
    assert main(["rope", "scale", str(yarn), "--target", "512", "--method", "none", "--out", str(out)]) == 2
    assert "argument --method: invalid choice: 'none' (choose from 'auto', 'linear'" in capsys.readouterr().err
