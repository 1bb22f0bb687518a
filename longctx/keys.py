"""`longctx keys`: every recipe key, its default and what it means."""

from __future__ import annotations

from longctx.cli import ArgParser
from longctx.config import describe_keys


def main(argv: list[str]) -> int:
    ArgParser(prog="longctx keys", description=__doc__.splitlines()[0]).parse_args(argv)
    for key, default, help in describe_keys():
        print(f"{key:<28} {str(default):<12} {help}")
    return 0
