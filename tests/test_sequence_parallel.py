"""Sequence parallelism in one process: validation with one-line errors, the data shard, the node layout.

The multi-rank properties (loss and gradients equal one process) are in
test_sequence_parallel_exact.py and test_sequence_parallel_train.py.
"""

import numpy as np
import pytest
import torch

from longctx.config import ConfigError, load_recipe
from longctx.data import pack_documents
from longctx.topology import nodes_per_sp_group
from longctx.preflight import check_inputs
from longctx.sequence_parallel import allowed_degrees, check_layout, shard_batch


@pytest.mark.parametrize(
    "sp, world, seq_len, heads, kv, message",
    [
        (3, 4, 96, 12, 12, "parallel.sp=3: must divide the number of ranks (4)"),
        (4, 8, 1022, 32, 8, "data.seq_len=1022: must be divisible by parallel.sp=4"),
        (4, 4, 1024, 6, 6, "parallel.sp=4: the model cannot be split, its 6 attention heads do not divide by 4; "
                           "allowed: 1, 2, 3, 6"),
        (4, 4, 1024, 12, 6, "parallel.sp=4: the model cannot be split, its 6 key/value heads neither divide by 4 "
                            "nor divide 4 (to be repeated); allowed: 1, 2, 3, 6, 12"),
    ],
)
def test_bad_layouts_are_refused_in_one_line_naming_the_key(sp, world, seq_len, heads, kv, message):
    with pytest.raises(ConfigError) as e:
        check_layout(sp, world, seq_len, heads, kv)
    assert str(e.value) == message


@pytest.mark.parametrize("sp, heads, kv", [(2, 4, 2), (4, 4, 2), (8, 32, 8), (8, 32, 4), (4, 8, 1), (1, 6, 6)])
def test_layouts_that_split_or_repeat_kv_heads_are_accepted(sp, heads, kv):
    check_layout(sp, 8, 4096, heads, kv)
    assert sp in allowed_degrees(heads, kv)


def test_recipe_check_reads_the_models_heads(demo_dir):
    # the demo Llama has 4 attention heads and 2 key/value heads
    recipe = load_recipe(None, [f"model.config={demo_dir}", "parallel.sp=4", "data.seq_len=1024"])
    check_inputs(recipe, 4)  # 2 kv heads repeated to 4
    with pytest.raises(ConfigError, match="its 4 attention heads do not divide by 8; allowed: 1, 2, 4$"):
        check_inputs(load_recipe(None, [f"model.config={demo_dir}", "parallel.sp=8", "data.seq_len=1024"]), 8)


def test_shards_put_back_together_are_the_window_and_keep_every_label():
    rng = np.random.default_rng(1)
    docs = [{"input_ids": rng.integers(3, 50, n).tolist(), "loss_mask": [1] * n} for n in (7, 20, 3, 30, 12)]
    packed = pack_documents(docs, 32)
    batch = {k: torch.from_numpy(getattr(packed, k)[:2]).long() for k in ("input_ids", "position_ids", "labels")}
    shards = [shard_batch(batch, r, 4) for r in range(4)]
    for key, whole in batch.items():
        assert all(s[key].shape == (2, 8) for s in shards)
        assert torch.equal(torch.cat([s[key] for s in shards], dim=1), whole)
    # a shard's last token predicts the next shard's first token when both are in one document
    for r in range(3):
        same_doc = shards[r + 1]["position_ids"][:, 0] != 0
        assert torch.equal(shards[r]["labels"][same_doc, -1], shards[r + 1]["input_ids"][same_doc, 0])
        assert same_doc.any()
    # position ids are global: only shard 0 starts every row at 0
    assert (shards[1]["position_ids"][:, 0] > 0).any()
    with pytest.raises(ValueError, match="does not split into 3 equal shards"):
        shard_batch(batch, 0, 3)


@pytest.mark.parametrize(
    "local_ranks, sp, nodes",
    [
        ([0, 1, 2, 3, 0, 1, 2, 3], 4, 1),  # two nodes of 4, sp inside each
        ([0, 1, 2, 3, 0, 1, 2, 3], 8, 2),
        ([0, 0], 2, 2),  # two one-rank "nodes" on one host
        ([0, 1, 2, 0, 1, 2], 2, 2),  # sp=2 on nodes of 3: the middle group straddles
        ([0, 1, 2, 3], 2, 1),
    ],
)
def test_sp_groups_report_how_many_nodes_they_span(local_ranks, sp, nodes):
    assert nodes_per_sp_group(local_ranks, sp) == nodes
