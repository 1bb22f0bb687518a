"""The `longctx` entry point: command table, help, and exit code 2 for what it cannot run."""

import argparse
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest

from longctx.cli import COMMANDS, ArgParser, main
from longctx.config import schema

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
    for key in schema():
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


def test_bare_longctx_is_a_usage_error_and_version_prints_the_package_version(capsys):
    assert main([]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.startswith("usage: longctx <command>")
    assert captured.err.strip().splitlines()[-1] == "error: longctx: no command given"
    assert main(["--version"]) == 0
    assert capsys.readouterr().out == f"longctx {version('longctx')}\n"


class Parsed(Exception):
    """Raised instead of parsing: the command's parser is built and handed over, nothing runs."""


def command_parsers(monkeypatch, argv: list[str]) -> list[argparse.ArgumentParser]:
    """The parser `longctx *argv` builds, and its subcommands' parsers."""
    built = []

    def capture(self, args=None, namespace=None):
        built.append(self)
        raise Parsed

    monkeypatch.setattr(ArgParser, "parse_known_args", capture)
    with pytest.raises(Parsed):
        main(argv)
    parsers = []
    for p in built:
        parsers.append(p)
        for action in p._actions:
            if isinstance(action, argparse._SubParsersAction):
                parsers += action.choices.values()
    return parsers


@pytest.mark.parametrize("command", list(COMMANDS))
def test_every_option_of_every_command_has_help(monkeypatch, command):
    parsers = command_parsers(monkeypatch, [command])
    assert parsers[0].description == COMMANDS[command][1]  # what `longctx` lists, whichever module builds it
    for parser in parsers:
        bare = [a.dest for a in parser._actions
                if not (a.help and a.help.strip()) and not isinstance(a, argparse._SubParsersAction)]
        assert bare == [], f"{parser.prog}: no help for {bare}"


def test_help_shows_defaults_and_describes_the_command(capsys):
    with pytest.raises(SystemExit) as exit:
        main(["train", "--help"])
    out = capsys.readouterr().out
    assert exit.value.code == 0 and COMMANDS["train"][1] in out and "Entry point on every rank" not in out
    with pytest.raises(SystemExit):
        main(["plan", "--help"])
    out = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert "number of nodes (hosts) (default: 1)" in out and "--gpu-mem" in out and "(default: 80GiB)" in out
    assert "host memory of one node (default: 512GiB, assumed when not given" in out
    assert "(default: None)" not in out and "(default: False)" not in out


def test_plan_says_what_memory_it_assumed_and_what_is_usable(capsys):
    demo = str(ROOT / "recipes/demo-cpu.yaml")
    assert main(["plan", demo, "--gpu-mem", "79.2GiB"]) == 0
    out = capsys.readouterr().out
    assert "per GPU 79.20 GiB, of which 77.20 usable (2.00 reserved" in out
    assert "host memory per node 512.00 GiB (assumed, as --host-mem was not given)" in out
    assert main(["plan", demo, "--host-mem", "64GiB"]) == 0
    assert "host memory per node 64.00 GiB (--host-mem)" in capsys.readouterr().out


def test_keys_shows_default_allowed_values_and_help_within_the_terminal_width(monkeypatch, capsys):
    monkeypatch.setenv("COLUMNS", "80")
    assert main(["keys"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert max(len(line) for line in lines) <= 80
    block = out[out.index("train.checkpointing = auto  (str)"):out.index("train.gpu_checkpoint_layers")]
    assert "    activation checkpointing per decoder layer" in block and "allowed: one of auto|none|full|offload" in block
    assert "train.lr = 0.0002  (float)\n    peak learning rate\n    allowed: > 0.0\n" in out
    assert "lora.dropout = 0.0  (float)\n    adapter dropout\n    allowed: in [0.0, 1.0]\n" in out
    assert "allowed: each of zero_stage|offload|sp|checkpointing" in out and "allowed: each in [0.0, 1.0]" in out
    assert "lora.targets = [q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj]" in out
    assert "model.path = null  (str)" in out and "lora.enabled = false  (bool)" in out


def test_output_cut_short_by_its_reader_is_not_an_error(tmp_path):
    err = tmp_path / "err"
    proc = subprocess.run(["bash", "-c", f"{sys.executable} -m longctx.cli keys 2>{err} | head -1; "
                                         "echo ${PIPESTATUS[0]}"], capture_output=True, text=True, timeout=120)
    first, status = proc.stdout.splitlines()
    assert first.startswith("model.path = ") and status == "0" and err.read_text() == ""
