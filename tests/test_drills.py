"""Faults on purpose: each way a long run dies, made to happen on CPU ranks (gloo), and what the run keeps.

Faults come from the real world where a test can make them (signals, a full filesystem, flipped bytes, a
process started without its peer) and otherwise through LONGCTX_FAULT (`longctx/fault_injection.py`): a
chosen fault at a chosen point of a chosen step on a chosen rank. `pytest -m drill` runs these alone; the
README's "When things go wrong" has the table of what the user sees.
"""

import json
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from demo_runs import CPU_ENV, DEEPSPEED, ROOT, finish, free_port, launch, metrics, same_losses

from longctx.checkpoint import MARKER, _load_trained, complete_checkpoints
from longctx.config import ConfigError, load_recipe
from longctx.model import load_model

pytestmark = [pytest.mark.drill, pytest.mark.slow]

DEMO = "recipes/demo-cpu.yaml"
STEPS = 6
RUN = [
    "data.seq_len=256", "data.max_documents=8", "data.passkey_documents=4", "data.num_proc=1",
    f"train.max_steps={STEPS}", "train.save_every=2", "train.warmup_steps=1", "train.export=false", "eval.at_end=[]",
    "lora.enabled=true", "lora.dropout=0.1",  # random masks: a resume reproduces the losses only with every RNG
    "rope.target_length=1024", "parallel.timeout_s=20",
]


def command(out: Path, *overrides: str, ranks: int, launcher: list[str] | None = None) -> list[str]:
    """2 ranks through the deepspeed launcher, or a world of one (`python launcher/run.py`, half the time on 2
    cores) for the drills whose fault needs no second rank; or the `launcher` given."""
    if launcher is None:
        launcher = [DEEPSPEED, "--num_gpus", "2", "--master_port", free_port()] if ranks == 2 else [sys.executable]
    return [*launcher, "launcher/run.py", "--config", DEMO, *RUN, f"train.out_dir={out}", *overrides]


def run(out: Path, *overrides: str, fault: str = "", ranks: int = 2, launcher: list[str] | None = None,
        env: dict[str, str] | None = None) -> tuple[int, str]:
    """A job's exit status and log."""
    log = out.parent / f"{out.name}.log"
    start = log.stat().st_size if log.exists() else 0
    rc = finish(launch(command(out, *overrides, ranks=ranks, launcher=launcher), log,
                       {"LONGCTX_FAULT": fault, **(env or {})}))
    return rc, log.read_text()[start:]


def error_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("error: ")]


def steps_of(out: Path) -> list[int]:
    return [int(p.name.removeprefix("step-")) for p in complete_checkpoints(out / "checkpoints")]


def uninterrupted(root: Path, ranks: int) -> tuple[Path, list[dict]]:
    out = root / "run"
    rc, log = run(out, ranks=ranks)
    assert rc == 0, log[-3000:]
    return out, metrics(out)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> tuple[Path, list[dict]]:
    """The uninterrupted 2-rank run every interrupted one must reproduce."""
    return uninterrupted(tmp_path_factory.mktemp("reference"), ranks=2)


@pytest.fixture(scope="module")
def reference_alone(tmp_path_factory) -> tuple[Path, list[dict]]:
    """The same in a world of one."""
    return uninterrupted(tmp_path_factory.mktemp("reference-alone"), ranks=1)


# 1
def test_killed_while_writing_a_checkpoint_resumes_from_the_last_complete_one(reference, tmp_path):
    out = tmp_path / "run"
    for point in ("checkpoint-states", "checkpoint-rng"):  # SIGKILL of rank 0 while it writes step 4
        rc, log = run(out, "train.keep_checkpoints=1", fault=f"kill:{point}:4:0")
        assert rc != 0, log[-3000:]
        # the new checkpoint has no marker; keep_checkpoints=1 did not delete the one before it
        assert steps_of(out) == [2], (point, log[-3000:])
    rc, log = run(out, "train.keep_checkpoints=1", fault="kill:checkpoint-marker:4:0")
    assert rc != 0
    assert steps_of(out) == [2, 4]  # killed after the marker, before the rotation: both stay complete
    assert json.loads((out / "checkpoints" / "step-0000004" / MARKER).read_text())["step"] == 4
    rc, log = run(out, "train.keep_checkpoints=1")
    assert rc == 0 and "resumed from" in log and "step-0000004 at step 4" in log, log[-3000:]
    same_losses(metrics(out), reference[1])
    assert steps_of(out) == [6]


# 2
def test_disk_full_while_saving_keeps_the_previous_checkpoint_and_resumes_exactly(reference_alone, tmp_path):
    ref_out, ref_rows = reference_alone
    ckpt = sum(p.stat().st_size for p in complete_checkpoints(ref_out / "checkpoints")[0].iterdir())
    data = sum(p.stat().st_size for p in (ref_out / "data").rglob("*") if p.is_file())
    size = data + ckpt * 3 // 2 + (1 << 20)  # room for the data, one checkpoint and half of the next
    mnt, out = tmp_path / "small", tmp_path / "small" / "run"
    mnt.mkdir()
    cmd = " ".join(command(out, ranks=1))
    script = (f"mount -t tmpfs -o size={size} tmpfs {mnt} && cd {ROOT} && "
              f"{{ {cmd} > {tmp_path}/full.log 2>&1; echo $? > {tmp_path}/full.rc; }} && "
              f"cp -a {out} {tmp_path}/after-full && "
              f"mount -o remount,size=512m {mnt} && "  # space freed
              f"{{ {cmd} > {tmp_path}/resumed.log 2>&1; echo $? > {tmp_path}/resumed.rc; }}; "
              f"cp -a {out} {tmp_path}/after-resume")
    if shutil.which("unshare") is None or subprocess.run(["unshare", "-rm", "true"]).returncode != 0:
        pytest.skip("needs a mount namespace of its own (unshare -rm) for the small filesystem")
    proc = subprocess.run(["unshare", "-rm", "sh", "-c", script], env={**os.environ, **CPU_ENV}, timeout=400,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    full_log = (tmp_path / "full.log").read_text()
    assert (tmp_path / "full.rc").read_text().strip() != "0", full_log[-3000:]
    line = next(line for line in error_lines(full_log) if "no space left" in line)
    assert f"no space left on the device of {out}/checkpoints/step-0000004" in line, line
    needed = int(re.search(r"a checkpoint needs about ([\d,]+) bytes", line).group(1).replace(",", ""))
    assert abs(needed - ckpt) < 0.01 * ckpt and f"{out}/checkpoints/step-0000002 is intact" in line, line
    assert "Traceback" not in full_log
    kept = tmp_path / "after-full"
    assert steps_of(kept) == [2] and not (kept / "checkpoints" / "step-0000004").exists()
    resumed_log = (tmp_path / "resumed.log").read_text()
    assert (tmp_path / "resumed.rc").read_text().strip() == "0", resumed_log[-3000:]
    same_losses(metrics(tmp_path / "after-resume"), ref_rows)


# 3
def test_a_nonfinite_step_is_skipped_and_counted_with_on_nonfinite_skip(tmp_path):
    out = tmp_path / "run"
    rc, log = run(out, "train.on_nonfinite=skip", fault="nan:loss:3,inf:backward:5", ranks=1)
    assert rc == 0, log[-3000:]
    rows = metrics(out)
    assert [r["skipped_steps"] for r in rows] == [0, 0, 1, 1, 2, 2]
    assert rows[2]["loss"] != rows[2]["loss"]  # NaN: the loss of step 3 as it was
    assert rows[4]["grad_norm"] == float("inf")  # step 5: a finite loss, infinite gradients
    states = torch.load(out / "checkpoints" / "step-0000006" / "mp_rank_00_model_states.pt", weights_only=False)
    assert all(t.isfinite().all() for t in states["module"].values())


def test_a_nonfinite_step_stops_the_run_by_default_without_a_checkpoint_of_it(tmp_path):
    out = tmp_path / "run"
    rc, log = run(out, fault="nan:loss:3", ranks=1)
    assert rc == 1, log[-3000:]
    line, = error_lines(log)
    assert line.startswith("error: step 3: loss nan") and "train.on_nonfinite=skip" in line, line
    assert f"{out}/checkpoints/step-0000002, is intact" in line
    assert "Traceback" not in log
    assert steps_of(out) == [2] and not list((out / "checkpoints").glob("step-0000003*"))


# 4
def start_rank(rank: int, out: Path, port: str, fault: str) -> subprocess.Popen:
    """A rank started on its own, as by a launcher that does not end the others when one dies."""
    env = {"RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": "2",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "LONGCTX_FAULT": fault}
    return launch([sys.executable, "launcher/run.py", "--config", DEMO, *RUN, f"train.out_dir={out}"],
                  out.parent / f"rank{rank}.log", env)


def ranks_alone(out: Path, fault: str) -> tuple[int, float, str]:
    """Rank 0's exit status, seconds from rank 1's fault to rank 0's end, and rank 0's log."""
    port = free_port()
    ranks = [start_rank(r, out, port, fault) for r in (0, 1)]
    try:
        progress = out / "progress" / "rank1"
        deadline = time.time() + 240
        while not (progress.exists() and '"step": 3, "point": "forward"' in progress.read_text()):
            assert ranks[0].poll() is None and time.time() < deadline, (out.parent / "rank0.log").read_text()[-3000:]
            time.sleep(0.05)
        at_fault = time.time()
        rc = finish(ranks[0], timeout=120)
        return rc, time.time() - at_fault, (out.parent / "rank0.log").read_text()
    finally:
        for proc in ranks:  # the hung rank: what a launcher does once rank 0 has exited
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def test_a_rank_that_dies_mid_step_ends_the_others_and_the_job_resumes_exactly(reference, tmp_path):
    out = tmp_path / "run"
    rc, waited, log = ranks_alone(out, "exit:forward:3:1")
    assert rc == 1 and waited < 20, (waited, log[-3000:])  # gloo sees the connection drop: no wait for the timeout
    line, = error_lines(log)
    assert line.startswith("error: rank 0 at step 3 ") and "lost its peer" in line, line
    assert "behind: rank 1 (last at step 3 forward)" in line, line
    assert "Traceback" not in log
    assert steps_of(out) == [2]
    rc, log = run(out)
    assert rc == 0, log[-3000:]
    same_losses(metrics(out), reference[1])


# 5
def test_a_hung_rank_ends_the_job_after_the_timeout_naming_it(tmp_path):
    out = tmp_path / "run"
    rc, waited, log = ranks_alone(out, "hang:forward:3:1")
    assert rc == 1 and 15 < waited < 60, (waited, log[-3000:])  # parallel.timeout_s=20
    line, = error_lines(log)
    assert line.startswith("error: rank 0 at step 3 ") and "timed out after parallel.timeout_s=20 s" in line, line
    assert "behind: rank 1 (last at step 3 forward)" in line, line
    assert "Traceback" not in log
    assert steps_of(out) == [2]


# 6
def test_a_damaged_checkpoint_is_named_and_the_previous_one_used_only_when_asked(reference_alone, tmp_path):
    ref_out, ref_rows = reference_alone
    out = tmp_path / "run"
    shutil.copytree(ref_out, out)
    shard = out / "checkpoints" / "step-0000006" / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped bit pattern in the tensor data: torch.load would not notice
    shard.write_bytes(data)
    rc, log = run(out, "train.max_steps=8", ranks=1)  # train.resume=auto
    assert rc == 2, log[-3000:]
    line, = error_lines(log)
    assert line == (f"error: train.resume=auto: checkpoint {out}/checkpoints/step-0000006 does not load: {shard} is "
                    f"damaged (its checksum differs from the one recorded when it was written); to go on from the "
                    f"previous complete checkpoint, run with train.resume={out}/checkpoints/step-0000004"), line
    assert steps_of(out) == [4, 6] and (out / "metrics.jsonl").read_text() == (ref_out / "metrics.jsonl").read_text()

    rc, log = run(out, f"train.resume={out}/checkpoints/step-0000004", ranks=1)  # told to: it goes on from step 4
    assert rc == 0, log[-3000:]
    same_losses(metrics(out), ref_rows)

    model = out / "checkpoints" / "step-0000006" / "mp_rank_00_model_states.pt"
    model.write_bytes(model.read_bytes()[:1000])  # a file cut short
    rc, log = run(out, f"train.resume={out}/checkpoints/step-0000006", "train.max_steps=8", ranks=1)
    assert rc == 2, log[-3000:]
    line, = error_lines(log)
    assert f"does not load: {model} is cut short (1,000 of " in line, line


def test_a_lora_checkpoint_holds_the_trained_weights_only_and_resumes_on_the_same_base_only(reference_alone,
                                                                                           tmp_path):
    """The frozen base is not written (a 70B base in 4 bits would be 37 GB a checkpoint): a resume rebuilds it
    from the recipe, so the seed a random base was built with is part of the checkpoint's identity, and a load
    that lacks a trained weight fails."""
    ref_out, _ = reference_alone
    saved = torch.load(ref_out / "checkpoints" / "step-0000006" / "mp_rank_00_model_states.pt",
                       weights_only=False)["module"]
    model, _ = load_model(load_recipe(DEMO, RUN), torch.device("cpu"))
    trained = {name for name, p in model.named_parameters() if p.requires_grad}
    # the engine's module is the loss wrapper, whose model is `lm`
    assert set(saved) == {f"lm.{name}" for name in trained} and len(trained) < len(model.state_dict())

    lacking = {k.removeprefix("lm."): v for k, v in saved.items() if k != f"lm.{min(trained)}"}
    _load_trained({**lacking, min(trained): saved[f"lm.{min(trained)}"]}, model)
    with pytest.raises(RuntimeError, match=rf"^module states lack {re.escape(min(trained))}$"):
        _load_trained(lacking, model)
    with pytest.raises(RuntimeError, match=r"^module states hold lm\.extra, which the model does not have$"):
        _load_trained({**lacking, min(trained): saved[f"lm.{min(trained)}"], "lm.extra": torch.zeros(1)}, model)

    out = tmp_path / "run"
    shutil.copytree(ref_out, out)
    rc, log = run(out, "train.seed=1", "train.max_steps=8", ranks=1)
    assert rc == 2, log[-3000:]
    line, = error_lines(log)
    assert "was written with train.seed=0, this run has train.seed=1;" in line, line


# 7
def test_a_bad_record_deep_in_a_large_data_file_is_found_before_training(tmp_path):
    data, out = tmp_path / "large.jsonl", tmp_path / "run"
    record = json.dumps({"text": "def f(x):\n    return x * 2\n" * 20})
    lines = [record] * 200_000
    lines[187_654] = record[:-1]  # one record cut short, near the end of 110 MB
    data.write_text("\n".join(lines) + "\n")
    began = time.time()
    rc, log = run(out, f"data.path={data}", ranks=1)
    assert rc == 2, log[-3000:]
    line, = error_lines(log)
    assert f"{data}:187655: not valid JSON" in line, line
    assert not out.exists()  # before anything was written: no run directory, no tokenising
    assert time.time() - began < 120


# 8
def test_preempted_three_times_the_losses_equal_an_uninterrupted_run(reference_alone, tmp_path):
    out = tmp_path / "run"
    for step in (1, 3, 4):  # SIGUSR1, as SLURM warns a job; each start is the requeued job
        rc, log = run(out, "train.save_every=0", fault=f"usr1:batch:{step}", ranks=1)
        assert rc == 0 and '"status": "preempted"' in log, log[-3000:]
        assert steps_of(out)[-1] == step
    rc, log = run(out, "train.save_every=0", ranks=1)
    assert rc == 0 and '"status": "finished"' in log, log[-3000:]
    same_losses(metrics(out), reference_alone[1])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_sigusr1_preempts_a_cuda_rank_under_the_deepspeed_launcher(tmp_path):
    """Drill 8's signal where a GPU job gets it: a CUDA rank (NCCL, our kernels) started by the deepspeed launcher.
    A 300-step SmolLM2 LoRA run on an H100 trained on through this fault in step 150 (after the checkpoints of
    steps 50 and 100), where CPU runs of that schedule and of this test stop."""
    out = tmp_path / "run"
    runner = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "1", "--master_port", free_port()]
    # in step 3, after the periodic checkpoint of step 2, as that run's signal came after checkpoints
    rc, log = run(out, fault="usr1:batch:3", ranks=1, launcher=runner, env={"DS_ACCELERATOR": "cuda"})
    assert rc == 0 and '"status": "preempted", "step": 3' in log, log[-3000:]
    assert steps_of(out)[-1] == 3


# 9
class Planted:
    """A pickled object that writes a file when unpickled: what a malicious pytorch_model.bin does."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (Path.write_text, (Path(self.path), "code ran"))


def model_dir_with(tmp_path: Path, demo_dir: Path, **config) -> Path:
    model = tmp_path / "model"
    shutil.copytree(demo_dir, model)
    (model / "config.json").write_text(json.dumps({**json.loads((demo_dir / "config.json").read_text()), **config}))
    return model


def test_a_model_that_needs_remote_code_is_refused_unless_trusted(tmp_path, demo_dir):
    from longctx.preflight import check_inputs

    ran = tmp_path / "ran"
    model = model_dir_with(tmp_path, demo_dir, model_type="drill-llama",
                           auto_map={"AutoConfig": "configuration_drill.DrillConfig"})
    (model / "configuration_drill.py").write_text(
        f"from pathlib import Path\nfrom transformers import LlamaConfig\nPath({str(ran)!r}).write_text('code ran')\n\n"
        f"class DrillConfig(LlamaConfig):\n    model_type = 'drill-llama'\n")
    overrides = [f"model.config={model}", f"train.out_dir={tmp_path / 'run'}"]
    with pytest.raises(ConfigError) as refused:
        check_inputs(load_recipe(DEMO, overrides))
    assert str(refused.value) == (f"model.config={str(model)!r}: its config.json names Python code in the directory "
                                  f"(configuration_drill.DrillConfig); it runs only with model.trust_remote_code=true "
                                  f"(allowed: true|false; default false)")
    assert not ran.exists()
    check_inputs(load_recipe(DEMO, [*overrides, "model.trust_remote_code=true"]))
    assert ran.read_text() == "code ran"


def test_pickled_weights_load_only_as_tensors(tmp_path, demo_dir):
    from longctx.preflight import check_trusted

    planted = tmp_path / "planted"
    model = model_dir_with(tmp_path, demo_dir)
    weights = model / "pytorch_model.bin"
    recipe = load_recipe(DEMO, [f"model.path={model}", f"train.out_dir={tmp_path / 'run'}"])
    torch.save({"lm_head.weight": torch.zeros(2, 2), "step": 3}, weights)  # tensors and plain data load
    check_trusted(recipe)
    torch.save({"lm_head.weight": Planted(str(planted))}, weights)
    with pytest.raises(ConfigError, match=r"pytorch_model.bin does not load as tensors and plain data, so it is "
                                          r"not loaded at all \(.*\); use safetensors weights"):
        check_trusted(recipe)
    assert not planted.exists()
    with pytest.raises(pickle.UnpicklingError):  # what the refusal protects from: it runs only without weights_only
        torch.load(weights, weights_only=True)
    torch.load(weights, weights_only=False)
    assert planted.read_text() == "code ran"


# 10
def test_out_of_memory_mid_run_says_which_step_and_keeps_the_checkpoint(tmp_path):
    """On CPU the GPU's error is raised where a step allocates (LONGCTX_FAULT=oom): the same exception type and
    message torch gives on a GPU; the planner's prediction is printed on GPUs only."""
    out = tmp_path / "run"
    rc, log = run(out, fault="oom:forward:3", ranks=1)
    assert rc == 1, log[-3000:]
    line, = error_lines(log)
    assert line.startswith("error: step 3: out of memory on rank 0 (Tried to allocate 2.00 GiB; 256 tokens per "
                           "micro-batch)"), line
    assert f"the last checkpoint, {out}/checkpoints/step-0000002, is intact" in line, line
    assert "Traceback" not in log
    assert steps_of(out) == [2]
