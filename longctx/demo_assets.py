"""Builds the demo model directory shipped in `longctx/assets/demo-llama`.

A byte-level BPE tokenizer trained on the embedded corpus and a tiny Llama config. The
output is committed; this module is how it was made (`python -m longctx.demo_assets`).
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, PreTrainedTokenizerFast

from longctx.corpus import embedded_corpus

ASSETS = Path(__file__).parent / "assets" / "demo-llama"
SPECIAL = {"bos_token": "<|bos|>", "eos_token": "<|eos|>", "pad_token": "<|pad|>"}
# Chat template for `messages` records: role headers as plain text, eos after each turn.
CHAT_TEMPLATE = (
    "{% for m in messages %}<|bos|>{{ m['role'] }}\n{{ m['content'] }}<|eos|>{% endfor %}"
    "{% if add_generation_prompt %}<|bos|>assistant\n{% endif %}"
)


FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "


def passkey_texts(count: int, seed: int = 0) -> list[str]:
    """Short passkey documents in plain text: the tokenizer learns their words and digits."""
    rng = random.Random(seed)
    texts = []
    for _ in range(count):
        n_filler = rng.randint(8, 64)
        key = str(rng.randint(10000, 99999))
        before = rng.randint(0, n_filler)
        body = FILLER * before + f"The pass key is {key}. Remember it. {key} is the pass key. " + \
            FILLER * (n_filler - before)
        texts.append(f"There is a pass key hidden in the following text. Find it and memorize it. I will quiz "
                     f"you about the pass key.\n\n{body}\n\nWhat is the pass key? The pass key is {key}.")
    return texts


def build_tokenizer(vocab_size: int = 4096) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL.values()),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    texts = [d["text"] for d in embedded_corpus()] + passkey_texts(256)
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, chat_template=CHAT_TEMPLATE, **SPECIAL)


def build_config(tokenizer: PreTrainedTokenizerFast) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=344,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,  # "trained" on 256: the demo extends it
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )


def main(out: Path = ASSETS) -> None:
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer()
    tokenizer.save_pretrained(out)
    build_config(tokenizer).save_pretrained(out)
    print(json.dumps({"dir": str(out), "vocab": len(tokenizer)}))


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else ASSETS)
