"""Long-context evaluation: perplexity against length, needle/passkey grid, lost in the middle."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from longctx.config import EvalSection

MIDDLE_PASSAGES = 6  # the recipe has no key for these: a small sweep that shows the curve's shape
MIDDLE_STRATEGIES = ["none", "first-last"]


def run_at_end(model_dir: str, section: EvalSection, out_dir: str) -> dict:
    """The evaluations a recipe's `eval.at_end` lists (a `longctx.config.EvalSection`) on an exported model
    directory (tokenizer inside); JSON + PNG reports go to out_dir. Returns {evaluation: one summary line}."""
    from longctx.evaluation.common import load_pretrained, model_name
    from longctx.evaluation.reports import long_documents, middle_report, needle_report, ppl_report, summary_line

    model, tokenizer = load_pretrained(model_dir)
    name = model_name(model_dir)
    lengths = sorted(set(section.lengths))
    out = Path(out_dir)
    summary = {}
    for evaluation in section.at_end:
        if evaluation == "ppl":
            documents = long_documents(tokenizer, max(lengths), None)
            report = ppl_report({name: (lambda: (model, tokenizer), documents)}, lengths, out)
        elif evaluation == "needle":
            report = needle_report(model, tokenizer, lengths, list(section.depths), section.trials, out,
                                   model_name=name, key="eval.lengths")
        else:
            report = middle_report(model, tokenizer, MIDDLE_PASSAGES, section.trials, out, MIDDLE_STRATEGIES,
                                   model_name=name)
        summary[evaluation] = summary_line(evaluation, report)
    return summary
