"""Set-G mining: membership, stratified and deterministic train/test splits
(fractions, a validation set carved from train), the mlx-lm chat format,
errors, and the `pyfuse setg` CLI; the stratified MMLU-Pro sampler
(`pyfuse setg mine`)."""

from __future__ import annotations


import numpy as np
import pytest

from pyfuse.cli import main
from pyfuse.errors import UserError
from pyfuse.data.mmlu import format_question, load_mc
from pyfuse.data.setg import SPLITS, justification, mine_setg, split_sizes

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


def fractions(train: float) -> dict:
    return {"train": train, "test": round(1 - train, 12)}


def test_setg_is_both_wrong_and_split_partitions_it(tmp_path):
    paths, both_wrong, rows = make_case(tmp_path)
    res = mine_setg(paths["base"], paths["persona"], paths["data"], fractions(0.7), 0.1, 3, tmp_path / "out")
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
        for valid_frac in (0.0, 0.1, 0.25):
            res = mine_setg(paths["base"], paths["persona"], paths["data"], fractions(frac), valid_frac, 1)
            n_cat = {c: sum(cat_of[i] == c for i in both_wrong) for c in CATEGORY_SIZES}
            for cat, n in n_cat.items():
                got = {s: sum(cat_of[i] == cat for i in res.splits[s]) for s in SPLITS}
                # train + valid is the category's train share (rounded, halves up), valid carved from it
                n_train = int(np.floor(frac * n + 0.5))
                assert got["train"] + got["valid"] == n_train and got["test"] == n - n_train, (cat, got)
                assert got["valid"] == int(np.floor(valid_frac * n_train + 0.5)), (cat, got)
            total = sum(len(v) for v in res.splits.values())
            assert abs(len(res.splits["test"]) / total - (1 - frac)) < 0.03
            assert not res.splits["valid"] if valid_frac == 0 else res.splits["valid"]


def test_the_studys_split_and_the_rule_alone():
    # 2,312 Set-G items over 14 categories, 70/30: ~692 test items (the study: 1,620 / 692)
    sizes = {f"c{i}": n for i, n in enumerate([717, 542, 441, 404, 391, 363, 1061, 827, 1299, 1251, 717,
                                               1049, 906, 1134])}
    total = sum(sizes.values())
    setg = {c: round(n * 2312 / total) for c, n in sizes.items()}
    got = split_sizes(setg, {"train": 0.7, "test": 0.3})
    test = sum(v["test"] for v in got.values())
    assert abs(test - 692) <= 7 and sum(v["train"] for v in got.values()) + test == sum(setg.values())
    assert all(v["valid"] == 0 for v in got.values())
    # tiny categories: a 1-item category goes to train, a 2-item one gives one to each
    assert split_sizes({"a": 1, "b": 2}, {"train": 0.7, "test": 0.3}) == {
        "a": {"train": 1, "valid": 0, "test": 0}, "b": {"train": 1, "valid": 0, "test": 1}}
    for bad in ({"train": 0.7}, {"train": 0.7, "test": 0.4}, {"train": 0, "test": 1}, {"train": 0.7, "test": 0.3,
                                                                                       "valid": 0.1}):
        with pytest.raises(UserError, match="split"):
            split_sizes({"a": 3}, bad)
    with pytest.raises(UserError, match="valid_frac"):
        split_sizes({"a": 3}, None, 1.0)


def test_deterministic_byte_for_byte_and_seed_sensitive(tmp_path):
    paths, _, _ = make_case(tmp_path)
    outs = [tmp_path / n for n in ("a", "b", "c")]
    mine_setg(paths["base"], paths["persona"], paths["data"], fractions(0.7), 0.1, 5, outs[0])
    # The same inputs in another line order give the same files.
    for name in ("base", "persona", "data"):
        lines = paths[name].read_text().splitlines(keepends=True)
        order = np.random.default_rng(9).permutation(len(lines))
        paths[name].write_text("".join(lines[i] for i in order))
    mine_setg(paths["base"], paths["persona"], paths["data"], fractions(0.7), 0.1, 5, outs[1])
    mine_setg(paths["base"], paths["persona"], paths["data"], fractions(0.7), 0.1, 6, outs[2])
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
    res = mine_setg(paths["base"], paths["persona"], paths["data"], fractions(0.7), 0.1, 0, out)
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
    res = mine_setg(paths["base"], paths["persona"], paths["data"], fractions(0.7), 0.1, 0, tmp_path / "out")

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
        with pytest.raises(UserError, match="split"):
            mine_setg(base, persona, rows, {"train": frac, "test": 0.3})
    with pytest.raises(UserError, match="seed"):
        mine_setg(base, persona, rows, fractions(0.7), seed=-1)
    # no validation set unless asked; asked, it must not come out empty
    assert mine_setg(base, persona, rows).splits["valid"] == []
    with pytest.raises(UserError, match="valid split"):
        mine_setg(base, persona, rows, fractions(0.7), valid_frac=0.001)


def test_cli_writes_and_prints_table(tmp_path, capsys):
    paths, both_wrong, _ = make_case(tmp_path)
    out = tmp_path / "cli-out"
    rc = main(["setg", "--base", str(paths["base"]), "--persona", str(paths["persona"]),
               "--data", str(paths["data"]), "--split", "train=0.7,test=0.3", "--valid-frac", "0.1", "--seed", "3",
               "--out", str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    assert f"Set-G: {len(both_wrong)} of {sum(CATEGORY_SIZES.values())}" in text
    assert "math" in text and "chemistry" in text
    # The CLI and the API give the same files.
    mine_setg(paths["base"], paths["persona"], paths["data"], split=fractions(0.7), valid_frac=0.1, seed=3,
              out=tmp_path / "api")
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


# --- the stratified MMLU-Pro sampler (`pyfuse setg mine`) ------------------------------

def _mmlu_pro_rows(sizes: dict, seed: int = 0) -> list[dict]:
    """Rows in MMLU-Pro's schema (every column), ids shuffled across categories."""
    rng = np.random.default_rng(seed)
    rows = []
    for cat, n in sizes.items():
        for j in range(n):
            k = int(rng.integers(4, 11))
            a = int(rng.integers(0, k))
            rows.append({"question_id": int(rng.integers(0, 10 ** 6)) * 100 + len(rows), "question": f"{cat} {j}?",
                         "options": [f"o{i}" for i in range(k)] + ["N/A"] * (10 - k), "answer": "ABCDEFGHIJ"[a],
                         "answer_index": a, "cot_content": "", "category": cat, "src": f"ori_mmlu-{cat}"})
    order = rng.permutation(len(rows))
    return [rows[i] for i in order]


def test_sampler_allocation_is_stratified_and_exact():
    from pyfuse.data.sampler import allocate

    sizes = {"law": 1101, "math": 1351, "health": 818, "physics": 1299, "business": 789, "other": 924,
             "biology": 717, "chemistry": 1132, "computer science": 410, "economics": 844, "engineering": 969,
             "history": 381, "philosophy": 499, "psychology": 798}
    total = sum(sizes.values())
    q = allocate(sizes, 6000, "proportional")
    assert sum(q.values()) == 6000 and set(q) == set(sizes)
    # Hamilton's method written out: floors, then the largest remainders (ties: name order)
    exact = {c: 6000 * n / total for c, n in sizes.items()}
    floors = {c: int(v) for c, v in exact.items()}
    extra = sorted(sizes, key=lambda c: (-(exact[c] - floors[c]), c))[:6000 - sum(floors.values())]
    assert q == {c: floors[c] + (c in extra) for c in sizes}
    assert all(abs(q[c] - exact[c]) < 1 for c in sizes)
    # equal: 6000 / 14 each where possible; the small categories give all they have, the rest is shared
    e = allocate({"a": 100, "b": 5000, "c": 5000}, 3000, "equal")
    assert e == {"a": 100, "b": 1450, "c": 1450}
    assert allocate({"a": 3, "b": 3}, 5, "equal") == {"a": 3, "b": 2}
    for n in (0, total + 1):
        with pytest.raises(UserError, match="cannot sample"):
            allocate(sizes, n)
    with pytest.raises(UserError, match="allocation"):
        allocate(sizes, 10, "random")


def test_sampler_is_deterministic_keeps_every_column_and_the_file_order(tmp_path):
    from pyfuse.data.sampler import sample_mmlu

    sizes = {"law": 40, "math": 55, "health": 12, "history": 7}
    rows = _mmlu_pro_rows(sizes)
    data = write_jsonl(tmp_path / "mmlu.jsonl", rows)
    res = sample_mmlu(data, 60, seed=4, out=tmp_path / "a.jsonl")
    got = read_jsonl(tmp_path / "a.jsonl")
    assert len(got) == 60 and {c: sum(r["category"] == c for r in got) for c in sizes} == \
        {c: v["chosen"] for c, v in res.counts.items()}
    assert [r["question_id"] for r in got] == res.ids
    index = {r["question_id"]: i for i, r in enumerate(rows)}
    assert [index[r["question_id"]] for r in got] == sorted(index[r["question_id"]] for r in got)  # file order
    assert all(r == rows[index[r["question_id"]]] for r in got)  # every column as read, N/A padding included
    # the same seed gives the same sample whatever the file's row order; another seed another sample
    shuffled = write_jsonl(tmp_path / "shuffled.jsonl", [rows[i] for i in np.random.default_rng(1).permutation(len(rows))])
    assert set(sample_mmlu(shuffled, 60, seed=4).ids) == set(res.ids)
    assert set(sample_mmlu(data, 60, seed=5).ids) != set(res.ids)
    # Parquet in and out (the Hugging Face release's format)
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "mmlu.parquet")
    res_pq = sample_mmlu(tmp_path / "mmlu.parquet", 60, seed=4, out=tmp_path / "b.parquet")
    assert res_pq.ids == res.ids
    assert pq.read_table(tmp_path / "b.parquet").to_pylist() == got
    with pytest.raises(UserError, match="is the input data"):
        sample_mmlu(data, 10, out=data)


def test_cli_setg_mine(tmp_path, capsys):
    rows = _mmlu_pro_rows({"law": 30, "math": 30, "history": 3})
    data = write_jsonl(tmp_path / "mmlu.jsonl", rows)
    assert main(["setg", "mine", "--data", str(data), "--n", "21", "--allocation", "equal", "--seed", "2",
                 "--out", str(tmp_path / "s.jsonl")]) == 0
    text = capsys.readouterr().out
    assert "sampled 21 of 63 rows over 3 categories (equal, seed 2)" in text
    got = read_jsonl(tmp_path / "s.jsonl")
    assert sorted(r["category"] for r in got).count("history") == 3 and len(got) == 21
    before = data.read_bytes()
    assert main(["setg", "mine", "--data", str(data), "--n", "100", "--out", str(tmp_path / "t.jsonl")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("pyfuse setg: error: cannot sample 100 rows from 63") and err.count("\n") == 1
    assert data.read_bytes() == before and not (tmp_path / "t.jsonl").exists()
    # the split command still needs its inputs
    assert main(["setg", "--out", str(tmp_path / "x")]) == 2
    assert "required: --base, --persona, --data" in capsys.readouterr().err
