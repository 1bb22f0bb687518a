"""Needle grid: exact-length prompts, needles at their depth, a scorer that gives 1.0 to the answer and ~0 to noise."""

import random
import re
import string

import numpy as np
import pytest
from tokenizers import Tokenizer, decoders, models
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

from longctx.evaluation.common import first_numbers_match, greedy, token_stream
from longctx.evaluation.needle import needle_grid
from longctx.passkey import build_prompt, minimum_length, needles, task_frame


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval(), AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="module")
def filler(tiny):
    from longctx.evaluation.common import corpus_texts

    return token_stream(tiny[1], corpus_texts()[:5], 2000)


def answer_from_prompt(text: str) -> str:
    """What a model that reads perfectly would answer to any of the needle questions."""
    if "List every pass key" in text:
        return ", ".join(re.findall(r"One of the pass keys is (\d+)", text))
    owner = re.search(r"pass key of the (\w+) door\?", text)
    if owner:
        return re.search(rf"pass key of the {owner.group(1)} door is (\d+)\.", text).group(1)
    return re.search(r"The pass key is (\d+)\.", text).group(1)


def oracle(tokenizer, answer=answer_from_prompt):
    """A 'model' that is given the answer: greedy output is the answer read from the prompt."""
    def generate(prompts, new_tokens):
        return [tokenizer(" " + answer(tokenizer.decode(p)), add_special_tokens=False)["input_ids"][:new_tokens]
                for p in prompts]
    return generate


@pytest.mark.parametrize("n_needles, retrieve", [(1, "one"), (3, "one"), (3, "all")])
def test_needle_scores_one_when_given_the_answer(tiny, filler, n_needles, retrieve):
    _, tok = tiny
    report = needle_grid(oracle(tok), tok, filler, [128, 256], [0.0, 0.5, 1.0], trials=2, n_needles=n_needles,
                         retrieve=retrieve)
    assert np.array(report["scores"]).shape == (3, 2)
    assert report["mean"] == 1.0 and report["prompt"] == "chat template"
    assert len(report["cells"]) == 12 and {"length", "depth", "answers", "output", "hit"} <= set(report["cells"][0])
    assert all(len(c["answers"]) == (n_needles if retrieve == "all" else 1) for c in report["cells"])


def test_every_answer_fits_the_tokens_generated_even_one_token_per_character():
    # a tokenizer that writes each digit as its own token, as Llama-2's does: eight keys take 55 tokens
    vocab = {c: i for i, c in enumerate(string.printable)} | {"<unk>": len(string.printable)}
    chars = Tokenizer(models.BPE(vocab, merges=[], unk_token="<unk>"))
    chars.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(tokenizer_object=chars, unk_token="<unk>")
    filler = tok("The grass is green. " * 100, add_special_tokens=False)["input_ids"]
    report = needle_grid(oracle(tok), tok, filler, [1024], [0.5], trials=2, n_needles=8, retrieve="all")
    assert report["mean"] == 1.0


def test_needle_scores_zero_when_answering_a_distractor(tiny, filler):
    """Multi-key: answering another door's key is wrong, so the distractors are real."""
    _, tok = tiny

    def wrong_door(text):
        keys = re.findall(r"pass key of the (\w+) door is (\d+)\.", text)
        return next(k for owner, k in keys if owner != "red")

    report = needle_grid(oracle(tok, wrong_door), tok, filler, [256], [0.0, 1.0], trials=2, n_needles=3)
    assert report["mean"] == 0.0


def test_needle_scores_near_zero_for_a_random_model(tiny, filler):
    model, tok = tiny
    report = needle_grid(greedy(model), tok, filler, [128, 256], [0.0, 1.0], trials=2)
    assert report["mean"] <= 0.25


def test_exact_match_needs_the_whole_number():
    assert first_numbers_match(" 12345.", ["12345"]) == 1.0
    assert first_numbers_match(" 123456", ["12345"]) == 0.0  # a prefix is not a match
    assert first_numbers_match(" the key is 12345", ["12345"]) == 0.0  # the answer must open the output
    assert first_numbers_match(" 222, 111", ["111", "222"]) == 1.0  # retrieve all: any order
    assert first_numbers_match(" 111, 2223", ["111", "222"]) == 0.0
    assert first_numbers_match(" 111", ["111", "222"]) == 0.0


def test_prompt_has_the_exact_length_and_the_needle_at_its_depth(tiny, filler):
    _, tok = tiny
    task = needles(["12345"], "one")
    head, tail, _ = task_frame(tok, 1, "one")
    needle = tok(task.texts[0], add_special_tokens=False)["input_ids"]
    for depth in (0.0, 0.3, 0.5, 1.0):
        prompt = build_prompt(tok, filler, 300, depth, task.texts, head, tail, random.Random(0))
        assert len(prompt) == 300 and prompt[:len(head)] == head and prompt[-len(tail):] == tail
        at = next(i for i in range(len(prompt)) if prompt[i:i + len(needle)] == needle)
        assert at == len(head) + round(depth * (300 - len(head) - len(needle) - len(tail)))  # its depth of the filler
    with pytest.raises(ValueError, match="too short"):  # the frame and the needle fill it: no filler token left
        build_prompt(tok, filler, len(head) + len(needle) + len(tail), 0.5, task.texts, head, tail, random.Random(0))


def test_the_prompt_says_what_is_hidden_and_asks_apart_from_the_haystack(tiny):
    """Through the chat template (one user turn, the answer opening the assistant's turn), or as plain text with
    the question marked off: a question glued to the haystack reads as more haystack."""
    _, tok = tiny
    head, tail, how = task_frame(tok, 1, "one")
    assert how == "chat template"
    assert tok.decode(head).startswith("<|bos|>user\nThere is a pass key hidden in the following text.")
    question = "What is the pass key? Answer with the number."
    assert tok.decode(tail) == f"\n\n{question}<|eos|><|bos|>assistant\nThe pass key is"
    head, tail, how = task_frame(tok, 1, "one", chat_template=False)
    assert how == "plain" and head[0] == tok.bos_token_id
    assert tok.decode(head[1:]).endswith("I will quiz you about the pass key.\n\n")
    assert tok.decode(tail) == "\n\nQuestion: What is the pass key? Answer with the number.\nAnswer: The pass key is"


def test_a_chat_template_that_drops_the_message_gives_the_plain_prompt(tiny_model_dir):
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    tok.chat_template = "{{ bos_token }}{% if add_generation_prompt %}assistant: {% endif %}"
    assert task_frame(tok, 1, "one")[2] == "plain"
    tok.chat_template = None
    assert task_frame(tok, 1, "one")[2] == "plain"


@pytest.mark.parametrize("n_needles, retrieve", [(1, "one"), (3, "one"), (3, "all")])
def test_the_minimum_length_holds_every_draw(tiny, filler, n_needles, retrieve):
    # some keys take more tokens than others: at the stated minimum, each trial still gets keys that fit
    _, tok = tiny
    shortest = minimum_length(tok, n_needles, retrieve)
    report = needle_grid(oracle(tok), tok, filler, [shortest], [0.0, 1.0], trials=40, n_needles=n_needles,
                         retrieve=retrieve)
    assert report["mean"] == 1.0 and all(len(c["answers"]) >= 1 for c in report["cells"])


def test_batched_greedy_equals_one_prompt_at_a_time(tiny, filler):
    model, tok = tiny
    prompts = [filler[:40], filler[100:140], filler[200:230]]  # two of one length, one shorter
    generate = greedy(model, batch_size=2)
    together = generate(prompts, 5)
    assert together == [generate([p], 5)[0] for p in prompts]
    assert all(len(t) == 5 for t in together)
