"""The `longctx` entry point: command table, help, and exit code 2 for what it cannot run."""

import subprocess
import sys
from pathlib import Path

from longctx.cli import COMMANDS, main
from longctx.config import _all_keys

ROOT = Path(__file__).resolve().parents[1]


def test_unknown_command_exits_2_and_lists_the_commands(capsys):
    assert main(["trian"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: unknown command 'trian'") and "train" in err and len(err.splitlines()) == 1


def test_help_lists_every_command(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in COMMANDS)


def test_keys_lists_every_recipe_key_with_its_help(capsys):
    assert main(["keys"]) == 0
    out = capsys.readouterr().out
    for key in _all_keys():
        assert key in out
    assert "train.save_every" in out and "checkpoint every N steps" in out
    assert main(["keys", "--bogus"]) == 2
    assert capsys.readouterr().err.strip() == "error: longctx keys: unrecognized arguments: --bogus"


def test_console_script_train_validates_like_the_launcher(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "longctx.cli", "train", "--config", "recipes/demo-cpu.yaml", "train.seed=-3"],
        capture_output=True, text=True, timeout=120, cwd=ROOT,
    )
    assert proc.returncode == 2 and proc.stderr.strip() == "error: train.seed=-3: must be >= 0"
