"""Every shipped recipe starts as shipped: its preflight passes on the world it names, with the embedded data."""

from pathlib import Path

import pytest

from longctx.config import load_recipe
from longctx.corpus import HELD_OUT, NOT_PROSE_OR_CODE, held_out_prose, passkey_episodes, stdlib_packages

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_each_recipe_passes_its_preflight_on_the_world_it_names(path, smollm2_dir):
    from longctx.preflight import check_inputs

    overrides = [f"model.path={smollm2_dir}"] if "smollm2" in path.stem else []
    recipe = load_recipe(str(path), overrides)
    world = max(recipe.parallel.sp, 2 if path.stem == "demo-cpu" else 1)  # sp ranks, or the demo's 2 CPU ranks
    check_inputs(recipe, world)  # sp layout, RoPE rules, tokenizer, LoRA targets, attention, checkpoint


def test_a_config_only_recipe_takes_a_real_model_from_the_command_line(tmp_path):
    path = ROOT / "recipes" / "llama3-8b-lora-1gpu.yaml"
    (tmp_path / "config.json").write_text((ROOT / "longctx" / "assets" / "llama-3.1-8b" / "config.json").read_text())
    recipe = load_recipe(str(path), [f"model.path={tmp_path}"])
    assert recipe.model.path == str(tmp_path) and recipe.model.config is None


def test_package_documents_are_long_and_the_evaluation_prose_is_not_among_them():
    docs = list(stdlib_packages())
    assert len(docs) > 20 and HELD_OUT not in {d["source"].split("/")[1] for d in docs}
    assert max(len(d["text"]) for d in docs) > 1_000_000  # millions of characters: far past 64K tokens
    prose = " ".join(held_out_prose())
    assert len(prose) > 300_000 and not any(prose[:200] in d["text"] for d in docs)


def test_passkey_episodes_ask_the_evaluation_question_over_training_text_at_every_distance(smollm2_dir):
    import re

    import numpy as np
    from transformers import AutoTokenizer

    from longctx.passkey import needles

    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    haystack = np.asarray(tok(stdlib_packages(1).__next__()["text"][:200_000], add_special_tokens=False)["input_ids"])
    ids, mask, lengths = passkey_episodes(tok, haystack, count=40, seq_len=65536, max_tokens=0, seed=0)
    assert len(lengths) >= 40 and lengths.sum() % 65536 == 0 and len(ids) == len(mask) == lengths.sum()
    assert lengths.min() >= 65536 // 32 and (lengths == 65536).sum() >= 3  # from 2K to whole windows
    task = needles(["0"], "one")
    depths = []
    for episode, loss in zip(np.split(ids, np.cumsum(lengths)[:-1]), np.split(mask, np.cumsum(lengths)[:-1])):
        prompt, answer = tok.decode(episode[~loss]), tok.decode(episode[loss])
        depths.append(prompt.index("The pass key is") / len(prompt))
        key = re.fullmatch(r" (\d{5})\.\S*", answer).group(1)  # the key, then the end of the turn
        assert loss[-len(episode[loss]):].all()  # the answer closes the episode: nothing after it carries loss
        assert task.instruction in prompt and prompt.rstrip().endswith(task.answer_start)
        assert f"The pass key is {key}. Remember it." in prompt
    ends = np.mean((np.array(depths) < 0.1) | (np.array(depths) > 0.9))
    assert ends > 0.3  # the arcsine law puts 41% of keys in the outer tenths (uniform depths: 20%)


def test_codec_tables_are_not_training_documents():
    assert not NOT_PROSE_OR_CODE & {d["source"].split("/")[1] for d in stdlib_packages()}
