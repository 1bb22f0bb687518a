"""`longctx <command> ...`: one entry point; each command lives in its own module.

Every command module exposes `main(argv: list[str]) -> int`. Imports are lazy so that
`longctx rope show` does not pay for DeepSpeed.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import NoReturn

from longctx.config import ConfigError

COMMANDS = {
    "train": ("longctx.launcher.run", "train a recipe (one process; use `deepspeed launcher/run.py` for many)"),
    "plan": ("longctx.launcher.plan", "per-GPU and host memory of a recipe: fits?, longest sequence, settings that fit"),
    "keys": ("longctx.keys", "list every recipe key with its default and meaning"),
    "rope": ("longctx.rope_cli", "show a model's RoPE setup, or write a RoPE-scaled copy"),
    "eval": ("longctx.evaluation.cli", "ppl | needle | middle: long-context evaluation"),
    "chunk": ("longctx.chunking", "split documents into token windows or semantic chunks"),
    "count-tokens": ("longctx.token_count", "tokens per file and how many documents exceed given lengths"),
}


class ArgParser(argparse.ArgumentParser):
    """argparse whose bad arguments become a ConfigError: one line and exit code 2, no usage block."""

    def error(self, message: str) -> NoReturn:
        raise ConfigError(f"{self.prog}: {message}")


def usage() -> str:
    lines = ["usage: longctx <command> [args]", "", "commands:"]
    lines += [f"  {name:<13} {text}" for name, (_, text) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
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


if __name__ == "__main__":
    sys.exit(main())
