"""`longctx count-tokens`: tokens per file as training counts them, and documents past each length."""

import json

from transformers import AutoTokenizer

from longctx.cli import main
from longctx.token_count import count_documents, summarize


def test_counts_are_the_training_tokens_with_bos_and_eos(demo_dir, tmp_path):
    tok = AutoTokenizer.from_pretrained(demo_dir)
    data = tmp_path / "d.jsonl"
    texts = ["alpha beta", "gamma " * 50]
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    expected = [len(tok(t, add_special_tokens=False)["input_ids"]) + 2 for t in texts]  # bos + eos
    assert count_documents(str(data), tok) == expected


def test_summary_counts_documents_strictly_longer_than_each_length():
    assert summarize([10, 100, 101, 5000], [100, 4096]) == {
        "documents": 4, "tokens": 5211, "max": 5000, "longer_than": {"100": 2, "4096": 1}}
    assert summarize([], [10]) == {"documents": 0, "tokens": 0, "max": 0, "longer_than": {"10": 0}}


def test_count_tokens_command_per_file_and_total(demo_dir, tmp_path, capsys):
    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "a.jsonl").write_text("".join(json.dumps({"text": "word " * n}) + "\n" for n in (10, 300, 2000)))
    (folder / "b.jsonl").write_text(json.dumps({"prompt": "Q " * 40, "completion": "A " * 1500}) + "\n")
    assert main(["count-tokens", str(folder), "--tokenizer", str(demo_dir), "--lengths", "100,1k", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert set(report["files"]) == {str(folder / "a.jsonl"), str(folder / "b.jsonl")}
    assert report["files"][str(folder / "a.jsonl")]["longer_than"] == {"100": 2, "1024": 1}
    assert report["total"]["documents"] == 4 and report["total"]["longer_than"] == {"100": 3, "1024": 2}
    assert main(["count-tokens", str(folder), "--tokenizer", str(demo_dir)]) == 0
    assert "longer than" in capsys.readouterr().out


def test_count_tokens_refuses_bad_input_in_one_line(demo_dir, tmp_path, capsys):
    (tmp_path / "x.csv").write_text("a,b\n")
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "broken.jsonl").write_text("not json\n")
    for argv, message in [([str(tmp_path / "nope")], "path="), ([str(tmp_path / "x.csv")], "path="),
                          ([str(tmp_path / "empty.jsonl")], "empty.jsonl': no records in it"),
                          ([str(tmp_path / "broken.jsonl")], "broken.jsonl': cannot read json records"),
                          ([str(tmp_path), "--lengths", "4k,lots"], "--lengths=4k,lots"),
                          ([str(tmp_path)], "")]:
        tokenizer = str(demo_dir) if message else str(tmp_path / "missing")
        assert main(["count-tokens"] + argv + ["--tokenizer", tokenizer]) == 2
        err = capsys.readouterr().err.strip()
        assert (message or "--tokenizer") in err and len(err.splitlines()) == 1
