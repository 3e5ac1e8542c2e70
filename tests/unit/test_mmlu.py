"""pyfuse.data.mmlu: loading MMLU-Pro rows (JSONL and Parquet), validation errors
that name file, line/row and field, the prompt, atomic JSON writing, and
per-item eval results."""

from __future__ import annotations

import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pyfuse.data import mmlu
from pyfuse.errors import UserError
from pyfuse.evals import extract_answer
from pyfuse.data.mmlu import MCItem, format_question, load_mc, match_results, read_results
from pyfuse.io.files import read_jsonl, write_json, write_jsonl

from helpers import mmlu_row as row
from helpers import result_row as result
from helpers import write_jsonl as write_raw_jsonl


def test_load_jsonl_and_parquet_agree(tmp_path):
    rows = [row(i, category=c, options=[f"o{j}" for j in range(n)], answer="ABCDEFGHIJ"[n - 1],
                answer_index=n - 1)
            for i, (c, n) in enumerate([("math", 10), ("law", 2), ("law", 7)], start=100)]
    j = load_mc(write_raw_jsonl(tmp_path / "d.jsonl", rows))
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    p = load_mc(tmp_path / "d.parquet")
    assert j == p
    assert [it.question_id for it in j] == [100, 101, 102]
    assert [it.num_options for it in j] == [10, 2, 7]
    assert j[0].answer == "J" and j[0].options[9] == "o9"


def test_limit_and_blank_lines(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(row(1)) + "\n\n" + json.dumps(row(2)) + "\n" + json.dumps(row(3)) + "\n")
    assert [it.question_id for it in load_mc(path)] == [1, 2, 3]
    assert [it.question_id for it in load_mc(path, limit=2)] == [1, 2]
    with pytest.raises(UserError, match="limit"):
        load_mc(path, limit=0)


def test_trailing_na_options_dropped_and_null_cot(tmp_path):
    path = write_raw_jsonl(tmp_path / "d.jsonl", [row(1, options=["x", "y", "z", "N/A", "N/A"],
                                                       cot_content=None)])
    (item,) = load_mc(path)
    assert item.options == ["x", "y", "z"] and item.cot_content == ""


@pytest.mark.parametrize("over,field", [
    ({"answer": "C"}, "answer"),                       # disagrees with answer_index 1
    ({"answer_index": 7}, "answer_index"),             # beyond 4 options
    ({"answer": "K"}, "answer"),                       # not A-J
    ({"options": ["only"], "answer": "A", "answer_index": 0}, "options"),
    ({"options": [str(i) for i in range(11)]}, "options"),
    ({"question": ""}, "question"),
    ({"category": 3}, "category"),
    ({"question_id": 1.5}, "question_id"),
    ({"answer_index": "1"}, "answer_index"),
])
def test_bad_row_names_file_line_and_field(tmp_path, over, field):
    path = write_raw_jsonl(tmp_path / "bad.jsonl", [row(1), row(2), row(3, **over)])
    with pytest.raises(UserError) as exc:
        load_mc(path)
    msg = str(exc.value)
    assert str(path) in msg and "line 3" in msg and f"field '{field}'" in msg


def test_missing_field_and_parquet_row_number(tmp_path):
    rows = [row(1), row(2), row(3)]
    del rows[2]["category"]
    path = write_raw_jsonl(tmp_path / "m.jsonl", rows)
    with pytest.raises(UserError, match=r"line 3: field 'category'"):
        load_mc(path)
    rows[2]["category"] = "math"
    rows[1]["answer_index"] = 0
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "m.parquet")
    with pytest.raises(UserError, match=r"m\.parquet: row 1 \(0-based\): field 'answer'"):
        load_mc(tmp_path / "m.parquet")


def test_file_level_errors(tmp_path):
    with pytest.raises(UserError, match="no such file"):
        load_mc(tmp_path / "absent.jsonl")
    with pytest.raises(UserError, match="no such file"):
        load_mc(tmp_path / "absent.parquet")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(UserError, match="no items"):
        load_mc(tmp_path / "empty.jsonl")
    (tmp_path / "junk.parquet").write_text("not parquet")
    with pytest.raises(UserError, match="Parquet"):
        load_mc(tmp_path / "junk.parquet")
    (tmp_path / "broken.jsonl").write_text(json.dumps(row(1)) + "\n{not json\n")
    with pytest.raises(UserError, match="line 2: not valid JSON"):
        load_mc(tmp_path / "broken.jsonl")
    (tmp_path / "list.jsonl").write_text("[1, 2]\n")
    with pytest.raises(UserError, match="line 1: expected a JSON object"):
        load_mc(tmp_path / "list.jsonl")
    write_raw_jsonl(tmp_path / "dup.jsonl", [row(1), row(2), row(1)])
    with pytest.raises(UserError, match="line 3: field 'question_id'.*repeats line 1"):
        load_mc(tmp_path / "dup.jsonl")


def test_format_question_lists_options_and_asks_for_a_box():
    item = MCItem.model_validate(row(5, options=["red", "green", "blue"], answer="C", answer_index=2))
    text = format_question(item)
    assert text.startswith("What is 5 + 1?")
    assert "A. red\nB. green\nC. blue" in text
    assert "D." not in text
    assert "\\boxed{X}" in text
    # The instruction's example "\boxed{X}" must not read as an answer.
    assert extract_answer(text, 3) == (None, "none")


def test_write_jsonl_roundtrip_and_atomic(tmp_path, monkeypatch):
    path = tmp_path / "sub" / "out.jsonl"
    rows = [{"a": 1, "é": "ü"}, MCItem.model_validate(row(2))]
    write_jsonl(path, rows)
    back = read_jsonl(path)
    assert back[0] == {"a": 1, "é": "ü"} and MCItem.model_validate(back[1]) == rows[1]
    assert "ü" in path.read_text(encoding="utf-8")  # UTF-8, not \u escapes
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask  # as open() would create it

    # A failure at the final rename leaves the old file and no temporary.
    before = path.read_bytes()

    def boom(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError):
        write_jsonl(path, [{"new": True}])
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert sorted(p.name for p in path.parent.iterdir()) == ["out.jsonl"]

    write_json(tmp_path / "x.json", {"b": [1, 2]})
    assert json.loads((tmp_path / "x.json").read_text()) == {"b": [1, 2]}


def test_read_results_validates(tmp_path):
    write_raw_jsonl(tmp_path / "r.jsonl", [result(1, True), result("q2", False, prediction=None)])
    rs = read_results(tmp_path / "r.jsonl")
    assert [(r.id, r.correct) for r in rs] == [(1, True), ("q2", False)]
    write_raw_jsonl(tmp_path / "bad.jsonl", [result(1, True), result(2, "yes")])
    with pytest.raises(UserError, match=r"line 2: field 'correct'"):
        read_results(tmp_path / "bad.jsonl")
    write_raw_jsonl(tmp_path / "noid.jsonl", [{"correct": True}])
    with pytest.raises(UserError, match=r"line 1: field 'id'"):
        read_results(tmp_path / "noid.jsonl")
    write_raw_jsonl(tmp_path / "dup.jsonl", [result(1, True), result(1, False)])
    with pytest.raises(UserError, match="repeats line 1"):
        read_results(tmp_path / "dup.jsonl")


def test_match_results_pairs_by_id_and_rejects_different_items():
    a = [mmlu.MCResult.model_validate(result(i, i % 2 == 0)) for i in (1, 2, 3)]
    b = [mmlu.MCResult.model_validate(result(i, True)) for i in ("3", 1, 2)]  # "3" is 3
    pairs = match_results(a, b)
    assert [(x.id, str(y.id)) for x, y in pairs] == [(1, "1"), (2, "2"), (3, "3")]
    with pytest.raises(UserError, match=r"1 only in a.*1 only in b"):
        match_results(a, b[:2] + [mmlu.MCResult.model_validate(result(9, True))])
