"""Bad recipes stop before anything is loaded: exit 2, one line naming the key, nothing written."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from longctx.config import ConfigError, load_recipe

ROOT = Path(__file__).resolve().parents[1]
DEMO = str(ROOT / "recipes" / "demo-cpu.yaml")


def run_launcher(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    # on CPU ranks on any machine: the device-dependent refusals (flex) are the CPU's
    return subprocess.run([sys.executable, str(ROOT / "launcher" / "run.py"), *args], cwd=cwd, capture_output=True,
                          text=True, timeout=120, env={**os.environ, "DS_ACCELERATOR": "cpu"})


@pytest.mark.parametrize(
    "override, expected",
    [
        ("train.lrr=0.1", "train.lrr: unknown key; did you mean 'train.lr'?"),  # unknown key
        ("train.max_steps=ten", "train.max_steps='ten': wrong type"),  # wrong type
        ("train.lr=-1", "train.lr=-1.0: must be > 0.0"),  # out of range
        ("parallel.zero_stage=4", "parallel.zero_stage=4: must be one of 0|1|2|3"),  # not an allowed value
        ("model.config=/no/such/dir", "model.config='/no/such/dir': not a directory with a config.json"),  # missing path
        ("parallel.offload_params=true", "parallel.offload_params=true: needs parallel.zero_stage=3"),  # combination
        ("train.lr=nan", "train.lr=nan: must be a finite number"),
        ("eval.depths=[0.5,2.0]", "eval.depths: 2.0 must be in [0.0, 1.0]"),
        ("eval.lengths=[]", "eval.lengths=[]: needs at least one value"),
        ("rope.method=none rope.mscale=2", "rope.mscale=2.0: set but rope.method=none"),
        ("--bogus", "longctx train: unrecognized arguments: --bogus"),
        ("train.gpu_checkpoint_layers=1", "train.gpu_checkpoint_layers=1: applies to train.checkpointing=offload only"),
        ("train.checkpointing=offload train.gpu_checkpoint_layers=99", "train.gpu_checkpoint_layers=99: the model has"),
        ("attention.train_pattern=s2 attention.s2_group=96",
         "attention.s2_group=96: must be an even divisor of data.seq_len=1024; allowed: 128|256|512|..."),
        # rules that read the recipe's files: still before anything is written
        ("rope.method=theta", "rope.method=theta: needs rope.theta"),
        ("attention.backend=flex", "attention.backend=flex: torch's FlexAttention trains only on CUDA"),
        ("lora.enabled=true lora.targets=[q_proj,bogus]", "lora.targets: bogus not in the model"),
        ("train.resume=tests", "train.resume='tests': not a complete checkpoint"),
        ("data.path=pyproject.toml", "data.path='pyproject.toml': expected .jsonl/.json/.parquet/.txt files"),
        ("model.tokenizer=tests", "model.tokenizer='tests': no tokenizer loads from it"),
        ("eval.at_end=[needle] eval.lengths=[8]", "eval.lengths: 8 tokens cannot hold 1 needle(s)"),
        ("data.seq_len=64", "data.seq_len=64: a passkey episode needs at least 97 tokens (or data.passkey_documents=0)"),
        ("data.seq_len=1000", None),  # valid on its own: contrasts the failing cases
    ],
)
def test_bad_override_exits_2_with_one_line_and_writes_nothing(tmp_path, override, expected):
    out = tmp_path / "run"
    if expected is None:
        recipe = load_recipe(DEMO, [override, f"train.out_dir={out}"])
        assert recipe.data.seq_len == 1000
        return
    proc = run_launcher("--config", DEMO, f"train.out_dir={out}", *override.split())
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr
    assert not out.exists()


def test_missing_recipe_file_and_bad_yaml(tmp_path):
    proc = run_launcher("--config", str(tmp_path / "nope.yaml"))
    assert proc.returncode == 2 and "no such recipe file" in proc.stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    proc = run_launcher("--config", str(bad))
    assert proc.returncode == 2 and "not valid YAML" in proc.stderr


@pytest.mark.parametrize("text, where, what", [
    ("train: [unclosed\n", "2:1", "did not find expected ',' or ']'; while parsing a flow sequence at 1:8"),
    ("train:\n  max_steps: 3\n   lr: 1\n", "3:6", "mapping values are not allowed in this context"),
    ("train:\n  lr: 1\n  lr: 2\n", "3:3", "found duplicate key lr; while constructing a mapping at 2:3"),
])
def test_a_yaml_syntax_error_names_its_line_and_column(tmp_path, text, where, what):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text(text)
    with pytest.raises(ConfigError) as error:
        load_recipe(str(recipe))
    assert str(error.value) == f"--config {recipe}:{where}: not valid YAML ({what})"


def test_unknown_key_inside_recipe_file(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model:\n  config: longctx/assets/demo-llama\ntrain:\n  max_stepz: 3\n")
    with pytest.raises(ConfigError, match=r"train.max_stepz: unknown key; did you mean 'train.max_steps'\?"):
        load_recipe(str(recipe))


def test_a_section_with_every_key_commented_out_is_empty(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model:\n  config: longctx/assets/demo-llama\ntrain:\n  # max_steps: 3\n")
    assert load_recipe(str(recipe)).train.max_steps == 30


def test_exactly_one_model_source_and_sp_divides_seq_len():
    with pytest.raises(ConfigError, match="set exactly one"):
        load_recipe(None, [])
    with pytest.raises(ConfigError, match=r"data.seq_len=1000: must be divisible by parallel.sp=3"):
        load_recipe(None, ["model.config=longctx/assets/demo-llama", "data.seq_len=1000", "parallel.sp=3"])


def test_overrides_are_typed_like_yaml():
    r = load_recipe(DEMO, ["lora.targets=[q_proj,v_proj]", "train.lr=1e-4", "lora.enabled=false", "rope.method=linear", "rope.factor=4"])
    assert r.lora.targets == ["q_proj", "v_proj"] and r.train.lr == 1e-4
    assert r.lora.enabled is False and r.rope.factor == 4.0


def test_text_keys_keep_the_text_as_typed():
    # YAML would read `on` as true and `1e3` as a float; a text key gets the words the user wrote
    with pytest.raises(ConfigError, match=r"^train.tiled_mlp='on': must be one of auto\|always\|never$"):
        load_recipe(DEMO, ["train.tiled_mlp=on"])
    assert load_recipe(DEMO, ["train.out_dir=1e3"]).train.out_dir == "1e3"
    assert load_recipe(DEMO, ["model.tokenizer=null"]).model.tokenizer is None


@pytest.mark.parametrize("content, expected", [
    ('{"title": "no text field"}\n', "records need a 'text' field"),
    ("", "no records in it"),
    ("not json\n", "cannot read json records"),
    ('{"text": "a"}\n{"text": "b"}\n{"text": "c",}\n', "docs.jsonl:3: not valid JSON"),  # 1-based, not pyarrow's row 2
])
def test_data_records_are_checked_before_anything_is_written(tmp_path, content, expected):
    data, out = tmp_path / "docs.jsonl", tmp_path / "run"
    data.write_text(content)
    proc = run_launcher("--config", DEMO, f"train.out_dir={out}", f"data.path={data}")
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and expected in lines[0], proc.stderr
    assert not out.exists()


def test_a_checkpoint_resumes_only_in_a_world_of_its_size(tmp_path):
    tag = tmp_path / "step-0000002"
    tag.mkdir()
    for name in ("COMPLETE", "rng-rank0.pt", "rng-rank1.pt"):
        (tag / name).write_text("")
    out = tmp_path / "run"
    proc = run_launcher("--config", DEMO, f"train.out_dir={out}", f"train.resume={tag}")
    assert proc.returncode == 2 and "was written by 2 ranks, this run has 1" in proc.stderr, proc.stderr
    assert not out.exists()


def test_a_sliding_window_shorter_than_the_sequence_is_refused():
    from transformers import MistralConfig

    from longctx.preflight import check_attention

    recipe = load_recipe(DEMO, ["data.seq_len=1024"])
    with pytest.raises(ConfigError, match="sliding window of 512 tokens, shorter than data.seq_len=1024"):
        check_attention(MistralConfig(sliding_window=512), recipe)
    check_attention(MistralConfig(sliding_window=1024), recipe)  # the window covers every sequence: exact
    check_attention(MistralConfig(sliding_window=None), recipe)


def test_sequence_parallel_refuses_rope_chosen_per_forward():
    from transformers import LlamaConfig

    from longctx.preflight import check_sequence_parallel_rope

    dynamic = LlamaConfig(rope_parameters={"rope_type": "dynamic", "factor": 4.0, "rope_theta": 10000.0})
    with pytest.raises(ConfigError, match="parallel.sp=2: dynamic RoPE picks its frequencies"):
        check_sequence_parallel_rope(dynamic, 2)
    check_sequence_parallel_rope(dynamic, 1)
    yarn = LlamaConfig(rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0,
                                        "original_max_position_embeddings": 2048})
    check_sequence_parallel_rope(yarn, 2)
