"""What every evaluation shares: argument parsing, loading a model directory, texts, greedy generation."""

from __future__ import annotations

import re
from itertools import groupby
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import torch

from longctx.config import ConfigError

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedTokenizerBase

# prompts (token ids), number of new tokens -> generated token ids, one list per prompt
Generate = Callable[[list[list[int]], int], list[list[int]]]

LENGTH = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([kKmM]?)\s*")


def parse_lengths(text: str, key: str = "--lengths") -> list[int]:
    """`1k,2k,32K,1m,4096` -> token counts (k = 1024)."""
    out = []
    for item in text.split(","):
        m = LENGTH.fullmatch(item)
        value = int(float(m.group(1)) * {"": 1, "k": 1024, "m": 1024**2}[m.group(2).lower()]) if m else 0
        if value < 1:
            raise ConfigError(f"{key}={text}: {item!r} is not a length (e.g. 4096, 32k, 1m)")
        out.append(value)
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
    """A length as people write it: 512, 1k, 1.5k, 128k, 1m."""
    if n >= 1024**2 and n % 1024**2 == 0:
        return f"{n // 1024**2}m"
    if n >= 1024:
        return f"{n / 1024:g}k"
    return str(n)


def model_name(model_dir: str) -> str:
    """How reports name a model: its directory and the one above (`demo/hf`, `models/llama-3-8b`)."""
    return "/".join(Path(model_dir).resolve().parts[-2:])


def first_numbers_match(generated: str, answers: list[str]) -> float:
    """Exact match: the output opens with the answer number; for several answers, its first
    len(answers) numbers are exactly those (any order). 12345 does not match 123456."""
    numbers = re.findall(r"\d+", generated)
    if len(answers) == 1:
        opening = re.match(r"\s*(\d+)", generated)
        return float(opening is not None and opening.group(1) == answers[0])
    return float(sorted(numbers[: len(answers)]) == sorted(answers))


def load_pretrained(model_dir: str, rope_overrides: list[str] = ()) -> tuple[torch.nn.Module, object]:
    """A causal LM and its tokenizer from a local directory (bf16 on GPU, fp32 on CPU), RoPE optionally overridden."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if not (Path(model_dir) / "config.json").is_file():
        raise ConfigError(f"--model {model_dir}: not a directory with a config.json (models load from local dirs)")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    config = AutoConfig.from_pretrained(model_dir)
    if rope_overrides:
        config = rope_override(config, rope_overrides)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(model_dir, config=config, dtype=dtype).to(device).eval()
    return model, AutoTokenizer.from_pretrained(model_dir)


def _rope_value(key: str, text: str) -> object:
    if key == "method":
        return text
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        raise ConfigError(f"rope.{key}={text}: expected a number or true/false") from None


def rope_override(config: PretrainedConfig, overrides: list[str]) -> PretrainedConfig:
    """`rope.method=yarn rope.factor=4 [rope.target_length=N]` applied to a loaded config by longctx.rope."""
    from longctx.rope import RopeError, original_context, scale_config

    params = {}
    for item in overrides:
        key, _, value = item.partition("=")
        if not key.startswith("rope.") or not value:
            raise ConfigError(f"{item}: RoPE overrides are written rope.key=value (e.g. rope.method=yarn)")
        if key[5:] in params:
            raise ConfigError(f"{key}: given twice")
        params[key[5:]] = _rope_value(key[5:], value)
    method = params.pop("method", "auto")
    stretch = "factor" in params or "target_length" in params
    target = int(params.pop("target_length", 0)) or int(original_context(config) * params.get("factor", 1))
    try:
        scaled = scale_config(config, target, method, **params)
    except RopeError as e:
        raise ConfigError(str(e)) from None
    if method != "theta" and not stretch:  # checked after the keys themselves, so a misspelt one is named first
        raise ConfigError(f"rope.method={method}: needs rope.factor or rope.target_length (how far to stretch)")
    return scaled


def rope_variants(overrides: list[str]) -> list[list[str]]:
    """`rope.method=none,linear,yarn rope.factor=4` -> one override list per method (`none`: the model as saved),
    so one command compares methods on the same weights."""
    methods = [o.partition("=")[2] for o in overrides if o.startswith("rope.method=")]
    rest = [o for o in overrides if not o.startswith("rope.method=")]
    if not methods:
        return [rest]
    return [[] if m == "none" else [f"rope.method={m}"] + rest for m in methods[-1].split(",")]


def greedy(model: torch.nn.Module, batch_size: int = 8) -> Generate:
    """Greedy decoding; prompts of equal length run together (no padding, so any attention backend works)."""
    device = next(model.parameters()).device
    pad = model.generation_config.pad_token_id
    pad = pad if pad is not None else model.generation_config.eos_token_id

    def generate(prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
        out: list[list[int] | None] = [None] * len(prompts)
        by_length = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        for _, same in groupby(by_length, key=lambda i: len(prompts[i])):
            same = list(same)
            for start in range(0, len(same), batch_size):
                rows = same[start:start + batch_size]
                ids = torch.tensor([prompts[i] for i in rows], device=device)
                with torch.no_grad():
                    gen = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                                         do_sample=False, pad_token_id=pad)
                for i, row in zip(rows, gen[:, ids.shape[1]:].tolist()):
                    out[i] = row
        return out

    return generate


def document_texts(paths: list[str]) -> list[str]:
    """Texts of the documents in data files (.jsonl/.json/.parquet/.txt or folders), in the formats training reads."""
    import datasets

    from longctx.config import DataSection
    from longctx.data import check_records, load_documents, record_format

    texts = []
    bars_were_off = datasets.are_progress_bars_disabled()
    for path in paths:
        datasets.disable_progress_bars()  # reading a local file needs no bar, and an error must stay one line
        try:
            check_records(path, "--data")
            ds = load_documents(DataSection(path=path), seed=0)
            fmt = record_format(ds.column_names, path, "--data")
        finally:
            if not bars_were_off:
                datasets.enable_progress_bars()
        for record in ds:
            if fmt == "text":
                texts.append(record["text"])
            elif fmt == "prompt_completion":
                texts.append(record["prompt"] + record["completion"])
            else:
                texts.append("\n".join(m["content"] for m in record["messages"]))
    return texts


def corpus_texts() -> list[str]:
    """The embedded evaluation text: English prose that no embedded training document holds."""
    from longctx.corpus import held_out_prose

    return held_out_prose()


def token_stream(tokenizer: PreTrainedTokenizerBase, texts: list[str], n_tokens: int) -> list[int]:
    """At least n_tokens of the texts, tokenized one after another (repeated if they are too short)."""
    if not any(t.strip() for t in texts):
        raise ConfigError("--data: the documents hold no text")
    ids: list[int] = []
    while len(ids) < n_tokens:
        for text in texts:
            ids += tokenizer(text + "\n\n", add_special_tokens=False)["input_ids"]
            if len(ids) >= n_tokens:
                break
    return ids
