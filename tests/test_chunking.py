"""Chunking keeps every token once (or the overlap twice); semantic chunks respect sections, paragraphs, tokens."""

import json

import pytest
from transformers import AutoTokenizer

from longctx.chunking import fixed_windows, reorder, semantic_chunks, token_starts
from longctx.cli import main


@pytest.mark.parametrize("n, window, overlap", [(100, 10, 0), (101, 10, 3), (7, 10, 2), (64, 8, 7)])
def test_fixed_windows_cover_every_token_with_exactly_the_overlap(n, window, overlap):
    spans = fixed_windows(n, window, overlap)
    assert spans[0][0] == 0 and spans[-1][1] == n
    assert all(e - s <= window for s, e in spans)
    for (s1, e1), (s2, e2) in zip(spans, spans[1:]):
        assert e1 - s2 == overlap  # consecutive windows share exactly `overlap` tokens
    seen = [0] * n
    for s, e in spans:
        for t in range(s, e):
            seen[t] += 1
    if overlap == 0:
        assert seen == [1] * n


def test_bad_windows_are_refused_and_no_tokens_make_no_window(demo_dir):
    with pytest.raises(ValueError, match="overlap"):
        fixed_windows(10, 4, 4)
    with pytest.raises(ValueError, match="max_tokens=0"):
        semantic_chunks("text", AutoTokenizer.from_pretrained(demo_dir), 0)
    assert fixed_windows(0, 4) == []


def test_semantic_chunks_rejoin_to_the_text_and_never_split_a_token(demo_dir):
    tok = AutoTokenizer.from_pretrained(demo_dir)
    paragraphs = [f"Paragraph {i}: " + "alpha beta gamma delta " * (1 + 2 * (i % 4)) for i in range(12)]
    text = "\n\n".join(paragraphs) + "\n\n" + "x" * 3000  # one paragraph far over the cap
    chunks = semantic_chunks(text, tok, max_tokens=120)
    assert "".join(chunks) == text
    starts = [a for a, _ in tok(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]]
    cuts, pos = [], 0
    for c in chunks[:-1]:
        pos += len(c)
        cuts.append(pos)
    assert all(cut in starts for cut in cuts)  # every cut falls between two tokens of the whole text
    bounds = [0] + [starts.index(c) for c in cuts] + [len(starts)]
    assert all(0 < b - a <= 120 for a, b in zip(bounds, bounds[1:]))
    x_block = text.index("xxx")
    paragraph_cuts = [c for c in cuts if c <= x_block]
    assert len(paragraph_cuts) >= 3 and all(text[c - 2:c] == "\n\n" for c in paragraph_cuts)  # whole paragraphs
    assert len([c for c in cuts if c > x_block]) >= 2  # the long paragraph is cut by the token cap


def test_reorder_puts_the_best_at_the_ends():
    ranked = ["r1", "r2", "r3", "r4", "r5", "r6"]
    assert reorder(ranked, "first-last") == ["r1", "r3", "r5", "r6", "r4", "r2"]
    assert reorder(ranked, "reverse") == ["r6", "r5", "r4", "r3", "r2", "r1"]
    assert reorder(ranked, "none") == ranked
    with pytest.raises(ValueError, match="strategy"):
        reorder(ranked, "middle")


def chunk_token_bounds(chunks, starts):
    """Token index where each chunk starts (asserting it is a token boundary of the whole text), and the end."""
    bounds, pos = [0], 0
    for c in chunks[:-1]:
        pos += len(c)
        assert pos in starts, f"cut at character {pos} is inside a token"
        bounds.append(starts.index(pos))
    return bounds + [len(starts)]


def test_semantic_chunks_keep_sections_whole_and_headings_with_their_body(demo_dir):
    tok = AutoTokenizer.from_pretrained(demo_dir)
    sections = [f"# Section {s}\n\n" + "\n\n".join(f"Point {s}.{p}: " + "ocean river stone " * 6 for p in range(3))
                for s in range(6)]
    text = "\n\n".join(sections) + "\n"
    section_tokens = max(len(tok(s + "\n\n", add_special_tokens=False)["input_ids"]) for s in sections)
    cap = section_tokens + section_tokens // 2  # one section fits, two do not
    chunks = semantic_chunks(text, tok, max_tokens=cap)
    assert "".join(chunks) == text
    starts = token_starts(text, tok)
    bounds = chunk_token_bounds(chunks, starts)
    assert all(0 < b - a <= cap for a, b in zip(bounds, bounds[1:]))
    assert all(c.lstrip().startswith("# Section") for c in chunks)  # every chunk opens a section
    assert not any(c.rstrip().splitlines()[-1].startswith("#") for c in chunks)  # no heading left without its body


def test_fixed_window_text_is_the_source_text_even_inside_multibyte_characters(demo_dir, tmp_path):
    """Byte-level tokens can split one character; a window's text is the source between token boundaries."""
    text = "Grüße aus Köln — 東京 und 🚀 rockets. " * 20
    doc = tmp_path / "utf8.txt"
    doc.write_text(text, encoding="utf-8")
    out = tmp_path / "chunks.jsonl"
    assert main(["chunk", str(doc), "--tokenizer", str(demo_dir), "--window", "7", "--out", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert "".join(r["text"] for r in rows) == text  # no overlap: every token, and character, exactly once
    assert all(r["end"] - r["start"] <= 7 for r in rows)
    assert rows[-1]["end"] == len(token_starts(text, AutoTokenizer.from_pretrained(demo_dir)))


def test_chunk_command_windows_overlap_and_refusals(demo_dir, tmp_path, capsys):
    doc = tmp_path / "doc.txt"
    doc.write_text("one two three four five six seven eight nine ten " * 30)
    out = tmp_path / "chunks.jsonl"
    assert main(["chunk", str(doc), "--tokenizer", str(demo_dir), "--window", "50", "--overlap", "10",
                 "--out", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["start"] for r in rows[:3]] == [0, 40, 80] and all(r["end"] - r["start"] == 50 for r in rows[:-1])
    for argv, message in [(["--window", "5", "--overlap", "5"], "--window/--overlap"),
                          (["--semantic", "0"], "--semantic=0"),
                          (["--semantic", "50", "--overlap", "3"], "--overlap=3: applies to --window only"),
                          (["--window", "5", "--out", str(tmp_path / "no" / "x.jsonl")], "its directory does not exist"),
                          (["--window", "5", "--semantic", "5"], "not allowed with argument")]:
        assert main(["chunk", str(doc), "--tokenizer", str(demo_dir)] + argv) == 2
        assert message in capsys.readouterr().err
    assert main(["chunk", str(doc), "--tokenizer", str(tmp_path / "none"), "--window", "5"]) == 2
    assert "--tokenizer" in capsys.readouterr().err


def test_chunk_cuts_each_record_of_a_data_file_and_semantic_rows_carry_token_spans(demo_dir, tmp_path):
    tok = AutoTokenizer.from_pretrained(demo_dir)
    texts = ["# One\n\n" + "alpha beta gamma " * 40 + "\n\n" + "delta epsilon " * 30, "short record"]
    data = tmp_path / "docs.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    chat = tmp_path / "chat.jsonl"
    chat.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"},
                                             {"role": "assistant", "content": "hello"}]}) + "\n")
    for mode in (["--window", "16", "--overlap", "4"], ["--semantic", "40"]):
        out = tmp_path / f"chunks{mode[0]}.jsonl"
        assert main(["chunk", str(data), "--tokenizer", str(demo_dir), *mode, "--out", str(out)]) == 0
        rows = [json.loads(line) for line in out.read_text().splitlines()]
        assert not any('"text"' in r["text"] for r in rows)  # the records' texts, not the file's JSON
        for document, text in enumerate(texts):
            mine = [r for r in rows if r["document"] == document]
            starts = token_starts(text, tok)
            assert mine[0]["start"] == 0 and mine[-1]["end"] == len(starts)
            for r in mine:
                assert r["text"] == text[(starts + [len(text)])[r["start"]]:(starts + [len(text)])[r["end"]]]
            if mode[0] == "--semantic":  # consecutive spans, rejoining to the record
                assert all(a["end"] == b["start"] for a, b in zip(mine, mine[1:]))
                assert "".join(r["text"] for r in mine) == text and all(r["end"] - r["start"] <= 40 for r in mine)
    out = tmp_path / "chat-chunks.jsonl"
    assert main(["chunk", str(chat), "--tokenizer", str(demo_dir), "--window", "64", "--out", str(out)]) == 0
    assert [json.loads(line)["text"] for line in out.read_text().splitlines()] == ["hi\nhello"]


def test_chunk_names_a_bad_line_of_a_data_file(demo_dir, tmp_path, capsys):
    data = tmp_path / "docs.jsonl"
    data.write_text('{"text": "a"}\n{"text": \n')
    out = tmp_path / "chunks.jsonl"
    assert main(["chunk", str(data), "--tokenizer", str(demo_dir), "--window", "8", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: file=") and f"{data}:2: not valid JSON" in err
    assert not out.exists()
