"""`pyfuse eval mc`: the logprob scores against a direct forward pass, the
generations against mlx-lm's own generate, the row format of both methods,
--limit, fixed batch composition across models, and bad input."""

from __future__ import annotations

import json
import os

import mlx.core as mx
import pytest

from pyfuse.data.mmlu import LETTERS, format_question, load_mc, read_results
from pyfuse.errors import UserError
from pyfuse.evals.mc import evaluate_mc
from pyfuse.lm.chat import chat_text
from pyfuse.lm.load import load_model

from helpers import read_jsonl, run_cli, write_jsonl

ROW_KEYS = {"id", "category", "gold", "prediction", "rule", "correct", "output", "method", "batch",
            "num_options", "n_tokens", "truncated", "logprobs"}

QUESTIONS = [
    ("astronomy", "Which planet is known as the red planet?", ["Mars", "Venus", "Jupiter", "Saturn", "Mercury",
                                                                "Neptune", "Uranus", "Pluto", "Earth", "Moon"]),
    ("chemistry", "What is the chemical symbol for gold?", ["Au", "Ag", "Gd", "Fe"]),
    ("history", "In which year did the Second World War end?", ["1945", "1939", "1918", "1950", "1944"]),
    ("math", "What is the derivative of $x^2$?", ["$2x$", "$x$", "$x^3$", "$2$", "$0$", "$4x$", "$x^2$"]),
    ("biology", "Which organ pumps blood through the body?", ["the heart", "the liver", "the lungs"]),
]


def make_rows(n=10):
    rows = []
    for i in range(n):
        cat, q, opts = QUESTIONS[i % len(QUESTIONS)]
        k = (i * 3) % len(opts)  # the gold moves around; 10-option items reach G-J
        opts = opts[k:] + opts[:k]
        ans = opts.index(QUESTIONS[i % len(QUESTIONS)][2][0])
        rows.append({"question_id": 100 + i, "question": q, "options": opts, "answer": LETTERS[ans],
                     "answer_index": ans, "cot_content": "", "category": cat, "src": "test"})
    return rows


@pytest.fixture(scope="module")
def mc_file(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("mc") / "items.jsonl", make_rows())


@pytest.fixture(scope="module")
def moe(tiny_moe_dir):
    return load_model(tiny_moe_dir)


def _full_logprobs(model, ids):
    """log P(token_t | tokens_<t) for t >= 1, from one plain forward pass."""
    logits = model(mx.array([ids]))[0].astype(mx.float32)
    lp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    return [lp[t - 1, ids[t]].item() for t in range(1, len(ids))]


def test_logprob_scores_equal_a_direct_forward_pass(moe, mc_file):
    items = load_mc(mc_file)
    res = evaluate_mc((moe.model, moe.tokenizer), mc_file, method="logprob", limit=4)
    tok = moe.tokenizer
    split_letters = 0
    for item, row in zip(items, res.rows):
        text, special = chat_text(tok, format_question(item))
        assert text.endswith("<think>\n\n</think>\n\n")  # enable_thinking=False reached the template
        cands = {x: tok.encode(text + "\\boxed{" + x, add_special_tokens=special)
                 for x in LETTERS[:item.num_options]}
        shared = len(os.path.commonprefix(list(cands.values())))
        expected = {}
        for x, ids in cands.items():
            lps = _full_logprobs(moe.model, ids)
            expected[x] = sum(lps[shared - 1:])  # the tokens after the shared prefix
            split_letters += len(ids) - shared > 1
        assert row["logprobs"].keys() == expected.keys()
        for x in expected:
            assert row["logprobs"][x] == pytest.approx(expected[x], abs=2e-4)
        best = max(expected, key=lambda x: (expected[x], -LETTERS.index(x)))
        assert row["prediction"] == best
        assert row["correct"] == (best == item.answer)
    # the tiny tokenizer merges "{A".."{F" but splits "{" "G": both paths were scored
    assert split_letters > 0


def test_generate_equals_mlx_lm_generate(moe, mc_file):
    from mlx_lm.generate import stream_generate

    res = evaluate_mc((moe.model, moe.tokenizer), mc_file, method="generate", batch_size=1, limit=3,
                      max_tokens=10)
    items = load_mc(mc_file)
    for item, row in zip(items, res.rows):
        text, special = chat_text(moe.tokenizer, format_question(item))
        ids = moe.tokenizer.encode(text, add_special_tokens=special)
        tokens = [r.token for r in stream_generate(moe.model, moe.tokenizer, ids, max_tokens=10)]
        tokens = [t for t in tokens if t not in moe.tokenizer.eos_token_ids]
        assert row["output"] == moe.tokenizer.decode(tokens)
        assert row["n_tokens"] == len(tokens)
        assert row["truncated"] == (len(tokens) == 10)


def test_both_methods_write_the_same_row_format_and_limit(moe, mc_file, tmp_path):
    outs = {}
    for method in ("generate", "logprob"):
        out = tmp_path / f"{method}.jsonl"
        res = evaluate_mc((moe.model, moe.tokenizer), mc_file, method=method, batch_size=2, limit=5,
                          max_tokens=4, out=out)
        assert res.n == 5 and len(res.rows) == 5 and res.out == out
        rows = read_jsonl(out)
        assert rows == res.rows
        assert all(set(r) == ROW_KEYS for r in rows)
        assert [r["batch"] for r in rows] == [0, 0, 1, 1, 2]
        assert [r["id"] for r in rows] == [100, 101, 102, 103, 104]
        parsed = read_results(out)  # the schema of pyfuse.data.mmlu.MCResult
        assert [p.correct for p in parsed] == [r["correct"] for r in rows]
        assert res.correct == sum(r["correct"] for r in rows)
        outs[method] = rows
    gen, lp = outs["generate"], outs["logprob"]
    assert all(r["method"] == "generate" and r["logprobs"] is None and isinstance(r["output"], str)
               for r in gen)
    assert all(r["method"] == "logprob" and r["rule"] == "logprob" and r["output"] is None
               and r["prediction"] in LETTERS for r in lp)
    assert [r["gold"] for r in gen] == [r["gold"] for r in lp]


def test_batch_composition_is_the_same_for_every_model(tiny_moe_dir, tiny_llama_dir, mc_file, monkeypatch):
    import importlib

    gen = importlib.import_module("mlx_lm.generate")  # (mlx_lm.generate is also a function)
    calls = []
    original = gen.batch_generate

    def recording(model, tokenizer, prompts, **kw):
        calls.append((id(model), [list(p) for p in prompts], kw["prefill_batch_size"],
                      kw["completion_batch_size"]))
        return original(model, tokenizer, prompts, **kw)

    monkeypatch.setattr(gen, "batch_generate", recording)
    for model in (tiny_moe_dir, tiny_llama_dir):  # different models, the same tokenizer
        evaluate_mc(model, mc_file, method="generate", batch_size=4, max_tokens=3)
    moe_calls = [c for c in calls if c[0] == calls[0][0]]
    llama_calls = [c for c in calls if c[0] != calls[0][0]]
    assert [len(c[1]) for c in moe_calls] == [4, 4, 2]
    assert [c[1] for c in moe_calls] == [c[1] for c in llama_calls]
    # each batch is decoded alone: no continuous batching across batches
    assert all(c[2] == c[3] == len(c[1]) for c in calls)


def test_categories_filter_then_limit(moe, mc_file):
    res = evaluate_mc((moe.model, moe.tokenizer), mc_file, method="logprob", categories=["math", "biology"],
                      limit=3)
    assert [r["category"] for r in res.rows] == ["math", "biology", "math"]
    assert set(res.per_category) == {"math", "biology"}
    with pytest.raises(UserError, match=r"unknown category 'physics'; the data has: astronomy, biology"):
        evaluate_mc((moe.model, moe.tokenizer), mc_file, categories=["physics"])


def test_cli_runs_and_prints_a_summary(tiny_moe_dir, mc_file, tmp_path):
    out = tmp_path / "r.jsonl"
    r = run_cli("eval", "mc", "--model", tiny_moe_dir, "--data", mc_file, "--method", "logprob",
                "--limit", "3", "--out", out)
    assert r.code == 0
    assert len(read_results(out)) == 3
    assert f"wrote {out}" in r.out
    r = run_cli("eval", "mc", "--model", tiny_moe_dir, "--data", mc_file, "--method", "logprob",
                "--limit", "2", "--json")
    assert r.code == 0
    summary = json.loads(r.out)
    assert summary["n"] == 2 and summary["method"] == "logprob"


def _bad_cases(tmp_path, mc_file, tiny_moe_dir):
    bad_row = tmp_path / "bad.jsonl"
    rows = make_rows(3)
    rows[1]["answer"] = "Z"
    write_jsonl(bad_row, rows)
    not_json = write_jsonl(tmp_path / "notjson.jsonl", [make_rows(1)[0], "{oops"])
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    broken_model = tmp_path / "broken_model"
    broken_model.mkdir()
    (broken_model / "config.json").write_text('{"model_type": "no_such_arch"}')
    m, d = str(tiny_moe_dir), str(mc_file)
    return [
        (["--model", m, "--data", str(bad_row)], "bad.jsonl: line 2: field 'answer'"),
        (["--model", m, "--data", str(not_json)], "notjson.jsonl: line 2: not valid JSON"),
        (["--model", m, "--data", str(empty)], "empty.jsonl: no items"),
        (["--model", m, "--data", str(tmp_path / "missing.jsonl")], "missing.jsonl: no such file"),
        (["--model", m, "--data", d, "--categories", "law"], "unknown category 'law'"),
        (["--model", str(broken_model), "--data", d], "broken_model: cannot load the model"),
        (["--model", str(tmp_path / "nope"), "--data", d], "model path"),
        (["--model", str(tmp_path), "--data", d], "no config.json"),
        (["--model", m, "--data", d, "--limit", "0"], "limit must be a positive integer"),
        (["--model", m, "--data", d, "--batch-size", "0"], "batch_size must be a positive integer"),
    ]


def test_bad_input_is_one_line_and_exit_2(tmp_path, mc_file, tiny_moe_dir):
    for args, fragment in _bad_cases(tmp_path, mc_file, tiny_moe_dir):
        r = run_cli("eval", "mc", *args, "--method", "logprob")
        err = r.err.strip().splitlines()
        assert r.code == 2, args
        assert len(err) == 1 and err[0].startswith("pyfuse eval: error: "), err
        assert fragment in err[0], (fragment, err[0])
