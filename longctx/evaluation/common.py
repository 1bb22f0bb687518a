"""What every evaluation shares: loading a model directory, lengths, haystack text, greedy generation."""

from __future__ import annotations

import re
from typing import Callable

import torch

from longctx.config import ConfigError

# prompt token ids, number of new tokens -> generated token ids
Generate = Callable[[list[int], int], list[int]]


def parse_lengths(text: str, key: str = "--lengths") -> list[int]:
    """`1k,2k,32K,1m,4096` -> token counts (k = 1024)."""
    out = []
    for item in text.split(","):
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kKmM]?)\s*", item)
        if not m:
            raise ConfigError(f"{key}={text}: {item!r} is not a length (e.g. 4096, 32k, 1m)")
        out.append(int(float(m.group(1)) * {"": 1, "k": 1024, "m": 1024**2}[m.group(2).lower()]))
    return out


def parse_fractions(text: str, key: str = "--depths") -> list[float]:
    try:
        values = [float(x) for x in text.split(",")]
    except ValueError:
        raise ConfigError(f"{key}={text}: expected comma-separated numbers in [0, 1]") from None
    if any(not 0 <= v <= 1 for v in values):
        raise ConfigError(f"{key}={text}: depths are fractions of the context, in [0, 1]")
    return values


def short(n: int) -> str:
    return f"{n // 1024}k" if n % 1024 == 0 else str(n)


def load_model(model_dir: str, rope_overrides: list[str] = ()):
    """A causal LM from a local directory (bf16 on GPU, fp32 on CPU), with an optional RoPE override."""
    from pathlib import Path

    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if not (Path(model_dir) / "config.json").is_file():
        raise ConfigError(f"--model {model_dir}: not a directory with a config.json")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    config = AutoConfig.from_pretrained(model_dir)
    if rope_overrides:
        config = rope_override(config, rope_overrides)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(model_dir, config=config, dtype=dtype).to(device).eval()
    return model, AutoTokenizer.from_pretrained(model_dir)


def rope_override(config, overrides: list[str]):
    """`rope.method=yarn rope.factor=4 [rope.target_length=N]` applied to a loaded config."""
    from longctx.rope import RopeError, original_context, scale_config

    params = {}
    for item in overrides:
        key, _, value = item.partition("=")
        if not key.startswith("rope.") or not value:
            raise ConfigError(f"{item}: RoPE overrides are written rope.key=value (e.g. rope.method=yarn)")
        params[key[5:]] = value if key == "rope.method" else float(value)
    method = params.pop("method", "auto")
    factor = params.get("factor")
    target = int(params.pop("target_length", 0)) or int(original_context(config) * (factor or 1))
    try:
        return scale_config(config, target, method, **params)
    except RopeError as e:
        raise ConfigError(str(e)) from None


def greedy(model, device: torch.device | None = None) -> Generate:
    device = device or next(model.parameters()).device

    def generate(prompt: list[int], new_tokens: int) -> list[int]:
        ids = torch.tensor([prompt], device=device)
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
        return out[0, len(prompt):].tolist()

    return generate


def haystack_text(min_chars: int, files: list[str] | None = None) -> str:
    """Filler long enough for the largest context: the user's documents or the embedded corpus."""
    if files:
        text = "\n\n".join(open(f, encoding="utf-8", errors="replace").read() for f in files)
    else:
        from longctx.corpus import stdlib_sources

        parts, size = [], 0
        for doc in stdlib_sources():
            parts.append(doc["text"])
            size += len(doc["text"])
            if size >= min_chars:
                break
        text = "\n\n".join(parts)
    if len(text) < min_chars:
        text = text * (min_chars // max(1, len(text)) + 1)
    return text
