"""The README's `longctx` examples that read only the checkout run as written, and print the figures their comments
promise (the planner's longest sequences)."""

import re
import shlex

import pytest

from conftest import ROOT
from longctx import cli

# `longctx plan`, `keys` and `--version` (train and eval need a run or a model, and write files)
EXAMPLES = [line.strip() for line in (ROOT / "README.md").read_text().splitlines()
            if re.match(r"    longctx (plan|keys|--version)\b", line)]


def test_the_examples_are_found():
    # the plan examples of the memory, QLoRA and multi-node sections, keys and --version
    assert sum(e.startswith("longctx plan ") for e in EXAMPLES) >= 5
    assert {"longctx keys", "longctx --version"} <= {e.split("#")[0].strip() for e in EXAMPLES}


@pytest.mark.parametrize("line", EXAMPLES)
def test_example_runs_as_written(line, capsys):
    command, _, comment = line.partition("#")
    assert cli.main(shlex.split(command)[1:]) == 0
    printed = capsys.readouterr().out
    promised = re.fullmatch(r"\s*([\d,]+) tokens\s*", comment)
    if promised:
        assert f"longest sequence with its settings: {promised.group(1)}" in printed, printed[-600:]
