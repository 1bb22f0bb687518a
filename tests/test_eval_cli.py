"""`longctx eval` and the end-of-training hook: reports with their structure, real PNGs, bad input refused."""

import json

import matplotlib.image
import pytest

from longctx.cli import main
from longctx.config import EvalSection
from longctx.evaluation import run_at_end
from longctx.evaluation.common import document_texts, parse_lengths

PNG = b"\x89PNG\r\n\x1a\n"


def assert_readable_png(path, min_width=600):
    assert path.read_bytes().startswith(PNG)
    height, width, _ = matplotlib.image.imread(path).shape
    assert width >= min_width and height >= 300


def test_run_at_end_writes_every_report_with_pngs(tiny_model_dir, tmp_path):
    section = EvalSection(at_end=["ppl", "needle", "middle"], lengths=[256, 128], depths=[0.0, 1.0], trials=1)
    summary = run_at_end(str(tiny_model_dir), section, str(tmp_path))
    assert set(summary) == {"ppl", "needle", "middle"} and all(isinstance(v, str) for v in summary.values())
    for name in ("ppl", "needle", "middle"):
        assert_readable_png(tmp_path / f"{name}.png")
    ppl = json.loads((tmp_path / "ppl.json").read_text())
    (rows,) = ppl["models"].values()
    assert [r["length"] for r in rows] == [128, 256] and all(r["ppl"] > 1 and r["documents"] == 8 for r in rows)
    needle = json.loads((tmp_path / "needle.json").read_text())
    assert needle["lengths"] == [128, 256] and needle["depths"] == [0.0, 1.0] and len(needle["cells"]) == 4
    scores = needle["scores"]  # [depth][length]
    assert len(scores) == 2 and all(len(row) == 2 and all(0 <= s <= 1 for s in row) for row in scores)
    middle = json.loads((tmp_path / "middle.json").read_text())
    assert set(middle) == {"none", "first-last"} and len(middle["none"]["accuracy_by_rank"]) == 6


def test_ppl_compares_rope_methods_on_the_same_weights(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "ppl"
    assert main(["eval", "ppl", "--model", str(tiny_model_dir), "--lengths", "64,128", "--stride", "32",
                 "rope.method=none,linear", "rope.factor=4", "--out", str(out)]) == 0
    report = json.loads((out / "ppl.json").read_text())
    plain, linear = report["models"].values()
    assert list(report["models"])[1].endswith("method=linear factor=4")
    assert plain[0]["tokens_scored"] == linear[0]["tokens_scored"] == plain[1]["tokens_scored"]
    assert [r["rope_type"] for r in report["rope"].values()] == ["default", "linear"]
    assert list(report["rope"].values())[1]["factor"] == 4
    assert abs(plain[0]["ppl"] / linear[0]["ppl"] - 1) > 1e-6  # the override reached the model's forward
    assert_readable_png(out / "ppl.png")
    assert "reports in" in capsys.readouterr().out


def test_needle_and_middle_read_the_users_documents(tiny_model_dir, tmp_path):
    data = tmp_path / "docs.jsonl"
    data.write_text("".join(json.dumps({"text": f"Document {i}. " + "The tide came in over the flats. " * 40}) + "\n"
                            for i in range(3)))
    out = tmp_path / "needle"
    assert main(["eval", "needle", "--model", str(tiny_model_dir), "--data", str(data), "--lengths", "128",
                 "--depths", "0,1", "--trials", "1", "--needles", "2", "--retrieve", "all", "--out", str(out)]) == 0
    report = json.loads((out / "needle.json").read_text())
    assert report["needles"] == 2 and all(len(c["answers"]) == 2 for c in report["cells"])
    assert main(["eval", "middle", "--model", str(tiny_model_dir), "--data", str(data), "--passages", "3",
                 "--trials", "1", "--reorder", "none,reverse", "--out", str(tmp_path / "middle")]) == 0
    assert set(json.loads((tmp_path / "middle" / "middle.json").read_text())) == {"none", "reverse"}


def test_document_texts_read_every_training_format(tmp_path):
    (tmp_path / "a.jsonl").write_text(json.dumps({"prompt": "Q? ", "completion": "A."}) + "\n" +
                                      json.dumps({"prompt": "R? ", "completion": "B."}) + "\n")
    (tmp_path / "b.jsonl").write_text(json.dumps({"messages": [{"role": "user", "content": "hi"},
                                                               {"role": "assistant", "content": "hello"}]}) + "\n")
    (tmp_path / "c.txt").write_text("line one\nline two\n")
    texts = document_texts([str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl"), str(tmp_path / "c.txt")])
    assert texts == ["Q? A.", "R? B.", "hi\nhello", "line one\nline two\n"]


def test_lengths_parse_with_suffixes():
    assert parse_lengths("1k,32K,128k,1m,4096,1.5k") == [1024, 32768, 131072, 1048576, 4096, 1536]


@pytest.mark.parametrize("argv, message", [
    (["eval", "needle", "--model", "{m}", "--lengths", "1k,abc"], "--lengths=1k,abc: 'abc' is not a length"),
    (["eval", "ppl", "--model", "{m}", "--lengths", "0"], "--lengths=0: '0' is not a length"),
    (["eval", "needle", "--model", "/no/model"], "--model /no/model: not a directory"),
    (["eval", "recall", "--model", "{m}"], "invalid choice: 'recall'"),
    (["eval", "middle", "--model", "{m}", "--reorder", "none,sideways"], "--reorder: 'sideways' is not one of"),
    (["eval", "middle", "--model", "{m}", "--passages", "1"], "--passages=1: must be 2..20"),
    (["eval", "needle", "--model", "{m}", "--trials", "0"], "--trials=0: must be >= 1"),
    (["eval", "needle", "--model", "{m}", "--needles", "9"], "--needles=9: must be 1..8"),
    (["eval", "needle", "--model", "{m}", "--depths", "0,1.5"], "--depths=0,1.5: depths are fractions"),
    (["eval", "needle", "--model", "{m}", "--lengths", "8"], "--lengths: 8 tokens cannot hold 1 needle(s)"),
    (["eval", "needle", "--model", "{m}", "--model", "{m}"], "--model: needle evaluates one model at a time"),
    (["eval", "ppl", "--model", "{m}", "--lengths", "64,128", "--stride", "64"], "--stride=64: must be in 1..63"),
    (["eval", "ppl", "--model", "{m}", "--stride", "8", "--score-last", "8"], "not allowed with argument"),
    (["eval", "ppl", "--model", "{m}", "rope.bogus=1"], "rope.bogus=1"),
    (["eval", "ppl", "--model", "{m}", "method=yarn"], "method=yarn: RoPE overrides are written rope.key=value"),
    (["eval", "ppl", "--model", "{m}", "rope.method=yarn"], "rope.method=yarn: needs rope.factor or rope.target_length"),
    (["eval", "ppl", "--model", "{m}", "rope.factor=4", "rope.factor=2"], "rope.factor: given twice"),
    (["eval", "ppl", "--model", "{m}", "--model", "{m}/../{name}"], "models need directories whose last two parts differ"),
    (["eval", "ppl", "--model", "{demo}"], "no weights in it"),
    (["eval", "ppl", "--model", "{m}", "--data", "/no/data.jsonl"], "--data /no/data.jsonl: no such file"),
    (["eval", "ppl", "--model", "{m}", "--data", "{short}", "--lengths", "1k"], "no --data document reaches 1k tokens"),
])
def test_bad_eval_arguments_exit_2_with_one_line_and_write_nothing(tiny_model_dir, demo_dir, tmp_path, capsys, argv,
                                                                   message):
    short_doc = tmp_path / "short.txt"
    short_doc.write_text("too short to evaluate at a thousand tokens")
    out = tmp_path / "out"
    argv = [a.replace("{m}", str(tiny_model_dir)).replace("{short}", str(short_doc)).replace("{demo}", str(demo_dir))
            .replace("{name}", tiny_model_dir.name) for a in argv]
    assert main(argv + ["--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err
    assert not out.exists()


def test_out_that_is_a_file_is_refused(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "report.json"
    out.write_text("{}")
    assert main(["eval", "ppl", "--model", str(tiny_model_dir), "--out", str(out)]) == 2
    assert f"--out {out}: a file, not a directory" in capsys.readouterr().err
    assert out.read_text() == "{}"


@pytest.mark.parametrize("task, expected", [
    ("middle", ["--reorder {none,first-last,reverse}[,...]", "(default: none,first-last,reverse)",
                "questions per rank, each with new passages (>= 1) (default: 3)"]),
    ("needle", ["fractions of the context in [0, 1], comma-separated (default: 0,0.25,0.5,0.75,1)",
                "--retrieve {one,all}", "or every value (multi-value) (default: one)"]),
    ("ppl", ["windows scored together (>= 1) (default: 4)", "report directory (default: out/eval-ppl)"]),
])
def test_help_of_each_task_shows_choices_and_defaults(capsys, task, expected):
    with pytest.raises(SystemExit) as exit:
        main(["eval", task, "--help"])
    out = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert exit.value.code == 0 and all(e in out for e in expected), out
