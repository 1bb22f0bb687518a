"""Packing keeps document boundaries; every record format and file kind loads; order is a function of the step."""

import copy
import json

import numpy as np
import pytest
from transformers import AutoTokenizer

from longctx.config import ConfigError, DataSection
from longctx.data import IGNORE_INDEX, WindowSampler, build_packed, pack_documents, tokenize_record


def doc(ids, mask=None):
    return {"input_ids": list(ids), "loss_mask": list(mask or [1] * len(ids))}


def test_positions_restart_per_document_and_labels_never_cross_a_boundary():
    rng = np.random.default_rng(0)
    docs = [doc(rng.integers(3, 100, size=n)) for n in (1, 7, 3, 12, 1, 5, 9)]
    packed = pack_documents(docs, seq_len=8)
    flat_docs = np.concatenate([d["input_ids"] for d in docs])
    assert packed.input_ids.shape == (len(flat_docs) // 8, 8)
    np.testing.assert_array_equal(packed.input_ids.reshape(-1), flat_docs[: packed.input_ids.size])
    # rebuild the expected positions/labels token by token
    owner = np.concatenate([[i] * len(d["input_ids"]) for i, d in enumerate(docs)])[: packed.input_ids.size]
    for w in range(len(packed)):
        for t in range(8):
            g = w * 8 + t
            first = t == 0 or owner[g - 1] != owner[g]
            expected_pos = 0 if first else packed.position_ids[w, t - 1] + 1
            assert packed.position_ids[w, t] == expected_pos
            same_doc_next = t < 7 and owner[g + 1] == owner[g]
            assert packed.labels[w, t] == (flat_docs[g + 1] if same_doc_next else IGNORE_INDEX)


def test_loss_mask_and_min_doc_tokens():
    docs = [doc([5, 6, 7, 8], [0, 0, 1, 1]), doc([9, 9]), doc([1, 2, 3, 4])]
    packed = pack_documents(docs, seq_len=4, min_doc_tokens=3)
    assert packed.documents == 2
    # prompt tokens 5,6 are not predicted; 7 (answer) is predicted from 6, 8 from 7
    np.testing.assert_array_equal(packed.labels[0], [IGNORE_INDEX, 7, 8, IGNORE_INDEX])
    with pytest.raises(ConfigError, match="less than one window"):
        pack_documents(docs, seq_len=64)


@pytest.fixture(scope="module")
def tokenizer(demo_dir):
    return AutoTokenizer.from_pretrained(demo_dir)


def test_chat_loss_only_on_assistant_turns(tokenizer):
    messages = [{"role": "user", "content": "What is two plus two?"}, {"role": "assistant", "content": "Four."}]
    out = tokenize_record({"messages": messages}, tokenizer, "messages")
    full = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=False)
    assert out["input_ids"] == list(full)
    answer = [i for i, m in zip(out["input_ids"], out["loss_mask"]) if m]
    assert "Four." in tokenizer.decode(answer) and "two plus" not in tokenizer.decode(answer)


def test_chat_template_that_rewrites_earlier_turns_is_refused(tokenizer):
    # as reasoning templates do: an earlier assistant turn loses its <think> part once the conversation goes on
    rewriting = copy.deepcopy(tokenizer)
    rewriting.chat_template = ("{% for m in messages %}{% if m.role == 'assistant' and not loop.last %}"
                               "{{ m.content.split('</think>')[-1] }}{% else %}{{ m.content }}{% endif %}{% endfor %}")
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "<think>hmm</think>Hello"},
                {"role": "user", "content": "bye"}]
    with pytest.raises(ConfigError, match="renders the first 2 messages of a conversation differently"):
        tokenize_record({"messages": messages}, rewriting, "messages")
    assert tokenize_record({"messages": messages[:2]}, rewriting, "messages")["input_ids"]  # ends on the turn: fine


@pytest.mark.parametrize("kind", ["jsonl", "json", "parquet", "txt", "folder", "prompt_completion"])
def test_local_files_load_and_pack(tmp_path, tokenizer, kind):
    texts = [f"def f{i}(x):\n    return x * {i}\n" * 20 for i in range(6)]
    if kind in ("jsonl", "folder"):
        path = tmp_path / "d" if kind == "folder" else tmp_path / "a.jsonl"
        for j, chunk in enumerate([texts[:3], texts[3:]] if kind == "folder" else [texts]):
            f = path / f"{j}.jsonl" if kind == "folder" else path
            f.parent.mkdir(exist_ok=True)
            f.write_text("".join(json.dumps({"text": t}) + "\n" for t in chunk))
    elif kind == "json":
        path = tmp_path / "a.json"
        path.write_text(json.dumps([{"text": t} for t in texts]))
    elif kind == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        path = tmp_path / "a.parquet"
        pq.write_table(pa.table({"text": texts}), path)
    elif kind == "txt":
        path = tmp_path / "t"
        path.mkdir()
        for i, t in enumerate(texts):
            (path / f"{i}.txt").write_text(t)
    else:
        path = tmp_path / "sft.jsonl"
        path.write_text("".join(json.dumps({"prompt": t, "completion": " ok"}) + "\n" for t in texts))
    section = DataSection(path=str(path), seq_len=64, num_proc=1)
    packed = build_packed(section, tokenizer, seed=0, cache_dir=str(tmp_path / "cache"))
    assert packed.documents == 6 and len(packed) >= 6
    (cached,) = (tmp_path / "cache").glob("packed-64-*.npz")
    np.savez(cached, **{**np.load(cached), "documents": np.array(-1)})  # marked: a rebuild would not say -1
    again = build_packed(section, tokenizer, seed=0, cache_dir=str(tmp_path / "cache"))
    assert again.documents == -1  # read from the cache
    np.testing.assert_array_equal(packed.labels, again.labels)
    predicted = (packed.labels != IGNORE_INDEX).sum()
    if kind == "prompt_completion":
        assert 0 < predicted < packed.labels.size / 10  # only " ok" + eos of each record
    else:
        assert predicted > packed.labels.size / 2


def test_unsupported_files_and_fields_are_refused(tmp_path, tokenizer):
    (tmp_path / "a.csv").write_text("x\n1\n")
    with pytest.raises(ConfigError, match="expected .jsonl/.json/.parquet/.txt"):
        build_packed(DataSection(path=str(tmp_path / "a.csv")), tokenizer, 0, str(tmp_path / "c"))
    (tmp_path / "b.jsonl").write_text(json.dumps({"body": "x"}) + "\n")
    with pytest.raises(ConfigError, match="records need a 'text' field"):
        build_packed(DataSection(path=str(tmp_path / "b.jsonl")), tokenizer, 0, str(tmp_path / "c"))


def test_embedded_corpus_has_long_documents_and_passkey_windows(tokenizer, tmp_path):
    section = DataSection(seq_len=512, max_documents=None, passkey_documents=8, num_proc=1)
    packed = build_packed(section, tokenizer, seed=0, cache_dir=str(tmp_path))
    text = build_packed(DataSection(seq_len=512, passkey_documents=0, num_proc=1), tokenizer, 0, str(tmp_path))
    assert len(text) > 100 and text.position_ids.max() == 511  # documents longer than a window exist
    np.testing.assert_array_equal(packed.input_ids[:len(text)], text.input_ids)
    episodes = packed.labels[len(text):]
    assert len(episodes) >= 1 and packed.documents - text.documents >= 8
    # an episode window carries loss on its keys alone: a handful of tokens per episode
    assert 0 < (episodes != IGNORE_INDEX).sum() <= 12 * (packed.documents - text.documents)


def test_max_documents_caps_the_source_files():
    from longctx.data import load_documents

    docs = load_documents(DataSection(max_documents=3, passkey_documents=5), seed=0)
    assert [s.split("/")[0] for s in docs["source"]] == ["stdlib"] * 3


def test_sampler_is_a_pure_function_of_step_and_covers_each_epoch():
    s = WindowSampler(n_windows=10, seed=3, micro_batch=1, grad_accum=2, dp_size=2)
    epoch = [i for step in range(0, 3) for m in range(2) for r in range(2) for i in s.indices(step, m, r)][:10]
    assert sorted(epoch) == list(range(10))
    fresh = WindowSampler(n_windows=10, seed=3, micro_batch=1, grad_accum=2, dp_size=2)
    assert [fresh.indices(7, 1, 1), fresh.indices(2, 0, 0)] == [s.indices(7, 1, 1), s.indices(2, 0, 0)]
    assert WindowSampler(10, 4, 1, 2, 2).indices(0, 0, 0) != s.indices(0, 0, 0) or \
        WindowSampler(10, 4, 1, 2, 2).indices(0, 1, 0) != s.indices(0, 1, 0)


def test_packing_from_arrow_columns_equals_packing_documents_one_by_one(tokenizer, tmp_path):
    from longctx.data import load_documents, record_format

    section = DataSection(seq_len=256, max_documents=5, passkey_documents=0, min_doc_tokens=300, num_proc=1)
    packed = build_packed(section, tokenizer, seed=0, cache_dir=str(tmp_path))
    docs = load_documents(section, seed=0)
    fmt = record_format(docs.column_names, None)
    one_by_one = pack_documents([tokenize_record(r, tokenizer, fmt) for r in docs], 256, min_doc_tokens=300)
    assert packed.documents == one_by_one.documents < len(docs)  # some documents are shorter than 300 tokens
    for name in ("input_ids", "position_ids", "labels"):
        np.testing.assert_array_equal(getattr(packed, name), getattr(one_by_one, name))


@pytest.mark.parametrize("lines, expected", [
    (['{"text": "a"}', '', '{"text": "b"}', '{"text": "c",}'], "bad.jsonl:4: not valid JSON (Expecting property name"),
    (['{"text": "a"}', '["a", "list"]'], "bad.jsonl:2: a record is a JSON object {...}, not a list"),
    (['{"text": "a"}', '{"txt": "b"}'], "bad.jsonl:2: no 'text' field, which the file's first record has"),
    (['{"prompt": "q", "completion": "a"}', '{"prompt": "q"}'], "bad.jsonl:2: no 'completion' field"),
])
def test_a_bad_json_line_is_named_as_file_and_line(tmp_path, lines, expected):
    from longctx.data import check_records

    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ConfigError) as error:
        check_records(str(path))
    message = str(error.value)
    assert message.startswith(f"data.path={str(path)!r}: cannot read json records: {path}:") and expected in message
    assert "row" not in message and len(message.splitlines()) == 1


def test_a_line_that_is_not_utf8_is_named_and_good_lines_pass(tmp_path):
    from longctx.data import check_records

    path = tmp_path / "docs.jsonl"
    path.write_bytes(b'{"text": "ok"}\n\n{"text": "caf\xe9"}\n')
    with pytest.raises(ConfigError, match=r"docs.jsonl:3: not UTF-8"):
        check_records(str(path))
    path.write_text('{"text": "a"}\n\n{"text": "b", "extra": 1}\n')
    assert check_records(str(path)) == "text"
