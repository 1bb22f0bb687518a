"""Perplexity is exp(mean NLL) of exactly the tokens each mode promises to score."""

import math

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from longctx.evaluation.common import rope_variants
from longctx.evaluation.ppl import perplexity_by_length, windows


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()


@pytest.fixture(scope="module")
def docs():
    g = torch.Generator().manual_seed(0)
    return [torch.randint(3, 4096, (n,), generator=g).tolist() for n in (80, 150, 40, 96)]


def token_nll(model, ids: list[int]) -> list[float]:
    """NLL of tokens 1..len-1 given everything before them, from full logits."""
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0, :-1].float()
    return F.cross_entropy(logits, torch.tensor(ids[1:]), reduction="none").tolist()


@pytest.mark.parametrize("score_last", [0, 10])
def test_last_window_perplexity_is_exp_of_mean_nll_by_hand(model, docs, score_last):
    rows = perplexity_by_length(model, docs, [32, 64], score_last=score_last, batch_size=2)
    for row, length in zip(rows, (32, 64)):
        nll = []
        for d in docs:
            if len(d) >= length:
                losses = token_nll(model, d[:length])
                nll += losses[-score_last:] if score_last else losses
        assert row["documents"] == sum(len(d) >= length for d in docs) and row["tokens_scored"] == len(nll)
        assert row["ppl"] == pytest.approx(math.exp(sum(nll) / len(nll)), rel=1e-5)


@pytest.mark.parametrize("n, length, stride", [(96, 32, 8), (96, 32, 31), (100, 96, 7), (64, 64, 16), (33, 16, 5)])
def test_sliding_windows_score_every_token_once_with_full_windows(n, length, stride):
    scored = []
    for start, first in windows(n, length, stride):
        assert 0 <= start and start + length <= n  # every window is full length
        assert start < first  # a scored token has context inside its window
        assert first - start >= length - stride or start == 0  # at least length - stride tokens of it
        scored += range(first, start + length)
    assert scored == list(range(1, n))


def test_a_stride_of_the_whole_window_is_refused():
    with pytest.raises(ValueError, match="stride 32"):
        windows(96, 32, 32)  # each window's first token would never be scored


def test_sliding_perplexity_is_exp_of_mean_nll_by_hand(model, docs):
    lengths, stride = [24, 48], 12
    rows = perplexity_by_length(model, docs, lengths, stride=stride, batch_size=3)
    span = max(lengths)
    for row, length in zip(rows, lengths):
        nll = []
        for d in (d[:span] for d in docs if len(d) >= length):
            for start, first in windows(len(d), length, stride):
                losses = token_nll(model, d[start:start + length])  # losses[i] scores token start+i+1
                nll += losses[first - start - 1:]
        assert row["tokens_scored"] == len(nll)
        assert row["ppl"] == pytest.approx(math.exp(sum(nll) / len(nll)), rel=1e-5)
    # on documents that reach the longest length, every length scores the same tokens: only the context differs
    long_docs = [d for d in docs if len(d) >= span]
    rows = perplexity_by_length(model, long_docs, lengths, stride=stride)
    assert rows[0]["tokens_scored"] == rows[1]["tokens_scored"] == len(long_docs) * (span - 1)


def test_rope_method_list_gives_one_variant_per_method():
    assert rope_variants(["rope.method=none,linear,yarn", "rope.factor=4"]) == [
        [], ["rope.method=linear", "rope.factor=4"], ["rope.method=yarn", "rope.factor=4"]]
    assert rope_variants(["rope.factor=2"]) == [["rope.factor=2"]]
    assert rope_variants([]) == [[]]


def test_documents_open_with_bos_and_reach_the_length(demo_dir):
    from transformers import AutoTokenizer

    from longctx.config import ConfigError
    from longctx.evaluation.reports import long_documents

    tok = AutoTokenizer.from_pretrained(demo_dir)
    corpus = long_documents(tok, 300, None, count=3)
    assert [len(d) for d in corpus] == [300] * 3 and all(d[0] == tok.bos_token_id for d in corpus)
    given = long_documents(tok, 20, ["short", "word " * 50, "word " * 10])
    assert len(given) == 1 and len(given[0]) >= 20 and given[0][0] == tok.bos_token_id
    with pytest.raises(ConfigError, match="no --data document reaches 1k tokens"):
        long_documents(tok, 1024, ["word " * 50])
