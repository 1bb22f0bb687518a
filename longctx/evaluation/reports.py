"""Run each evaluation and write its JSON and PNG into a directory (created only when results exist)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np

from longctx.config import ConfigError
from longctx.evaluation import plots
from longctx.evaluation.common import corpus_texts, greedy, short, token_stream
from longctx.evaluation.middle import rank_sweep
from longctx.evaluation.needle import needle_grid
from longctx.evaluation.ppl import perplexity_by_length
from longctx.passkey import bos, minimum_length

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedTokenizerBase

PPL_DOCUMENTS = 8  # documents per length: enough to average, few enough for CPU tests
MIDDLE_FILLER_CHARS = 200_000


def long_documents(tokenizer: PreTrainedTokenizerBase, n_tokens: int, texts: list[str] | None,
                   count: int = PPL_DOCUMENTS) -> list[list[int]]:
    """Up to `count` documents of at least n_tokens tokens, each opening with bos as in training. The user's
    documents are taken whole (an error if none is long enough); the embedded corpus is cut from its module
    sources read one after another, since few single modules reach long lengths."""
    start = bos(tokenizer)
    if texts is None:
        body = n_tokens - len(start)
        stream = token_stream(tokenizer, corpus_texts(), count * body)
        return [start + stream[i * body:(i + 1) * body] for i in range(count)]
    found, longest = [], 0
    for text in texts:
        ids = start + tokenizer(text, add_special_tokens=False)["input_ids"]
        longest = max(longest, len(ids))
        if len(ids) >= n_tokens:
            found.append(ids)
            if len(found) == count:
                break
    if not found:
        raise ConfigError(f"--lengths: no --data document reaches {short(n_tokens)} tokens (the longest has "
                          f"{longest}); give longer documents or lower lengths")
    return found


def _write(out: Path, name: str, report: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(report, indent=2))


def ppl_report(variants: dict[str, tuple[Callable[[], tuple], list[list[int]]]], lengths: list[int], out: Path,
               score_last: int = 0, stride: int = 0, batch_size: int = 4) -> dict:
    """variants: label -> (loader of (model, tokenizer), its tokenizer's documents). Loaders are called one at
    a time, so only one model is in memory. One line per label in ppl.png."""
    report = {"lengths": lengths, "score_last": score_last, "stride": stride, "models": {}, "rope": {}}
    series = {}
    for label, (load, documents) in variants.items():
        model, _ = load()
        rows = perplexity_by_length(model, documents, lengths, score_last, stride, batch_size)
        report["models"][label] = rows
        report["rope"][label] = dict(getattr(model.config, "rope_parameters", None) or {})  # what was compared
        del model  # before the next variant loads: one model in memory at a time
        done = [r for r in rows if r["ppl"] is not None]
        series[label] = ([r["length"] for r in done], [r["ppl"] for r in done])
    _write(out, "ppl", report)
    how = f"sliding windows, stride {stride}" if stride else \
        (f"last {score_last} tokens of each window" if score_last else "every token of each window")
    plots.ppl_lines(series, f"Perplexity against context length ({how})", str(out / "ppl.png"))
    return report


def check_needle_lengths(tokenizer: PreTrainedTokenizerBase, lengths: list[int], n_needles: int, retrieve: str,
                         key: str) -> None:
    shortest = minimum_length(tokenizer, n_needles, retrieve)
    if min(lengths) < shortest:
        raise ConfigError(f"{key}: {min(lengths)} tokens cannot hold {n_needles} needle(s) and the question; "
                          f"use lengths >= {shortest}")


def needle_report(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, lengths: list[int], depths: list[float],
                  trials: int, out: Path, texts: list[str] | None = None, n_needles: int = 1, retrieve: str = "one",
                  model_name: str = "", key: str = "--lengths") -> dict:
    check_needle_lengths(tokenizer, lengths, n_needles, retrieve, key)
    filler = token_stream(tokenizer, texts if texts is not None else corpus_texts(), max(lengths))
    report = needle_grid(greedy(model), tokenizer, filler, lengths, depths, trials, n_needles, retrieve)
    report["model"] = model_name
    _write(out, "needle", report)
    kind = "passkey" if n_needles == 1 else f"{n_needles} needles, retrieve {retrieve}"
    plots.heatmap(np.array(report["scores"]), lengths, depths,
                  f"{model_name + ': ' if model_name else ''}needle in a haystack ({kind})\n"
                  f"{trials} trial(s) per cell, mean accuracy {report['mean']:.2f}", str(out / "needle.png"))
    return report


def middle_report(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, k: int, trials: int, out: Path,
                  strategies: list[str], texts: list[str] | None = None, words: int = 40, model_name: str = "") -> dict:
    filler = "\n\n".join(texts) if texts is not None else "\n\n".join(corpus_texts())[:MIDDLE_FILLER_CHARS]
    generate = greedy(model)
    report = {s: rank_sweep(generate, tokenizer, filler, k, trials, words, s) for s in strategies}
    _write(out, "middle", report)
    plots.middle_lines({s: r["accuracy_by_rank"] for s, r in report.items()},
                       f"{model_name + ': ' if model_name else ''}lost in the middle\n"
                       f"{k} passages of {words} words, {trials} trial(s) per rank", str(out / "middle.png"))
    return report


def summary_line(name: str, report: dict) -> str:
    if name == "ppl":
        return "; ".join(f"ppl {label} " + " ".join(f"{short(r['length'])}:{r['ppl']:.2f}" for r in rows if r["ppl"])
                         for label, rows in report["models"].items())
    if name == "needle":
        return f"needle mean accuracy {report['mean']:.2f}"
    return "middle accuracy " + " ".join(f"{s}:{np.mean(r['accuracy_by_rank']):.2f}" for s, r in report.items())
