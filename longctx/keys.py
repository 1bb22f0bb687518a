"""`longctx keys`: every recipe key, its default, what it means and the values it takes."""

from __future__ import annotations

import shutil
import textwrap
from typing import Any, Literal, get_args, get_origin

from longctx.cli import ArgParser
from longctx.config import choices, default_of, key_type, schema


def allowed(key: str, meta: dict) -> str:
    """What validation accepts, in the words of its errors: `one of a|b`, `>= 1`, `each in [0.0, 1.0]`."""
    parts = []
    found = choices(key)
    if found:
        parts.append(("each of " if found[1] else "one of ") + "|".join(str(c) for c in found[0]))
    if "min" in meta and "max" in meta:
        parts.append(f"in {'(' if meta.get('exclusive_min') else '['}{meta['min']}, {meta['max']}]")
    elif "min" in meta:
        parts.append(f"{'>' if meta.get('exclusive_min') else '>='} {meta['min']}")
    elif "max" in meta:
        parts.append(f"<= {meta['max']}")
    if "each_min" in meta and "each_max" in meta:
        parts.append(f"each in [{meta['each_min']}, {meta['each_max']}]")
    elif "each_min" in meta:
        parts.append(f"each >= {meta['each_min']}")
    return ", ".join(parts)


def as_override(value: Any) -> str:
    """A default as one would type it in `key=value`: null, true, [a, b]."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list):
        return "[" + ", ".join(as_override(v) for v in value) + "]"
    return str(value)


def kind(key: str) -> str:
    """The type as a user writes values: a Literal's by its values' type (str, int), lists by their items'."""
    t = key_type(key)
    item = get_args(t)[0] if get_origin(t) is list else None
    name = lambda x: type(get_args(x)[0]).__name__ if get_origin(x) is Literal else x.__name__  # noqa: E731
    return f"list[{name(item)}]" if item is not None else name(t)


def main(argv: list[str]) -> int:
    ArgParser(prog="longctx keys").parse_args(argv)
    # key and default on one line, help and allowed values indented below: a long default or help
    # wraps inside its own block instead of pushing the next column out of line
    width = max(40, min(shutil.get_terminal_size().columns, 100))
    section = None
    for key, f in schema().items():
        if section not in (None, key.split(".")[0]):
            print()
        section = key.split(".")[0]
        print(textwrap.fill(f"{key} = {as_override(default_of(f))}  ({kind(key)})", width, subsequent_indent=" " * 8))
        rule = allowed(key, f.metadata)
        for line in (f.metadata.get("help", ""), f"allowed: {rule}" if rule else ""):
            if line:
                print(textwrap.fill(line, width, initial_indent=" " * 4, subsequent_indent=" " * 4))
    return 0
