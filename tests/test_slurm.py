"""slurm/train.sbatch end to end under a fake SLURM: the job's variables set, `srun` and
`scontrol` replaced by small shims, 2 "nodes" on this host (127.0.0.1 and 127.0.0.2 are both
loopback). USR1 before the time limit -> checkpoint, clean exit, `scontrol requeue`; the
restarted job resumes and reproduces the uninterrupted run's losses."""

import json
import os
import signal
import stat
import sys
import textwrap
from pathlib import Path

import pytest

from demo_runs import ROOT, SMALL, STEPS, finish, launch, metrics, reference, same_losses, wait_for_steps
from longctx.launcher.discovery import World, discover, first_host, from_environment

SRUN = '''
    """srun: start SLURM_NNODES x SLURM_NTASKS_PER_NODE tasks here, forward signals, exit with the worst status."""
    import os, signal, subprocess, sys
    args = sys.argv[1:]
    while args[0].startswith("-"):
        args.pop(0)
    nodes, per_node = int(os.environ["SLURM_NNODES"]), int(os.environ["SLURM_NTASKS_PER_NODE"])
    hosts = os.environ["FAKE_SLURM_HOSTS"].split()
    tasks = []
    for rank in range(nodes * per_node):
        env = dict(os.environ, SLURM_PROCID=str(rank), SLURM_LOCALID=str(rank % per_node),
                   SLURM_NODEID=str(rank // per_node), SLURMD_NODENAME=hosts[rank // per_node],
                   SLURM_STEP_NUM_TASKS=str(nodes * per_node), SLURM_STEP_ID="0")
        tasks.append(subprocess.Popen(args, env=env))
    for sig in (signal.SIGUSR1, signal.SIGTERM):
        signal.signal(sig, lambda s, f: [t.send_signal(s) for t in tasks])
    sys.exit(max(t.wait() for t in tasks))
'''
SCONTROL = '''
    """scontrol: `show hostnames LIST` (as FAKE_SLURM_HOSTS says) and `requeue JOBID` (recorded)."""
    import os, sys
    if sys.argv[1:3] == ["show", "hostnames"]:
        print("\\n".join(os.environ["FAKE_SLURM_HOSTS"].split()))
    elif sys.argv[1] == "requeue":
        with open(os.environ["FAKE_SLURM_REQUEUES"], "a") as f:
            f.write(sys.argv[2] + "\\n")
    else:
        sys.exit(f"fake scontrol: {sys.argv[1:]} not faked")
'''


@pytest.mark.parametrize("nodelist, host", [
    ("gpu[03-05,9],cpu1", "gpu03"), ("node7", "node7"), ("a1,b2", "a1"),
    ("rack[2-3]-n[10-12]", "rack2-n10"), ("127.0.0.[1-2]", "127.0.0.1"),
])
def test_first_host_of_a_nodelist(nodelist, host):
    assert first_host(nodelist) == host


def test_srun_task_variables_map_to_a_world():
    step = {"SLURM_PROCID": "9", "SLURM_STEP_NUM_TASKS": "16", "SLURM_LOCALID": "1",
            "SLURM_JOB_NODELIST": "gpu[03-04]", "SLURM_JOB_ID": "123456"}
    assert from_environment(step) == World(9, 16, 1, "gpu03", 20000 + 123456 % 20000, "slurm")
    assert from_environment({**step, "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29500"}).master_port == 29500
    # the batch script itself is no rank: without an srun step there is no world to join
    assert from_environment({k: v for k, v in step.items() if k != "SLURM_STEP_NUM_TASKS"}) is None


@pytest.mark.parametrize("tasks, node, local_size", [("8(x4)", "1", 8), ("2(x2),1", "2", 1), ("3,5", "1", 5)])
def test_srun_tasks_per_node_tell_the_planner_how_many_nodes(monkeypatch, tasks, node, local_size):
    from longctx.launcher.run import job_cluster

    step = {"SLURM_PROCID": "9", "SLURM_STEP_NUM_TASKS": "32", "SLURM_LOCALID": "1", "SLURM_JOB_NODELIST": "gpu[1-4]",
            "SLURM_JOB_ID": "7", "SLURM_STEP_TASKS_PER_NODE": tasks, "SLURM_NODEID": node}
    world = from_environment(step)
    assert world.local_size == local_size and world.as_env()["LOCAL_WORLD_SIZE"] == str(local_size)
    env = dict(step)
    discover(env)
    monkeypatch.setattr(os, "environ", env)  # what a task of this step sees, and nothing of this process's
    cluster = job_cluster(None)
    assert (cluster.nodes, cluster.gpus_per_node) == (32 // local_size, local_size)


def shim(folder: Path, name: str, body: str) -> None:
    path = folder / name
    path.write_text(f"#!{sys.executable}\n" + textwrap.dedent(body))
    path.chmod(path.stat().st_mode | stat.S_IEXEC)


@pytest.fixture
def fake_slurm(tmp_path) -> dict:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    shim(bin_dir, "srun", SRUN)
    shim(bin_dir, "scontrol", SCONTROL)
    return {
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "PYTHON": sys.executable,
        "SLURM_JOB_ID": "4242",
        "SLURM_JOB_NAME": "longctx",
        "SLURM_JOB_NODELIST": "127.0.0.[1-2]",
        "SLURM_NNODES": "2",
        "SLURM_NTASKS": "2",
        "SLURM_NTASKS_PER_NODE": "1",
        "SLURM_SUBMIT_DIR": str(ROOT),
        "FAKE_SLURM_HOSTS": "127.0.0.1 127.0.0.2",
        "FAKE_SLURM_REQUEUES": str(tmp_path / "requeued"),
    }


def sbatch(out: Path, env: dict):
    """What SLURM does with the batch script: run it with the job's variables (no srun around it)."""
    cmd = ["bash", "slurm/train.sbatch", "recipes/demo-cpu.yaml", *SMALL, f"train.out_dir={out}"]
    return launch(cmd, out.parent / f"{out.name}.log", env)


@pytest.mark.slow
def test_sbatch_usr1_checkpoints_requeues_and_the_restart_resumes_exactly(fake_slurm, tmp_path, tmp_path_factory):
    _, ref = reference(tmp_path_factory.getbasetemp())
    out = tmp_path / "run"
    job = sbatch(out, fake_slurm)
    wait_for_steps(out, job, 1)
    job.send_signal(signal.SIGUSR1)  # --signal=B:USR1@300: to the batch shell, which passes it on
    assert finish(job) == 0
    log = (tmp_path / "run.log").read_text()
    stopped = metrics(out)[-1]["step"]
    assert stopped < STEPS, "the signal came too late to test preemption"
    marker = out / "checkpoints" / f"step-{stopped:07d}" / "COMPLETE"
    assert json.loads(marker.read_text())["step"] == stopped
    assert '"status": "preempted"' in log and "master 127.0.0.1:" in log
    assert json.loads((out / "run.json").read_text())["world"] == 2
    assert (tmp_path / "requeued").read_text().split() == ["4242"]

    restarted = sbatch(out, {**fake_slurm, "SLURM_RESTART_COUNT": "1"})
    assert finish(restarted) == 0, (tmp_path / "run.log").read_text()[-3000:]
    assert "start 2" in (tmp_path / "run.log").read_text()
    assert f"resumed from {out / 'checkpoints'}" in (tmp_path / "run.log").read_text()
    same_losses(metrics(out), ref)
    assert (tmp_path / "requeued").read_text().split() == ["4242"]  # a finished job is not requeued
