"""Short 2-rank demo runs shared by the launcher tests (DeepSpeed, MPI, SLURM, sequence
parallel): starting, waiting, reading metrics, and the uninterrupted `mpirun` run that every
interrupted-and-resumed one must reproduce."""

import functools
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
DEEPSPEED = str(BIN / "deepspeed")
STEPS = 10
# the demo recipe at test size, which every multi-rank test starts from
TINY = [
    "data.seq_len=256",
    "data.max_documents=30",
    "data.passkey_documents=8",
    "data.num_proc=1",
    "train.warmup_steps=1",
    "lora.enabled=true",
    "rope.target_length=1024",
]
SMALL = [*TINY, f"train.max_steps={STEPS}", "train.save_every=0", "train.export=false", "eval.at_end=[]"]
CPU_ENV = {"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def free_port() -> str:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def launch(cmd: list[str], log: Path, env: dict | None = None) -> subprocess.Popen:
    out = open(log, "a")
    return subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, **CPU_ENV, **(env or {})}, stdout=out,
                            stderr=subprocess.STDOUT, start_new_session=True)


def finish(proc: subprocess.Popen, timeout: float = 300) -> int:
    try:
        return proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


def metrics(out: Path) -> list[dict]:
    path = out / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def wait_for_steps(out: Path, proc: subprocess.Popen, n: int) -> None:
    deadline = time.time() + 240
    while len(metrics(out)) < n:
        assert proc.poll() is None, "run ended before the signal"
        assert time.time() < deadline
        time.sleep(0.05)


def mpirun(out: Path, *overrides: str) -> subprocess.Popen:
    cmd = [str(BIN / "mpirun"), "-n", "2", sys.executable, "launcher/run.py", "--config", "recipes/demo-cpu.yaml",
           *SMALL, f"train.out_dir={out}", *overrides]
    return launch(cmd, out.parent / f"{out.name}.log")


@functools.cache
def reference(root: Path) -> tuple[Path, list[dict]]:
    """The uninterrupted run, started by `mpirun -n 2` (computed once per session)."""
    out = root / "mpi-reference"
    rc = finish(mpirun(out))
    assert rc == 0, (root / "mpi-reference.log").read_text()[-3000:]
    return out, metrics(out)


def same_losses(a: list[dict], b: list[dict]) -> None:
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for x, y in zip(a, b):
        assert abs(x["loss"] - y["loss"]) <= 1e-6, (x, y)
        assert abs(x["grad_norm"] - y["grad_norm"]) <= 1e-5 * max(1.0, x["grad_norm"]), (x, y)
        assert abs(x["lr"] - y["lr"]) <= 1e-12 * abs(y["lr"]), (x, y)
