"""Set-G mining: membership, stratified and deterministic splits, the
mlx-lm chat format, errors, and the `pyfuse setg` CLI."""

from __future__ import annotations


import numpy as np
import pytest

from pyfuse.cli import main
from pyfuse.errors import UserError
from pyfuse.data.mmlu import format_question, load_mc
from pyfuse.data.setg import SPLITS, justification, mine_setg

from helpers import read_json, read_jsonl, write_jsonl

# Category sizes of the synthetic eval set, including tiny ones.
CATEGORY_SIZES = {"math": 120, "law": 90, "physics": 60, "history": 25, "other": 7, "chemistry": 3,
                  "philosophy": 2, "health": 1}
LONG_COT = ("A: Let's think step by step. " + " ".join(f"Step {i} shows that the quantity is {i}."
                                                        for i in range(40)) + " The answer is (C).")


def make_case(tmp_path, seed=0, p_wrong=0.7):
    """Data, base and persona result files; both models wrong with a known
    pattern (returned as the set of both-wrong ids)."""
    rng = np.random.default_rng(seed)
    rows, base, persona, both_wrong = [], [], [], set()
    qid = 1000
    for cat, n in CATEGORY_SIZES.items():
        for _ in range(n):
            k = int(rng.integers(2, 11))
            ans = int(rng.integers(0, k))
            cot = ["", "A: Let's think step by step. Because reasons. The answer is (X).", LONG_COT][qid % 3]
            rows.append({"question_id": qid, "question": f"Question {qid} about {cat}?",
                         "options": [f"option {j} of {qid}" for j in range(k)],
                         "answer": "ABCDEFGHIJ"[ans], "answer_index": ans,
                         "cot_content": cot.replace("(X)", f"({'ABCDEFGHIJ'[ans]})"),
                         "category": cat, "src": "test"})
            b_ok, p_ok = rng.random() > p_wrong, rng.random() > p_wrong
            if cat == "health":
                b_ok = p_ok = False  # the 1-item category is in Set-G
            if not b_ok and not p_ok:
                both_wrong.add(qid)
            for res, ok in ((base, b_ok), (persona, p_ok)):
                res.append({"id": qid, "category": cat, "gold": "ABCDEFGHIJ"[ans],
                            "prediction": None if not ok else "ABCDEFGHIJ"[ans],
                            "rule": "none", "correct": bool(ok), "output": "..."})
            qid += 1
    paths = {name: write_jsonl(tmp_path / f"{name}.jsonl", data)
             for name, data in (("data", rows), ("base", base), ("persona", persona))}
    return paths, both_wrong, rows


def test_setg_is_both_wrong_and_split_partitions_it(tmp_path):
    paths, both_wrong, rows = make_case(tmp_path)
    res = mine_setg(paths["base"], paths["persona"], paths["data"], 0.7, 3, tmp_path / "out")
    ids = [i for s in SPLITS for i in res.splits[s]]
    assert len(ids) == len(set(ids)) == len(both_wrong) == res.n_setg
    assert set(ids) == both_wrong
    assert res.n_items == sum(CATEGORY_SIZES.values())
    items = read_json(tmp_path / "out" / "items.json")
    assert items == res.splits
    counts = read_json(tmp_path / "out" / "counts.json")
    assert counts["total"] == {**{s: len(items[s]) for s in SPLITS}, "total": len(both_wrong)}
    cat_of = {r["question_id"]: r["category"] for r in rows}
    for cat, c in counts["categories"].items():
        for s in SPLITS:
            assert c[s] == sum(cat_of[i] == cat for i in items[s])


def test_split_is_stratified(tmp_path):
    paths, both_wrong, rows = make_case(tmp_path)
    cat_of = {r["question_id"]: r["category"] for r in rows}
    for frac in (0.7, 0.5, 0.8):
        res = mine_setg(paths["base"], paths["persona"], paths["data"], frac, 1)
        n_cat = {c: sum(cat_of[i] == c for i in both_wrong) for c in CATEGORY_SIZES}
        for cat, n in n_cat.items():
            if n == 0:
                continue
            got = {s: sum(cat_of[i] == cat for i in res.splits[s]) for s in SPLITS}
            # Each category's train share is frac up to rounding, and the
            # rest is halved between valid and test up to one item.
            assert abs(got["train"] - frac * n) <= 0.5, (cat, got)
            assert abs(got["valid"] - got["test"]) <= 1, (cat, got)
        total = sum(len(v) for v in res.splits.values())
        assert abs(len(res.splits["train"]) / total - frac) < 0.03


def test_tiny_categories_fill_both_heldout_splits(tmp_path):
    # 8 categories of 2 Set-G items: 1 train each, and the odd leftovers
    # must be shared between valid and test (not all in test).
    data, res = [], []
    for i in range(16):
        data.append({"question_id": i, "question": f"q{i}", "options": ["a", "b"], "answer": "A",
                     "answer_index": 0, "category": f"c{i // 2}"})
        res.append({"id": i, "correct": False})
    r = mine_setg(res, res, data, 0.7, 0)
    assert [len(r.splits[s]) for s in SPLITS] == [8, 4, 4]
    assert all(c["train"] == 1 for c in r.counts.values())


def test_deterministic_byte_for_byte_and_seed_sensitive(tmp_path):
    paths, _, _ = make_case(tmp_path)
    outs = [tmp_path / n for n in ("a", "b", "c")]
    mine_setg(paths["base"], paths["persona"], paths["data"], 0.7, 5, outs[0])
    # The same inputs in another line order give the same files.
    for name in ("base", "persona", "data"):
        lines = paths[name].read_text().splitlines(keepends=True)
        order = np.random.default_rng(9).permutation(len(lines))
        paths[name].write_text("".join(lines[i] for i in order))
    mine_setg(paths["base"], paths["persona"], paths["data"], 0.7, 5, outs[1])
    mine_setg(paths["base"], paths["persona"], paths["data"], 0.7, 6, outs[2])
    names = ["train.jsonl", "valid.jsonl", "test.jsonl", "items.json", "counts.json"]
    for name in names:
        assert (outs[0] / name).read_bytes() == (outs[1] / name).read_bytes(), name
    a, c = (read_json(o / "items.json") for o in (outs[0], outs[2]))
    assert set(a["train"]) != set(c["train"]) and set(a["test"]) != set(c["test"])
    # ... while the per-category counts do not depend on the seed.
    ca, cc = (read_json(o / "counts.json") for o in (outs[0], outs[2]))
    assert ca["categories"] == cc["categories"]


def test_chat_format_matches_the_data(tmp_path):
    paths, _, _ = make_case(tmp_path)
    out = tmp_path / "out"
    res = mine_setg(paths["base"], paths["persona"], paths["data"], 0.7, 0, out)
    items = {it.question_id: it for it in load_mc(paths["data"])}
    raw = {r["question_id"]: r for r in read_jsonl(paths["data"])}
    for split in SPLITS:
        lines = read_jsonl(out / f"{split}.jsonl")
        assert len(lines) == len(res.splits[split])
        for qid, ex in zip(res.splits[split], lines):
            user, assistant = ex["messages"]
            assert (user["role"], assistant["role"]) == ("user", "assistant")
            assert user["content"] == format_question(items[qid])
            assert f"option 0 of {qid}" in user["content"]
            first, *rest = assistant["content"].split("\n")
            assert first == "\\boxed{%s}" % raw[qid]["answer"]
            if raw[qid]["cot_content"]:
                assert len(rest) == 1 and rest[0] and len(rest[0]) <= 300
                assert "step by step" not in rest[0] and "The answer is" not in rest[0]
            else:
                assert rest == []


def test_output_loads_as_mlx_lm_chat_dataset(tmp_path):
    datasets = pytest.importorskip("mlx_lm.tuner.datasets")
    paths, _, _ = make_case(tmp_path)
    res = mine_setg(paths["base"], paths["persona"], paths["data"], 0.7, 0, tmp_path / "out")

    class Config:  # mlx-lm's defaults: chat_feature="messages"
        pass

    train, valid, test = datasets.load_local_dataset(tmp_path / "out", tokenizer=None, config=Config())
    for ds, split in zip((train, valid, test), SPLITS):
        assert isinstance(ds, datasets.ChatDataset)
        assert len(ds) == len(res.splits[split])


def test_justification():
    cot = "A: Let's think step by step. Water boils at 100 C at sea level.\nSo it is hot. The answer is (B)."
    assert justification(cot) == "Water boils at 100 C at sea level. So it is hot."
    assert justification("") == ""
    line = justification(LONG_COT)
    assert len(line) <= 300 and "\n" not in line
    assert line.endswith("Step 39 shows that the quantity is 39.")  # the conclusion end is kept
    assert line.startswith("Step ")  # whole sentences
    one = justification("A: Let's think step by step. " + "word " * 200 + "end.")
    assert len(one) <= 300 and one.endswith("…")


def test_errors(tmp_path):
    paths, _, rows = make_case(tmp_path)
    base, persona = read_jsonl(paths["base"]), read_jsonl(paths["persona"])
    with pytest.raises(UserError, match="different items"):
        mine_setg(base, persona[:-1], paths["data"])
    with pytest.raises(UserError, match="data does not contain"):
        mine_setg(base, persona, rows[1:])
    bad_gold = [dict(r, gold="J" if r["gold"] != "J" else "A") if i == 0 else r for i, r in enumerate(base)]
    with pytest.raises(UserError, match="gold"):
        mine_setg(bad_gold, persona, rows)
    all_right = [dict(r, correct=True) for r in base]
    with pytest.raises(UserError, match="Set-G is empty"):
        mine_setg(all_right, persona, rows)
    one_wrong = [dict(r, correct=(i != 0)) for i, r in enumerate(base)]
    with pytest.raises(UserError, match="would be empty"):
        mine_setg(one_wrong, persona, rows)
    for frac in (0, 1, 1.5, -0.1):
        with pytest.raises(UserError, match="train_frac"):
            mine_setg(base, persona, rows, frac)
    with pytest.raises(UserError, match="seed"):
        mine_setg(base, persona, rows, 0.7, -1)


def test_cli_writes_and_prints_table(tmp_path, capsys):
    paths, both_wrong, _ = make_case(tmp_path)
    out = tmp_path / "cli-out"
    rc = main(["setg", "--base", str(paths["base"]), "--persona", str(paths["persona"]),
               "--data", str(paths["data"]), "--train-frac", "0.7", "--seed", "3", "--out", str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    assert f"Set-G: {len(both_wrong)} of {sum(CATEGORY_SIZES.values())}" in text
    assert "math" in text and "chemistry" in text
    # The CLI and the API give the same files.
    mine_setg(paths["base"], paths["persona"], paths["data"], train_frac=0.7, seed=3, out=tmp_path / "api")
    for name in ("train.jsonl", "valid.jsonl", "test.jsonl", "items.json", "counts.json"):
        assert (out / name).read_bytes() == (tmp_path / "api" / name).read_bytes()


def test_cli_bad_input_is_one_line_exit_2(tmp_path, capsys):
    paths, _, _ = make_case(tmp_path)
    lines = paths["persona"].read_text().splitlines(keepends=True)
    (tmp_path / "short.jsonl").write_text("".join(lines[:-3]))
    rc = main(["setg", "--base", str(paths["base"]), "--persona", str(tmp_path / "short.jsonl"),
               "--data", str(paths["data"]), "--out", str(tmp_path / "o")])
    assert rc == 2
    err = capsys.readouterr().err
    assert err.startswith("pyfuse setg: error:") and err.count("\n") == 1
    assert "3 only in base" in err
    assert not (tmp_path / "o").exists()  # nothing written on error
    rc = main(["setg", "--base", str(paths["base"]), "--persona", str(paths["persona"]),
               "--data", str(tmp_path / "missing.parquet"), "--out", str(tmp_path / "o")])
    assert rc == 2 and "missing.parquet: no such file" in capsys.readouterr().err
