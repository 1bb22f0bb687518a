"""The passkey task, shared by the evaluation (`longctx.evaluation.needle`) and the training data
(`longctx.corpus.passkey_episodes`): what is hidden in a haystack, how a prompt frames it, and a prompt of
exactly `length` tokens.

A prompt says what is hidden before the haystack (as the passkey papers do) and asks after it, then opens the
answer for the model to complete; through the model's chat template when its tokenizer has one (one user turn,
the answer opening the assistant's turn), else as plain text, the question marked off as `Question:` /
`Answer:`. A bare question glued to the end of the haystack reads as more haystack: a 135M instruct model
continued the text instead of answering.
"""

from __future__ import annotations

import random
from typing import TYPE_CHECKING, NamedTuple

from longctx.config import ConfigError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


def bos(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """The tokens a document starts with in training (`longctx.data` frames documents with bos)."""
    return [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []


CONTEXT = "\x00context\x00"  # stands for the long context while a chat template renders the prompt around it


def frame(tokenizer: PreTrainedTokenizerBase, instruction: str, question: str, answer_start: str,
          chat_template: bool = True) -> tuple[list[int], list[int], str]:
    """(head, tail, how): a prompt is head + context + tail, the context in whatever tokens the caller counts.

    With a chat template (and `chat_template`), the way the model was tuned: one user turn holding the
    instruction, the context and the question, then the assistant's turn opened with `answer_start`, which the
    model completes. Otherwise plain text, as a document starts in training: bos, the instruction, a blank line,
    the context, a blank line, `Question: ...` and `Answer: <answer_start>`. Without the instruction and the
    marked question a model reads the question as more of the context, cut mid-sentence, and continues that."""
    def ids(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    if chat_template and getattr(tokenizer, "chat_template", None):
        content = f"{instruction}\n\n{CONTEXT}\n\n{question}"
        text = tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                             add_generation_prompt=True)
        if text.count(CONTEXT) == 1:  # the template wrote the message as given (it renders bos itself, if any)
            head, tail = text.split(CONTEXT)
            return ids(head), ids(tail + answer_start), "chat template"
    return bos(tokenizer) + ids(f"{instruction}\n\n"), ids(f"\n\nQuestion: {question}\nAnswer: {answer_start}"), "plain"


OWNERS = ["red", "blue", "green", "amber", "violet", "silver", "orange", "black"]
MAX_NEEDLES = len(OWNERS)
KEY_SAMPLES = 64  # keys tried for the minimum length: its longest-tokenizing ones set it
MAX_DRAWS = 100  # key draws per trial before a length is called too short


class Task(NamedTuple):
    """What one trial hides and asks. Only the needles hold keys: the rest of the prompt is the same for any."""

    texts: list[str]  # needle sentences; the first is placed at the cell's depth, the others at random depths
    instruction: str  # before the haystack, as in the passkey papers: what to find in it
    question: str  # after the haystack; "Answer with the number" keeps a chat model from talking about the text
    answer_start: str  # the answer's opening, which the model completes with the key(s)
    answers: list[str]


def needles(keys: list[str], retrieve: str) -> Task:
    if len(keys) == 1:
        k = keys[0]
        return Task([f" The pass key is {k}. Remember it. {k} is the pass key. "],
                    "There is a pass key hidden in the following text. Find it and memorize it. "
                    "I will quiz you about the pass key.",
                    "What is the pass key? Answer with the number.", "The pass key is", [k])
    if retrieve == "one":
        door = f"the {OWNERS[0]} door"
        return Task([f" The pass key of the {o} door is {k}. " for o, k in zip(OWNERS, keys)],
                    "There are pass keys of several doors hidden in the following text. Find them and memorize them. "
                    "I will quiz you about one of them.",
                    f"What is the pass key of {door}? Answer with the number.", f"The pass key of {door} is", [keys[0]])
    return Task([f" One of the pass keys is {k}. " for k in keys],
                "There are several pass keys hidden in the following text. Find them all and memorize them. "
                "I will quiz you about them.",
                "List every pass key. Answer with the numbers.", "The pass keys are", keys)


def task_frame(tokenizer: PreTrainedTokenizerBase, n_needles: int, retrieve: str,
               chat_template: bool = True) -> tuple[list[int], list[int], str]:
    """(head, tail, how) around the haystack: the same for every trial of a grid (the keys are in the needles)."""
    task = needles(["0"] * n_needles, retrieve)
    return frame(tokenizer, task.instruction, task.question, task.answer_start, chat_template)


def _needle_tokens(tokenizer: PreTrainedTokenizerBase, texts: list[str]) -> int:
    return sum(len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts)


def minimum_length(tokenizer: PreTrainedTokenizerBase, n_needles: int, retrieve: str,
                   chat_template: bool = True) -> int:
    """The shortest context that holds the frame (instruction, question), the needles and one filler token, for the
    keys of a fixed sample that take the most tokens (a key's tokens depend on its digits); `needle_grid` redraws
    the rare keys that take more."""
    rng = random.Random(0)
    samples = [[str(rng.randint(10000, 99999)) for _ in range(n_needles)] for _ in range(KEY_SAMPLES)]
    head, tail, _ = task_frame(tokenizer, n_needles, retrieve, chat_template)
    return len(head) + len(tail) + max(_needle_tokens(tokenizer, needles(keys, retrieve).texts) for keys in samples) + 1


def build_prompt(tokenizer: PreTrainedTokenizerBase, filler: list[int], length: int, depth: float, texts: list[str],
                 head: list[int], tail: list[int], rng: random.Random) -> list[int]:
    """Exactly `length` tokens: head, filler with the needles inserted (the first at `depth` of the filler, others
    at random depths), tail. Needles go in at token boundaries of the filler, never inside a token."""
    needle_ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    budget = length - len(head) - len(tail) - sum(map(len, needle_ids))
    if budget < 1:
        raise ValueError(f"length {length} is too short for the needles and the question")
    if len(filler) < budget:
        raise ValueError(f"the haystack has {len(filler)} tokens, {budget} needed")
    hay = list(filler[:budget])
    places = [round(depth * budget)] + [rng.randint(0, budget) for _ in needle_ids[1:]]
    for place, ids in sorted(zip(places, needle_ids), key=lambda p: -p[0]):  # from the back: places stay valid
        hay[place:place] = ids
    return head + hay + tail


def draw_keys(rng: random.Random, tokenizer: PreTrainedTokenizerBase, length: int, n_needles: int, retrieve: str,
              frame_tokens: int) -> list[str]:
    """Distinct 5-digit keys whose needles leave `length` room for the frame's tokens and one filler token."""
    for _ in range(MAX_DRAWS):
        keys = [str(k) for k in rng.sample(range(10000, 100000), n_needles)]
        if frame_tokens + _needle_tokens(tokenizer, needles(keys, retrieve).texts) + 1 <= length:
            return keys
    raise ConfigError(f"length {length}: {MAX_DRAWS} draws of keys found none whose needles fit beside the "
                      f"{frame_tokens} tokens of instruction and question; use longer lengths")
