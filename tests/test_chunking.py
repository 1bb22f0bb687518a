"""Chunking keeps every token once (or exactly the overlap twice); semantic chunks respect paragraphs and tokens."""

import json

import pytest
from transformers import AutoTokenizer

from longctx.chunking import fixed_windows, reorder, semantic_chunks
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


def test_bad_windows_are_refused():
    with pytest.raises(ValueError, match="overlap"):
        fixed_windows(10, 4, 4)


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


def test_chunk_and_count_tokens_commands(demo_dir, tmp_path, capsys):
    doc = tmp_path / "doc.txt"
    doc.write_text("one two three four five six seven eight nine ten " * 30)
    out = tmp_path / "chunks.jsonl"
    assert main(["chunk", str(doc), "--tokenizer", str(demo_dir), "--window", "50", "--overlap", "10",
                 "--out", str(out)]) == 0
    rows = [json.loads(l) for l in out.read_text().splitlines()]
    assert rows[0]["start"] == 0 and rows[1]["start"] == 40
    assert main(["chunk", str(doc), "--tokenizer", str(demo_dir), "--window", "5", "--overlap", "5"]) == 2
    assert "--window/--overlap" in capsys.readouterr().err
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"text": "word " * n}) + "\n" for n in (10, 300, 2000)))
    assert main(["count-tokens", str(data), "--tokenizer", str(demo_dir), "--lengths", "100,1k", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["total"]["documents"] == 3 and report["total"]["longer_than"] == {"100": 2, "1024": 1}
