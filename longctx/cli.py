"""`longctx <command> ...`: one entry point; each command lives in its own module.

Every command module exposes `main(argv: list[str]) -> int`. Imports are lazy so that
`longctx rope show` does not pay for DeepSpeed.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from importlib.metadata import version
from typing import Any, NoReturn

from longctx.config import ConfigError

COMMANDS = {
    "train": ("longctx.launcher.run", "train a recipe (one process; use `deepspeed launcher/run.py` for many)"),
    "plan": ("longctx.launcher.plan", "per-GPU and host memory of a recipe: fits?, longest sequence, settings that fit"),
    "keys": ("longctx.keys", "list every recipe key with its default and meaning"),
    "rope": ("longctx.rope_cli", "show a model's RoPE setup, or write a RoPE-scaled copy"),
    "eval": ("longctx.evaluation.cli", "ppl | needle | middle: long-context evaluation"),
    "chunk": ("longctx.chunking", "split documents into token windows or semantic chunks"),
    "count-tokens": ("longctx.token_count", "tokens per file and how many documents exceed given lengths"),
    "model": ("longctx.model_import", "import a model (a GGUF file or a packaged one) as a Hugging Face directory"),
    "curves": ("longctx.curves", "draw a run's loss, lr and tokens/s against step (RUN_DIR/curves.png)"),
}


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends an option's default to its help where the default says something (not unset, off, or
    written in the help as `default: ...`)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        help = action.help or ""
        if action.default is None or action.default is False or action.default == [] or "default:" in help:
            return help
        return super()._get_help_string(action)


class ArgParser(argparse.ArgumentParser):
    """argparse whose bad arguments become a ConfigError: one line and exit code 2, no usage block.

    `longctx <command> --help` opens with the line `longctx` lists for the command, whichever module
    builds the parser: `train`'s is launcher/run.py, whose own text is about deepspeed's entry point."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)
        command = self.prog.removeprefix("longctx ")
        if command in COMMANDS:
            self.description = COMMANDS[command][1]

    def error(self, message: str) -> NoReturn:
        raise ConfigError(f"{self.prog}: {message}")


def usage() -> str:
    lines = ["usage: longctx <command> [args]     (longctx <command> --help: its arguments)",
             "       longctx --version", "", "commands:"]
    lines += [f"  {name:<13} {text}" for name, (_, text) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv:  # a bare `longctx` names no command: a usage error, as for any command missing its arguments
        print(usage() + "\n\nerror: longctx: no command given", file=sys.stderr)
        return 2
    if argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    if argv[0] == "--version":
        print(f"longctx {version('longctx')}")
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"error: unknown command {name!r}; allowed: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    try:
        return module.main(rest)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # the reader stopped early (`longctx keys | head`): not an error of ours
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the exit's flush writes nowhere
        return 0


if __name__ == "__main__":
    sys.exit(main())
