"""bench/extension.py, the study that makes BENCHMARKS.md's real-model table, end to end on the tiny model: rows
without training, trained rows through `deepspeed launcher/run.py` (one CPU rank) resumed to a second step count,
the table and the PNGs; then a training run that fails leaves the rows before it and one line of error."""

import json
import os
import subprocess
import sys

from demo_runs import CPU_ENV, ROOT

# the tiny model's context is 256 tokens: the study stretches it to 512 (factor 2)
RECIPE = """
model: {path: unused}
rope: {method: auto}
data: {seq_len: 512, max_documents: 30, passkey_documents: 8, num_proc: 1}
train: {max_steps: 1, lr: 1.0e-3, warmup_steps: 1, save_every: 1, out_dir: unused}
parallel: {zero_stage: 2}
lora: {enabled: false}
"""
SMALL_EVAL = ["--ppl-lengths", "256,512", "--needle-lengths", "256,512", "--depths", "0,1", "--trials", "1"]


def study(tiny_model_dir, tmp_path, *args: str) -> subprocess.CompletedProcess:
    (tmp_path / "recipe.yaml").write_text(RECIPE)
    cmd = [sys.executable, "bench/extension.py", "--model", str(tiny_model_dir), "--out", str(tmp_path / "ext"),
           "--recipe", str(tmp_path / "recipe.yaml"), *SMALL_EVAL, *args]
    return subprocess.run(cmd, cwd=ROOT, env={**os.environ, **CPU_ENV}, capture_output=True, text=True, timeout=600)


def test_rows_before_and_after_training_then_a_failed_run_keeps_them(tiny_model_dir, tmp_path):
    done = study(tiny_model_dir, tmp_path, "--stage", "all", "--methods", "yarn", "--steps", "1,2")
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    out = tmp_path / "ext"
    result = json.loads((out / "extension.json").read_text())
    assert result["factor"] == 2 and result["seq_len"] == 512
    rows = result["rows"]
    assert list(rows) == ["dynamic", "yarn", "yarn+1", "yarn+2"]  # dynamic: evaluation-only, always a base row
    for label, row in rows.items():
        assert set(row["ppl"]) == {"256", "512"} and all(v > 1 for v in row["ppl"].values()), label
        assert set(row["passkey"]) == {"256", "512"}, label
        assert (out / "needle" / label / "needle.png").is_file(), label
        assert row["device"] == "cpu" and len(row["date"]) == 10, label
    # the second step count resumed the first run: one metrics line per step, tokens counted once
    assert (rows["yarn+1"]["tokens"], rows["yarn+2"]["tokens"]) == (512, 1024)
    steps = [json.loads(line)["step"] for line in (out / "runs" / "yarn" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2]
    table = (out / "extension.md").read_text().splitlines()
    assert [line.split(" | ")[0].lstrip("| ") for line in table[2:]] == list(rows)
    assert all(line.endswith(" | cpu |") for line in table[2:])
    assert (out / "ppl.png").stat().st_size > 10_000

    # preflight refuses the next run (the model has 4 layers), after the study has validated the recipe
    failed = study(tiny_model_dir, tmp_path, "--stage", "train", "--methods", "yarn", "--steps", "1", "--label", "bad",
                   "train.checkpointing=offload", "train.gpu_checkpoint_layers=9")
    assert failed.returncode == 1, failed.stderr[-3000:]
    results = out / "extension.json"
    assert failed.stderr.strip().splitlines()[-1] == (
        f"error: the training run yarn-bad to 1 steps exited 2 (its log is above); the rows before it are in {results}")
    assert "Traceback" not in failed.stderr
    assert json.loads(results.read_text())["rows"] == rows
