"""A run directory through its life: refused before anything is written, finished, run again, resumed only
by the recipe that wrote it."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from longctx.checkpoint import check_resumable, identity
from longctx.config import ConfigError, load_recipe

ROOT = Path(__file__).resolve().parents[1]
DEMO = str(ROOT / "recipes" / "demo-cpu.yaml")
TINY = ["data.seq_len=256", "data.max_documents=8", "data.passkey_documents=4", "data.num_proc=1",
        "train.max_steps=2", "train.export=false", "eval.at_end=[]"]


def run_launcher(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "launcher" / "run.py"), *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, env={**os.environ, "DS_ACCELERATOR": "cpu", **(env or {})})


def one_line_error(proc: subprocess.CompletedProcess) -> str:
    """Exit 2 and one error line, last; progress bars of work done before the refusal may precede it."""
    lines = proc.stderr.strip().splitlines()
    errors = [line for line in lines if "error" in line.lower()]
    assert proc.returncode == 2 and errors == lines[-1:] and lines[-1].startswith("error: "), proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    return lines[-1]


@pytest.fixture(scope="module")
def first_run(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    out = tmp_path_factory.mktemp("lifecycle") / "run"
    proc = run_launcher("--config", DEMO, *TINY, f"train.out_dir={out}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc


@pytest.fixture(scope="module")
def finished_run(first_run) -> Path:
    return first_run[0]


def test_a_run_prints_no_deprecation_or_op_build_noise(first_run):
    _, proc = first_run
    text = proc.stdout + proc.stderr
    assert "FutureWarning" not in text and "built successfully" not in text, text[-3000:]
    assert (first_run[0] / "curves.png").is_file()


def written(out: Path) -> dict:
    return {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.is_file()}


@pytest.mark.parametrize("override, key, saved, now", [
    ("lora.enabled=true", "lora.enabled", "False", "True"),  # the README's LoRA command after `make demo`
    ("data.seq_len=128", "data.seq_len", "256", "128"),  # would change the RoPE factor silently
    ("rope.method=linear", "rope.method", "'auto -> none (the model already reaches the target)'", "'linear'"),
])
def test_a_changed_recipe_does_not_resume_its_checkpoint(finished_run, override, key, saved, now):
    before = written(finished_run)
    line = one_line_error(run_launcher("--config", DEMO, *TINY, f"train.out_dir={finished_run}", "train.max_steps=4",
                                       override))
    assert f"written with {key}={saved}, this run has {key}={now};" in line, line
    assert written(finished_run) == before  # recipe.yaml, run.json, metrics untouched


def test_a_finished_run_started_again_says_so_and_trains_nothing(finished_run):
    before = written(finished_run)
    proc = run_launcher("--config", DEMO, *TINY, f"train.out_dir={finished_run}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "already trained to step 2 (train.max_steps=2); nothing to do" in proc.stdout
    assert str(finished_run / "checkpoints" / "step-0000002") in proc.stdout
    assert str(finished_run / "curves.png") in proc.stdout
    assert written(finished_run) == before


def test_identity_compares_every_key_that_shapes_the_checkpoint():
    a = load_recipe(DEMO, ["lora.enabled=true"])
    b = load_recipe(DEMO, ["lora.enabled=true", "lora.r=8"])
    rope = {"method": "yarn", "factor": 4.0}
    with pytest.raises(ConfigError, match=r"written with lora.r=16, this run has lora.r=8"):
        check_resumable(_checkpoint(a, rope), 1, identity(b, rope))
    nf4 = load_recipe(DEMO, ["lora.enabled=true", "model.quantize=nf4"])  # 4-bit weights: another checkpoint layout
    with pytest.raises(ConfigError, match=r"written with model.quantize='none', this run has model.quantize='nf4'"):
        check_resumable(_checkpoint(a, rope), 1, identity(nf4, rope))
    check_resumable(_checkpoint(a, rope), 1, identity(load_recipe(DEMO, ["lora.enabled=true", "train.lr=1"]), rope))


def _checkpoint(recipe, rope) -> Path:
    import tempfile

    tag = Path(tempfile.mkdtemp()) / "step-0000001"
    tag.mkdir()
    (tag / "rng-rank0.pt").write_text("")
    (tag / "identity.json").write_text(json.dumps(identity(recipe, rope)))
    return tag


def test_data_shorter_than_one_window_leaves_no_run_directory(tmp_path):
    data, out = tmp_path / "short.jsonl", tmp_path / "run"
    data.write_text('{"text": "too short for a window"}\n')
    line = one_line_error(run_launcher("--config", DEMO, f"data.path={data}", f"train.out_dir={out}"))
    assert "less than one window" in line
    assert not out.exists()


def test_an_out_dir_that_is_a_file_or_under_one_is_refused(tmp_path):
    a_file = tmp_path / "file"
    a_file.write_text("")
    for out in (a_file, a_file / "run"):
        line = one_line_error(run_launcher("--config", DEMO, f"train.out_dir={out}"))
        assert line == f"error: train.out_dir='{out}': {a_file} is a file, not a directory"


def test_no_config_says_so():
    assert one_line_error(run_launcher()) == ("error: --config is missing: give a recipe file, e.g. "
                                              "--config recipes/demo-cpu.yaml")


def test_a_master_port_in_use_is_refused_at_once(tmp_path):
    with socket.socket() as busy:
        busy.bind(("", 0))
        busy.listen()
        port = busy.getsockname()[1]
        line = one_line_error(run_launcher("--config", DEMO, f"train.out_dir={tmp_path / 'run'}",
                                           env={"MASTER_PORT": str(port)}))
    assert line.startswith(f"error: MASTER_PORT={port}: another process (another run?) listens on it")
    assert not (tmp_path / "run").exists()


def test_a_start_waiting_on_an_op_build_lock_names_it(tmp_path, monkeypatch, capsys):
    import time

    from longctx.topology import warn_on_build_locks

    lock = tmp_path / "py311_cpu" / "deepspeed_shm_comm" / "lock"
    lock.parent.mkdir(parents=True)
    lock.write_text("")
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    warn_on_build_locks(after_s=0.05)
    time.sleep(0.5)
    err = capsys.readouterr().err
    assert f"an op build holds {lock}" in err and f"rm {lock}" in err
    warn_on_build_locks(after_s=0.05).cancel()  # a start that got past the build says nothing
    time.sleep(0.2)
    assert capsys.readouterr().err == ""


def test_the_set_up_pins_every_dependency():
    import re
    import tomllib

    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    names = {re.split(r"[<>=!~ \[]", d, maxsplit=1)[0].lower() for d in deps} - {"torch", "triton"}
    pinned = {line.split("==")[0].lower() for line in (ROOT / "constraints.txt").read_text().splitlines() if "==" in line}
    assert names <= pinned, names - pinned
