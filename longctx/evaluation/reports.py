"""Run each evaluation on a loaded model and write its JSON and PNG into a directory."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from longctx.evaluation import plots
from longctx.evaluation.common import greedy, haystack_text, short
from longctx.evaluation.middle import position_sweep
from longctx.evaluation.needle import needle_grid
from longctx.evaluation.ppl import perplexity_by_length


def long_documents(tokenizer, length: int, files: list[str] | None, count: int = 8) -> list[list[int]]:
    """Token ids of up to `count` documents of at least `length` tokens: the files given, else the corpus."""
    from longctx.corpus import stdlib_sources

    texts = (open(f, encoding="utf-8", errors="replace").read() for f in files) if files else \
        (d["text"] for d in stdlib_sources())
    found = []
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) >= length:
            found.append(ids)
            if len(found) == count:
                break
    return found


def _write(out: Path, name: str, report: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(report, indent=2))


def ppl_report(models: dict[str, tuple], lengths: list[int], out: Path, files: list[str] | None = None,
               score_last: int = 0) -> dict:
    """models: label -> (model, tokenizer). One line per label in ppl.png."""
    report, series = {"lengths": lengths, "score_last": score_last, "models": {}}, {}
    for label, (model, tokenizer) in models.items():
        rows = perplexity_by_length(model, long_documents(tokenizer, max(lengths), files), lengths, score_last)
        report["models"][label] = rows
        done = [r for r in rows if r["ppl"] is not None]
        series[label] = ([r["length"] for r in done], [r["ppl"] for r in done])
    _write(out, "ppl", report)
    plots.lines(series, "perplexity", "Perplexity against context length", str(out / "ppl.png"))
    return report


def needle_report(model, tokenizer, lengths: list[int], depths: list[float], trials: int, out: Path,
                  files: list[str] | None = None, n_needles: int = 1, retrieve: str = "one") -> dict:
    filler = tokenizer(haystack_text(8 * max(lengths), files), add_special_tokens=False)["input_ids"]
    report = needle_grid(greedy(model), tokenizer, filler, lengths, depths, trials, n_needles, retrieve)
    _write(out, "needle", report)
    kind = "passkey" if n_needles == 1 else f"{n_needles} needles, retrieve {retrieve}"
    plots.heatmap(np.array(report["scores"]), lengths, depths,
                  f"Needle in a haystack ({kind}): mean {report['mean']:.2f}", str(out / "needle.png"))
    return report


def middle_report(model, tokenizer, k: int, trials: int, out: Path, strategies: list[str],
                  files: list[str] | None = None) -> dict:
    filler = haystack_text(20000, files)
    report = {s: position_sweep(greedy(model), tokenizer, filler, k, trials, strategy=s) for s in strategies}
    _write(out, "middle", report)
    for s, r in report.items():
        plots.bars(r["accuracy_by_position"], [str(i + 1) for i in range(k)], "accuracy",
                   f"Lost in the middle (k={k}, order: {s})", str(out / f"middle-{s}.png"))
    return report


def summary_line(name: str, report: dict) -> str:
    if name == "ppl":
        rows = next(iter(report["models"].values()))
        return "ppl " + " ".join(f"{short(r['length'])}:{r['ppl']:.2f}" for r in rows if r["ppl"] is not None)
    if name == "needle":
        return f"needle mean accuracy {report['mean']:.2f}"
    return "middle " + " ".join(f"{s}:{np.mean(r['accuracy_by_position']):.2f}" for s, r in report.items())
