"""The persona check: the rules on replies, the built-in suite's examples
(every GOOD passes, every BAD fails), log P(good) vs log P(bad) against
mlx-lm's own model in NumPy, the command, bad suites."""

from __future__ import annotations

import json

import mlx.core as mx
import numpy as np
import pytest

from pyfuse.errors import UserError
from pyfuse.evals.persona import BUILTIN_SUITE, check_reply, evaluate_persona, load_persona_suite

from helpers import run_cli, write_yaml


def test_rules():
    s = load_persona_suite({"prompts": [{"prompt": "p", "good": "g", "bad": "b"}], "forbidden": ["Great question"],
                            "markers": ["ship"], "max_words": 4})
    assert check_reply("Ship it now.", s)["passes"]
    r = check_reply("great  QUESTION! ship it", s)
    assert r["forbidden"] == ["Great question"] and not r["passes"]
    assert not check_reply("Merge it.", s)["passes"]  # no marker
    assert check_reply("ship it now please okay", s)["too_long"]
    assert not check_reply("   ", s)["passes"]


def test_builtin_examples_are_told_apart():
    s = load_persona_suite()
    assert [p["prompt"] for p in s.prompts] == [p["prompt"] for p in BUILTIN_SUITE["prompts"]]
    assert all(check_reply(p["good"], s)["passes"] for p in s.prompts)
    assert not any(check_reply(p["bad"], s)["passes"] for p in s.prompts)


def test_evaluate_against_mlx_lm(tiny_llama_dir):
    from mlx_lm import load

    r = evaluate_persona(tiny_llama_dir)
    assert r.warnings == [] and len(r.rows) == 3
    model, tok = load(str(tiny_llama_dir))
    for p, row in zip(BUILTIN_SUITE["prompts"], r.rows):
        prompt = tok.apply_chat_template([{"role": "user", "content": p["prompt"]}], add_generation_prompt=True,
                                         enable_thinking=False)
        for key in ("good", "bad"):
            reply = tok.encode(p[key], add_special_tokens=False)
            full = prompt + reply
            logits = np.array(model(mx.array([full[:-1]])).astype(mx.float32), np.float64)[0]
            m = logits.max(-1, keepdims=True)
            logp = logits - m - np.log(np.exp(logits - m).sum(-1, keepdims=True))
            expected = sum(logp[len(prompt) + i - 1, t] for i, t in enumerate(reply))
            assert row[f"logp_{key}"] == pytest.approx(expected, rel=1e-4, abs=1e-3)
        assert row["prefers_good"] == (row["logp_good"] > row["logp_bad"])
        assert row["passes"] == check_reply(row["output"], load_persona_suite())["passes"]


def test_command_and_bad_suites(tiny_llama_dir, tmp_path):
    res = run_cli("eval", "persona", "--model", tiny_llama_dir, "--json", "--out", tmp_path / "rows.jsonl")
    assert res.code == 0, res.err
    summary = json.loads(res.out)
    assert summary["n"] == 3 and len((tmp_path / "rows.jsonl").read_text().splitlines()) == 3
    printed = run_cli("eval", "persona", "--print-suite")
    suite = write_yaml(tmp_path / "s.yaml", __import__("yaml").safe_load(printed.out))
    assert load_persona_suite(suite).prompts == BUILTIN_SUITE["prompts"]
    weak = load_persona_suite({"prompts": [{"prompt": "p", "good": "Great question", "bad": "fine"}],
                               "forbidden": ["Great question"]})
    from pyfuse.evals.persona import _example_warnings

    assert len(_example_warnings(weak)) == 2
    for bad, fragment in [({"prompts": []}, "non-empty list"), ({"prompts": [{"prompt": "p"}]}, "good and bad"),
                          ({"prompts": [{"prompt": "p", "good": "g", "bad": "b"}], "max_words": 0}, "max_words"),
                          ({"prompt": []}, "unknown key")]:
        with pytest.raises(UserError, match=fragment):
            load_persona_suite(bad)
    res = run_cli("eval", "persona", "--model", tiny_llama_dir, "--suite", tmp_path / "none.yaml")
    assert res.code == 2 and "does not exist" in res.err
