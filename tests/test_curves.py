"""Training curves from metrics.jsonl, `longctx curves`, and the DeepSpeed TensorBoard monitor option."""

import csv
import json
import math
import sys
from types import SimpleNamespace

import pytest
from PIL import Image

import longctx.cli
from longctx.config import ConfigError, load_recipe
from longctx.curves import check_tensorboard, log_step, plot_curves
from longctx.launcher.dsconfig import build_ds_config, check_ds_config

BASE = ["model.config=longctx/assets/demo-llama"]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def metrics_rows(steps: int, grad_norm: bool = True) -> list[dict]:
    """A run's rows as train.py writes them: warm-up then cosine lr, a falling noisy loss, a slow first step."""
    rows = []
    for s in range(1, steps + 1):
        lr = 2e-4 * min(1.0, s / 10) * (0.55 + 0.45 * math.cos(math.pi * s / steps))
        tok_s = 4000.0 if s == 1 else 30000.0 + 500 * math.sin(s)
        rows.append({"step": s, "loss": 9.0 * math.exp(-s / 40) + 2.0 + 0.1 * math.sin(7 * s), "lr": lr,
                     "grad_norm": (None if s == 3 else 1.0 + 0.5 * math.cos(s)) if grad_norm else None,
                     "tokens": 8192 * s, "tokens_per_s": tok_s, "step_s": 8192 / tok_s, "peak_mem_gib": 1.25})
    return rows


def write_metrics(run_dir, rows, tail: str = "") -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + tail)


def png_size(path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    with Image.open(path) as image:
        image.verify()  # every chunk's CRC: a whole PNG, not a truncated one
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def test_plot_curves_writes_a_png_of_a_running_job(tmp_path):
    run = tmp_path / "run"
    # a job still running: its last line is half written
    write_metrics(run, metrics_rows(120), tail='{"step": 121, "loss": 2.1, "l')
    out = plot_curves(run / "metrics.jsonl", tmp_path / "figs" / "curves.png")
    assert out == tmp_path / "figs" / "curves.png"
    width, height = png_size(out)
    assert 600 <= width <= 1600 and 600 <= height <= 1600
    assert out.stat().st_size > 20_000  # four panels of lines, not an empty canvas
    assert [p.name for p in out.parent.iterdir()] == ["curves.png"]  # no temporary file left beside it


def test_grad_norm_panel_only_when_the_run_logged_one(tmp_path):
    with_norm = tmp_path / "a"
    without = tmp_path / "b"
    write_metrics(with_norm, metrics_rows(12))
    write_metrics(without, metrics_rows(12, grad_norm=False))
    w1, h1 = png_size(plot_curves(with_norm / "metrics.jsonl", with_norm / "c.png"))
    w2, h2 = png_size(plot_curves(without / "metrics.jsonl", without / "c.png"))
    assert w1 == w2 and h1 > h2  # one panel fewer


def test_cli_draws_run_dir_curves_png_by_default(tmp_path, capsys):
    run = tmp_path / "run"
    write_metrics(run, metrics_rows(5))
    assert longctx.cli.main(["curves", str(run)]) == 0
    assert capsys.readouterr().out.strip() == str(run / "curves.png")
    png_size(run / "curves.png")
    assert longctx.cli.main(["curves", str(run), "--out", str(tmp_path / "x" / "y.png")]) == 0
    png_size(tmp_path / "x" / "y.png")


@pytest.mark.parametrize(
    "case, argv, expected",
    [
        ("no_dir", ["{tmp}/missing"], "error: RUN_DIR {tmp}/missing: no such directory"),
        ("empty_dir", ["{tmp}/run"], "error: RUN_DIR {tmp}/run: no metrics.jsonl in it"),
        ("no_rows", ["{tmp}/run"], "error: RUN_DIR {tmp}/run: metrics.jsonl: no complete rows yet"),
        ("out_is_dir", ["{tmp}/run", "--out", "{tmp}/run"], "error: --out {tmp}/run: is a directory"),
        ("bad_flag", ["{tmp}/run", "--bogus"], "error: longctx curves: unrecognized arguments: --bogus"),
    ],
)
def test_cli_errors_exit_2_with_one_line_and_write_nothing(tmp_path, capsys, case, argv, expected):
    run = tmp_path / "run"
    run.mkdir()
    if case == "no_rows":  # only a line still being written, and a row without the plotted keys
        (run / "metrics.jsonl").write_text('{"step": 1, "loss": 3.0}\n{"step": 2, "lo')
    if case in ("out_is_dir", "bad_flag"):
        write_metrics(run, metrics_rows(3))
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    assert longctx.cli.main(["curves", *(a.format(tmp=tmp_path) for a in argv)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert len(captured.err.strip().splitlines()) == 1
    assert captured.err.startswith(expected.format(tmp=tmp_path))
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before


def test_plot_curves_refuses_a_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        plot_curves(tmp_path / "metrics.jsonl", tmp_path / "c.png")
    assert not (tmp_path / "c.png").exists()


def test_tensorboard_key_adds_a_monitor_section_deepspeed_parses(tmp_path):
    from deepspeed.runtime.config import DeepSpeedConfig

    assert "tensorboard" not in build_ds_config(load_recipe(None, BASE), bf16=False)
    recipe = load_recipe(None, BASE + ["train.tensorboard=true", f"train.out_dir={tmp_path / 'run'}"])
    cfg = build_ds_config(recipe, bf16=False)
    assert cfg["tensorboard"] == {"enabled": True, "output_path": str(tmp_path / "run"), "job_name": "tensorboard"}
    check_ds_config(cfg)
    tb = DeepSpeedConfig(json.loads(json.dumps(cfg))).monitor_config.tensorboard
    assert (tb.enabled, tb.output_path, tb.job_name) == (True, str(tmp_path / "run"), "tensorboard")


def test_check_tensorboard_refuses_a_missing_package_in_one_line(monkeypatch):
    check_tensorboard(load_recipe(None, BASE))  # off: nothing imported, nothing refused
    # what DeepSpeed's TensorBoardMonitor imports, made unimportable (None in sys.modules) as if not installed
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    with pytest.raises(ConfigError) as e:
        check_tensorboard(load_recipe(None, BASE + ["train.tensorboard=true"]))
    message = str(e.value)
    assert "\n" not in message
    assert message.startswith("train.tensorboard=true: ") and "pip install tensorboard" in message


def deepspeed_monitor(monkeypatch, cfg: dict):
    """DeepSpeed's own MonitorMaster for `cfg`, as engine.monitor is, on rank 0 without a process group."""
    import deepspeed.comm
    from deepspeed.monitor.monitor import MonitorMaster
    from deepspeed.runtime.config import DeepSpeedConfig

    monkeypatch.setattr(deepspeed.comm, "get_rank", lambda group=None: 0)
    return MonitorMaster(DeepSpeedConfig(json.loads(json.dumps(cfg))).monitor_config)


def test_log_step_writes_our_rows_through_deepspeeds_monitor(tmp_path, monkeypatch):
    # the csv monitor needs no package and takes the same (tag, value, step) events as TensorBoard's
    cfg = build_ds_config(load_recipe(None, BASE), bf16=False)
    log_step(SimpleNamespace(monitor=deepspeed_monitor(monkeypatch, cfg)), metrics_rows(1)[0])  # off: no-op
    assert not (tmp_path / "csv").exists()
    cfg["csv_monitor"] = {"enabled": True, "output_path": str(tmp_path), "job_name": "csv"}
    engine = SimpleNamespace(monitor=deepspeed_monitor(monkeypatch, cfg))
    rows = metrics_rows(4)
    for row in rows:
        log_step(engine, row)
    for key in ("loss", "lr", "tokens_per_s", "grad_norm"):
        with open(tmp_path / "csv" / f"train_{key}.csv") as f:
            logged = list(csv.reader(f))[1:]
        assert logged == [[str(r["step"]), str(float(r[key]))] for r in rows if r[key] is not None]


def test_log_step_reaches_tensorboard_event_files(tmp_path, monkeypatch):
    pytest.importorskip("torch.utils.tensorboard", exc_type=ImportError)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    recipe = load_recipe(None, BASE + ["train.tensorboard=true", f"train.out_dir={tmp_path}"])
    check_tensorboard(recipe)
    engine = SimpleNamespace(monitor=deepspeed_monitor(monkeypatch, build_ds_config(recipe, bf16=False)))
    rows = metrics_rows(5)
    for row in rows:
        log_step(engine, row)
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    loss = events.Scalars("train/loss")
    assert [e.step for e in loss] == [r["step"] for r in rows]
    assert [e.value for e in loss] == pytest.approx([r["loss"] for r in rows])
    assert len(events.Scalars("train/grad_norm")) == 4  # the step without a norm is left out
