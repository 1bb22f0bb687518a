"""Lost in the middle: the sweep really moves the relevant passage, and reordering places ranks as documented."""

import re

import pytest
from transformers import AutoTokenizer

from longctx.evaluation.middle import positions_by_rank, rank_sweep

FILLER = "lorem ipsum dolor sit amet consectetur adipiscing elit " * 300


@pytest.fixture(scope="module")
def tok(demo_dir):
    return AutoTokenizer.from_pretrained(demo_dir)


def reader(tok, sees):
    """A 'model' that answers correctly when `sees(position, k)` is true for the relevant passage, else 0000."""
    def generate(prompts, new_tokens):
        out = []
        for p in prompts:
            text = tok.decode(p)
            name = re.search(r"What is the code of (\w+)\?", text).group(1)
            owners = re.findall(r"The code of (\w+) is (\d+)\.", text)
            position = [n for n, _ in owners].index(name)
            answer = dict(owners)[name] if sees(position, len(owners)) else "0000"
            out.append(tok(" " + answer, add_special_tokens=False)["input_ids"][:new_tokens])
        return out
    return generate


@pytest.mark.parametrize("strategy, positions", [("none", [0, 1, 2, 3, 4]), ("first-last", [0, 4, 1, 3, 2]),
                                                  ("reverse", [4, 3, 2, 1, 0])])
def test_a_model_given_the_answer_scores_one_everywhere(tok, strategy, positions):
    report = rank_sweep(reader(tok, lambda p, k: True), tok, FILLER, k=5, trials=2, strategy=strategy)
    assert report["accuracy_by_rank"] == [1.0] * 5 and report["accuracy_by_position"] == [1.0] * 5
    assert report["position_by_rank"] == positions  # first-last: the best ranks at both ends, the worst inside


def test_a_model_that_reads_only_the_ends_shows_the_u_and_its_mitigation(tok):
    ends_only = reader(tok, lambda position, k: position in (0, k - 1))
    plain = rank_sweep(ends_only, tok, FILLER, k=6, trials=2, strategy="none")
    assert plain["accuracy_by_rank"] == [1.0, 0.0, 0.0, 0.0, 0.0, 1.0]  # rank = position: lost in the middle
    first_last = rank_sweep(ends_only, tok, FILLER, k=6, trials=2, strategy="first-last")
    assert first_last["accuracy_by_rank"] == [1.0, 1.0, 0.0, 0.0, 0.0, 0.0]  # the two best ranks sit at the ends
    assert first_last["accuracy_by_position"] == [1.0, 0.0, 0.0, 0.0, 0.0, 1.0]
    reverse = rank_sweep(ends_only, tok, FILLER, k=6, trials=2, strategy="reverse")
    assert reverse["accuracy_by_rank"] == [1.0, 0.0, 0.0, 0.0, 0.0, 1.0]  # best last, next to the question


def test_positions_follow_the_documented_orders():
    assert positions_by_rank(6, "none") == [0, 1, 2, 3, 4, 5]
    assert positions_by_rank(6, "first-last") == [0, 5, 1, 4, 2, 3]  # ranks 1,3,5 in front; 2,4,6 from the back
    assert positions_by_rank(6, "reverse") == [5, 4, 3, 2, 1, 0]
