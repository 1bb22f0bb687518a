"""`longctx keys`: every recipe key, its default and what it means."""

from __future__ import annotations

from longctx.config import describe_keys


def main(argv: list[str]) -> int:
    for key, default, help in describe_keys():
        print(f"{key:<28} {str(default):<12} {help}")
    return 0
