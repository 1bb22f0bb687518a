"""Evaluations: reports have their structure, the scorers can fail, perplexity is exp(mean NLL)."""

import json
import math
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer

from longctx.cli import main
from longctx.config import EvalSection
from longctx.evaluation import run_at_end
from longctx.evaluation.common import greedy, parse_lengths
from longctx.evaluation.middle import position_sweep
from longctx.evaluation.needle import needle_grid
from longctx.evaluation.ppl import perplexity_by_length

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval(), AutoTokenizer.from_pretrained(tiny_model_dir)


def oracle(tokenizer):
    """A 'model' that is given the answer: it reads it from the prompt."""
    def generate(prompt, new_tokens):
        text = tokenizer.decode(prompt)
        if "List every pass key" in text:
            answer = ", ".join(re.findall(r"One of the pass keys is (\d+)", text))
        elif "door?" in text:
            owner = re.search(r"pass key of the (\w+) door\?", text).group(1)
            answer = re.search(rf"pass key of the {owner} door is (\d+)\.", text).group(1)
        elif "What is the code of" in text:
            name = re.search(r"What is the code of (\w+)\?", text).group(1)
            answer = re.search(rf"The code of {name} is (\d+)\.", text).group(1)
        else:
            answer = re.search(r"The pass key is (\d+)\.", text).group(1)
        return tokenizer(" " + answer, add_special_tokens=False)["input_ids"][:new_tokens]
    return generate


@pytest.fixture(scope="module")
def filler(tiny):
    from longctx.evaluation.common import haystack_text

    return tiny[1](haystack_text(20000), add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("needles, retrieve", [(1, "one"), (3, "one"), (3, "all")])
def test_needle_scores_one_when_given_the_answer(tiny, filler, needles, retrieve):
    _, tok = tiny
    report = needle_grid(oracle(tok), tok, filler, [128, 256], [0.0, 0.5, 1.0], trials=2, n_needles=needles,
                         retrieve=retrieve)
    assert np.array(report["scores"]).shape == (3, 2)
    assert report["mean"] == 1.0
    assert len(report["cells"]) == 12 and {"length", "depth", "answers", "output", "hit"} <= set(report["cells"][0])


def test_needle_scores_near_zero_for_a_random_model(tiny, filler):
    model, tok = tiny
    report = needle_grid(greedy(model), tok, filler, [128, 256], [0.0, 1.0], trials=2)
    assert report["mean"] <= 0.25


def test_needle_sits_at_the_requested_depth(tiny, filler):
    from longctx.evaluation.needle import build_prompt, needles
    import random

    _, tok = tiny
    texts, question, _ = needles(["12345"], "one")
    for depth in (0.0, 0.5, 1.0):
        prompt = build_prompt(tok, filler, 300, depth, texts, question, random.Random(0))
        assert len(prompt) == 300
        needle = tok(texts[0], add_special_tokens=False)["input_ids"]
        at = next(i for i in range(len(prompt)) if prompt[i:i + len(needle)] == needle)
        assert abs(at - depth * (300 - len(needle) - len(tok(question, add_special_tokens=False)["input_ids"]))) <= 1


def test_middle_sweep_oracle_and_structure(tiny):
    _, tok = tiny
    text = "lorem ipsum dolor sit amet " * 400
    report = position_sweep(oracle(tok), tok, text, k=5, trials=2, strategy="none")
    assert report["accuracy_by_position"] == [1.0] * 5
    reordered = position_sweep(oracle(tok), tok, text, k=5, trials=1, strategy="first-last")
    assert len(reordered["accuracy_by_position"]) == 5


def test_perplexity_is_exp_of_mean_nll_by_hand(tiny):
    model, tok = tiny
    g = torch.Generator().manual_seed(0)
    docs = [torch.randint(3, 4096, (n,), generator=g).tolist() for n in (80, 150, 40)]
    rows = perplexity_by_length(model, docs, [32, 64], score_last=10)
    for row, length in zip(rows, (32, 64)):
        usable = [d[:length] for d in docs if len(d) >= length]
        nll = []
        with torch.no_grad():
            for ids in usable:
                logits = model(torch.tensor([ids])).logits[0, :-1].float()
                losses = F.cross_entropy(logits, torch.tensor(ids[1:]), reduction="none")
                nll += losses[-10:].tolist()
        assert row["documents"] == len(usable) and row["tokens_scored"] == len(nll)
        assert row["ppl"] == pytest.approx(math.exp(sum(nll) / len(nll)), rel=1e-5)


def test_run_at_end_writes_every_report_with_pngs(tiny_model_dir, tmp_path):
    section = EvalSection(at_end=["ppl", "needle", "middle"], lengths=[128, 256], depths=[0.0, 1.0], trials=1)
    summary = run_at_end(str(tiny_model_dir), section, str(tmp_path))
    assert set(summary) == {"ppl", "needle", "middle"}
    for name in ("ppl.png", "needle.png", "middle-none.png", "middle-first-last.png"):
        data = (tmp_path / name).read_bytes()
        assert data.startswith(PNG) and len(data) > 10_000
    ppl = json.loads((tmp_path / "ppl.json").read_text())
    rows = next(iter(ppl["models"].values()))
    assert [r["length"] for r in rows] == [128, 256] and all(r["ppl"] > 1 for r in rows)


def test_lengths_parse_with_suffixes():
    assert parse_lengths("1k,32K,1m,4096") == [1024, 32768, 1048576, 4096]


@pytest.mark.parametrize("argv, message", [
    (["eval", "needle", "--model", "{m}", "--lengths", "1k,abc"], "'abc' is not a length"),
    (["eval", "needle", "--model", "/no/model"], "--model /no/model: not a directory"),
    (["eval", "middle", "--model", "{m}", "--reorder", "sideways"], "'sideways' is not one of"),
    (["eval", "recall", "--model", "{m}"], "invalid choice: 'recall'"),
])
def test_bad_eval_arguments_exit_2_and_write_nothing(tiny_model_dir, tmp_path, capsys, argv, message):
    out = tmp_path / "out"
    argv = [a.replace("{m}", str(tiny_model_dir)) for a in argv] + ["--out", str(out)]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not out.exists()
