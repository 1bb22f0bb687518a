"""`longctx rope show MODEL_DIR` and `longctx rope scale MODEL_DIR --target N --out DIR`.

`scale` writes a copy of the model directory whose config carries the scaling (weights
linked, or copied with --copy): inference-time context extension without training.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import sys
from dataclasses import fields
from pathlib import Path
from typing import Callable

from transformers import PretrainedConfig

from longctx import rope
from longctx.cli import ArgParser
from longctx.config import ConfigError, RopeSection

PARAM_FLAGS = ("factor", "theta", "beta_fast", "beta_slow", "mscale", "mscale_all_dim", "attention_factor",
               "low_freq_factor", "high_freq_factor")
LIST_FLAGS = ("short_factor", "long_factor")
# recipe keys in rope's messages whose flag has another name
FLAG_NAMES = {"target_length": "target"}
# advice in rope's messages with no flag to match: the recipe keeps a model's own scaling with
# rope.method=none, while `scale` always writes one (the model as it is needs no copy)
CLI_ADVICE = {"Keep it with rope.method=none": "Keep it by using the model as it is (no `rope scale`)"}


def parse_length(text: str) -> int:
    """One length, written as `longctx eval` reads them: `131072`, `128k`, `1m` (k = 1024)."""
    from longctx.evaluation.common import parse_lengths

    try:
        (length,) = parse_lengths(text)
    except (ConfigError, ValueError):  # not a length, or several
        raise argparse.ArgumentTypeError(f"{text!r} is not a length (e.g. 32768, 32k, 1m)") from None
    return length


def rope_number(name: str) -> Callable[[str], float]:
    """An argparse type for the flag of recipe key rope.<name>: a finite number within the recipe's bounds."""
    low = next(f.metadata.get("min", -math.inf) for f in fields(RopeSection) if f.name == name)

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not math.isfinite(value) or value < low:
            raise argparse.ArgumentTypeError(f"{text!r}: must be a finite number >= {low}")
        return value

    return parse


def parse_floats(text: str) -> list[float]:
    """`1.0,1.5,2` -> [1.0, 1.5, 2.0] (longrope's per-dimension factors)."""
    try:
        return [float(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of numbers") from None


def as_flags(message: str) -> str:
    """A rope message in recipe terms (`rope.beta_fast`) in this command's terms (`--beta-fast`)."""
    for recipe_words, cli_words in CLI_ADVICE.items():
        message = message.replace(recipe_words, cli_words)
    return re.sub(r"rope\.(\w+)", lambda m: "--" + FLAG_NAMES.get(m.group(1), m.group(1)).replace("_", "-"), message)


def parser() -> argparse.ArgumentParser:
    p = ArgParser(prog="longctx rope")
    sub = p.add_subparsers(dest="command", required=True, parser_class=ArgParser, help="what to do",
                           metavar="{show,scale}")  # a missing command is then named with the allowed ones
    show = sub.add_parser("show", help="a model's RoPE setup and original context",
                          description="a model's RoPE setup: method, parameters, original context, wavelengths")
    show.add_argument("model_dir", help="local model directory (its config.json is read)")
    show.add_argument("--json", action="store_true", help="print JSON instead of the table")
    scale = sub.add_parser("scale", help="write a copy whose config carries a RoPE scaling",
                           description=__doc__.split("\n\n")[1].replace("\n", " "))
    scale.add_argument("model_dir", help="local model directory to copy")
    scale.add_argument("--target", type=parse_length, required=True, help="context to reach, e.g. 131072 or 128k")
    scale.add_argument("--method", default="auto", choices=("auto",) + rope.METHODS,
                       help="auto: yarn for an unscaled model, else the model's own method with a larger factor")
    scale.add_argument("--out", required=True, help="new model directory (must not exist)")
    scale.add_argument("--copy", action="store_true", help="copy weight files instead of linking them")
    scale.add_argument("--no-truncate", dest="truncate", action="store_false", default=None, help="yarn: no truncation")
    meta = {f.name: f.metadata for f in fields(RopeSection)}
    for name in PARAM_FLAGS:  # the recipe's words for rope.<name>, with its bound
        scale.add_argument(f"--{name.replace('_', '-')}", dest=name, type=rope_number(name),
                           help=f"{meta[name]['help']} (>= {meta[name]['min']})")
    for name in LIST_FLAGS:
        scale.add_argument(f"--{name.replace('_', '-')}", dest=name, type=parse_floats,
                           help=f"{meta[name]['help']}, comma-separated (rotary_dim / 2 of them), e.g. 1.0,1.1,...")
    return p


def load_config(model_dir: str) -> PretrainedConfig:
    from transformers import AutoConfig

    if not (Path(model_dir) / "config.json").is_file():
        raise ConfigError(f"model_dir={model_dir!r}: not a directory with a config.json")
    try:
        return AutoConfig.from_pretrained(model_dir)
    except (OSError, ValueError, KeyError) as e:
        raise ConfigError(f"model_dir={model_dir!r}: transformers cannot read its config.json "
                          f"({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None


def show(args: argparse.Namespace) -> int:
    try:
        info = rope.summary(load_config(args.model_dir))
    except rope.RopeError as e:
        raise ConfigError(f"model_dir={args.model_dir!r}: {e}") from None
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    rows = [("rope_type", info["rope_type"])]
    for key, value in info["rope_parameters"].items():
        if key != "rope_type":
            rows.append((f"  {key}", f"[{len(value)} values]" if isinstance(value, list) else value))
    rows += [
        ("rotary dims", info["rotary_dim"]),
        ("original context", info["original_context"]),
        ("max_position_embeddings", info["max_position_embeddings"]),
        ("attention factor", f"{info['attention_factor']:.6g}"),
        ("wavelengths", f"{info['shortest_wavelength']:.3g} .. {info['longest_wavelength']:.3g} tokens"),
    ]
    for key, value in rows:
        print(f"{key:<36}{value}")
    return 0


def scale(args: argparse.Namespace) -> int:
    config = load_config(args.model_dir)
    out = Path(args.out)
    if out.exists():
        raise ConfigError(f"--out {out}: already exists; choose a new directory")
    params = {k: getattr(args, k) for k in PARAM_FLAGS + LIST_FLAGS + ("truncate",)}
    try:
        scaled = rope.scale_config(config, args.target, args.method, **params)
    except rope.RopeError as e:
        raise ConfigError(as_flags(str(e))) from None
    out.mkdir(parents=True)
    for item in Path(args.model_dir).iterdir():
        if item.name == "config.json" or item.is_dir():
            continue
        if args.copy:
            shutil.copy2(item, out / item.name)
        else:
            os.symlink(item.resolve(), out / item.name)
    scaled.save_pretrained(out)
    info = rope.summary(scaled)
    print(f"wrote {out}: {info['rope_type']} {json.dumps(info['rope_parameters'])}, "
          f"max_position_embeddings {info['max_position_embeddings']}")
    return 0


def main(argv: list[str]) -> int:
    args = parser().parse_args(argv)
    return show(args) if args.command == "show" else scale(args)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
