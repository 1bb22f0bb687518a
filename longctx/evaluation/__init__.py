"""Long-context evaluation: perplexity against length, needle/passkey grid, lost in the middle."""

from __future__ import annotations

from pathlib import Path


def run_at_end(model_dir: str, section, out_dir: str) -> dict:
    """The evaluations a recipe's `eval.at_end` lists, on an exported model; reports go to out_dir."""
    from longctx.evaluation.common import load_model
    from longctx.evaluation.reports import middle_report, needle_report, ppl_report, summary_line

    model, tokenizer = load_model(model_dir)
    out = Path(out_dir)
    summary = {}
    for name in section.at_end:
        if name == "ppl":
            report = ppl_report({Path(model_dir).name: (model, tokenizer)}, list(section.lengths), out)
        elif name == "needle":
            report = needle_report(model, tokenizer, list(section.lengths), list(section.depths), section.trials, out)
        else:
            report = middle_report(model, tokenizer, 6, section.trials, out, ["none", "first-last"])
        summary[name] = summary_line(name, report)
    return summary
