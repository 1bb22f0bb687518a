"""Training with sequence parallelism through the real launcher (DeepSpeed, gloo, CPU ranks) takes
the same steps as one process: loss, gradient norm and learning rate of every step.

sp=2 inside one node runs in the dp=2 x sp=2 test, sp=2 across two nodes in the multi-node test;
sp=4 is compared with one process in test_sequence_parallel_exact.py. All runs see the same
windows: the sampler gives micro-batch m of step s to window 2s + m with grad_accum=2 on one
data-parallel rank, and to dp rank m with grad_accum=1 on two.
"""

import json
import os
import subprocess
from pathlib import Path

import pytest
from demo_runs import DEEPSPEED, ROOT, TINY, free_port

SMALL = [*TINY, "train.max_steps=2", "train.save_every=0", "eval.at_end=[]"]
ENV = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}

pytestmark = pytest.mark.slow


def run_args(out: Path, *overrides: str) -> list[str]:
    return ["launcher/run.py", "--config", "recipes/demo-cpu.yaml", *SMALL, f"train.out_dir={out}", *overrides]


def finished(procs: list[subprocess.Popen], out: Path) -> list[dict]:
    log = out.with_suffix(".log")
    try:
        codes = [p.wait(timeout=400) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert codes == [0] * len(procs), log.read_text()[-3000:]
    return [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]


def train(out: Path, ranks: int, *overrides: str) -> list[dict]:
    log = out.with_suffix(".log")
    cmd = [DEEPSPEED, "--num_gpus", str(ranks), "--master_port", free_port(), *run_args(out, *overrides)]
    with log.open("w") as f:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=f, stderr=subprocess.STDOUT)
    return finished([proc], out)


def train_two_nodes(out: Path, *overrides: str) -> list[dict]:
    """Two DeepSpeed "nodes" of one rank each, started separately as on two machines (no ssh)."""
    hostfile = out.parent / "hostfile"
    hostfile.write_text("node0 slots=1\nnode1 slots=1\n")
    log, port = out.with_suffix(".log"), free_port()
    procs = []
    with log.open("w") as f:
        for node_rank in (0, 1):
            cmd = [DEEPSPEED, "--hostfile", str(hostfile), "--no_ssh", "--node_rank", str(node_rank),
                   "--master_addr", "127.0.0.1", "--master_port", port, *run_args(out, *overrides)]
            procs.append(subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=f, stderr=subprocess.STDOUT))
    return finished(procs, out)


def same_steps(got: list[dict], reference: list[dict]) -> None:
    assert [r["step"] for r in got] == [r["step"] for r in reference] == [1, 2]
    for x, y in zip(got, reference):
        assert abs(x["loss"] - y["loss"]) <= 1e-5, (x, y)
        assert abs(x["grad_norm"] - y["grad_norm"]) <= 1e-5 * y["grad_norm"], (x, y)
        assert x["lr"] == pytest.approx(y["lr"], rel=1e-12)
        assert x["tokens"] == y["tokens"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> list[dict]:
    rows = train(tmp_path_factory.mktemp("sp1") / "run", 1, "train.grad_accum=2", "train.export=false")
    assert all(r["grad_norm"] > 0 for r in rows)  # it trains: equal steps are not two no-ops
    return rows


def test_dp2_by_sp2_training_equals_one_process(reference, tmp_path):
    out = tmp_path / "run"
    # with activation checkpointing the all-to-alls run again in backward: still the same steps
    overrides = ("parallel.sp=2", "train.grad_accum=1", "train.checkpointing=full", "train.export=false")
    same_steps(train(out, 4, *overrides), reference)
    assert "dp=2 x sp=2, each sp group of consecutive ranks within one node" in out.with_suffix(".log").read_text()


def test_sp_across_two_nodes_trains_the_demo_as_one_process(reference, tmp_path):
    out = tmp_path / "run"
    same_steps(train_two_nodes(out, "parallel.sp=2", "train.grad_accum=2"), reference)
    log = out.with_suffix(".log").read_text()
    assert "Ulysses all-to-all over 2 ranks around longctx_auto (2 heads per rank)" in log
    assert "dp=1 x sp=2, each sp group of consecutive ranks spanning 2 nodes" in log
    # the export is a plain transformers model: the sp wrapper's name stays out of its config
    exported = json.loads((out / "hf" / "config.json").read_text())
    assert "ulysses" not in json.dumps(exported)
    assert (out / "adapter" / "adapter_config.json").exists()


def test_sp_under_zero3_with_offloaded_checkpointing_resumes_exactly(reference, tmp_path):
    """sp=2 with ZeRO-3 partitions, layer inputs in host buffers and the MLP in tiles: the steps
    of one process; run again from its step-1 checkpoint, step 2 comes out the same."""
    out = tmp_path / "run"
    overrides = ("parallel.sp=2", "train.grad_accum=2", "parallel.zero_stage=3", "train.checkpointing=offload",
                 "train.gpu_checkpoint_layers=1", "train.tiled_mlp=always", "train.mlp_tile_tokens=64",
                 "train.save_every=1", "train.export=false")
    same_steps(train(out, 2, *overrides), reference)
    resumed = train(out, 2, *overrides, f"train.resume={out / 'checkpoints' / 'step-0000001'}")
    same_steps(resumed, reference)
    assert "resumed from" in out.with_suffix(".log").read_text()
