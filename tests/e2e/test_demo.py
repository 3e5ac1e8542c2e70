"""`pyfuse demo --quick`: the stacking-confound experiment end to end on the
default model, through the CLI, checked against independent computations:
results.json's statistics recomputed with statsmodels from the `correct`
lists, the verdict recomputed from the pre-registered criterion, Set-G
recomputed from the mining evaluations, the zero-delta preserve fuse
bit-identical to the persona; the report and plots; the verdict on screen;
a rerun that resumes (no step runs again, nothing is rewritten, the cached
model is reused) with identical results; refusals. How long a rerun takes
is measured in bench/bench_demo.py.

Uses the session's default-model cache (conftest's default_model_cache)."""

from __future__ import annotations

from fractions import Fraction

import pytest

from pyfuse.cli import main

from helpers import file_mtimes, read_json, run_cli, run_plan, step_rows

CONDITIONS = ["base", "persona", "A1", "A0", "A1-unfused", "A1-stochastic", "A1-preserve", "A0-preserve"]
PAIRS = [("A1", "A0"), ("A1", "persona"), ("A0", "persona"), ("A1-unfused", "persona"), ("A1-stochastic", "persona"),
         ("A1-preserve", "persona"), ("A0-preserve", "persona")]


@pytest.fixture(scope="module")
def demo(tmp_path_factory, default_model_cache):
    out = tmp_path_factory.mktemp("demo") / "run"
    run = run_cli("demo", "--quick", "--out", out, "--cache", default_model_cache)
    assert run.code == 0, run.err[-3000:]
    return {"out": out, "cache": default_model_cache, "stdout": run.out, "stderr": run.err,
            "results": read_json(out / "results.json")}


def test_results_shape_and_setg(demo):
    res, out = demo["results"], demo["out"]
    assert set(res) == {"conditions", "comparisons", "prereg", "verdict"}
    assert sorted(res["conditions"]) == sorted(CONDITIONS)
    ids = res["conditions"]["A1"]["ids"]
    assert len(ids) >= 15
    for name in CONDITIONS:
        c = res["conditions"][name]
        assert c["ids"] == ids and c["n"] == len(ids) == len(c["correct"])
        assert set(c["correct"]) <= {0, 1}
        assert c["accuracy"] == pytest.approx(sum(c["correct"]) / c["n"])
        assert 0 <= c["identity"] <= c["identity_n"] == 6
    # Set-G recomputed: the test items are items that both mining evaluations got wrong
    plan = run_plan(out)
    mining = {s["labels"][0]: s["dir"] for s in plan["steps"] if s["labels"][0].startswith("setg: evaluate")}
    assert len(mining) == 2
    wrong = [{r["id"] for r in step_rows(out, d) if not r["correct"]} for d in mining.values()]
    assert set(ids) <= wrong[0] & wrong[1]
    setg_dir = out / "steps" / plan["setg"]
    split = read_json(setg_dir / "data" / "items.json")
    assert sorted(map(str, split["test"])) == sorted(map(str, ids))
    assert not set(map(str, split["train"])) & set(map(str, split["test"]))
    assert len(split["train"]) + len(split["valid"]) + len(split["test"]) == len(wrong[0] & wrong[1])
    # ... so base and persona are wrong on all of them, by construction: Set-G is mined with the models of
    # the conditions `base` and `persona`, which are then scored on the test split like every other
    # condition (their test rows are their mining rows, letter scores included)
    assert res["conditions"]["base"]["accuracy"] == res["conditions"]["persona"]["accuracy"] == 0
    for role in ("base", "persona"):
        mined = {r["id"]: r for r in step_rows(out, mining[f"setg: evaluate {role} ({role})"])}
        scored = step_rows(out, plan["conditions"][role]["mc"])
        assert [r["id"] for r in scored] == ids
        assert [(r["prediction"], r["logprobs"]) for r in scored] == \
            [(mined[i]["prediction"], mined[i]["logprobs"]) for i in ids]
    mining_steps = {s["dir"]: s for s in plan["steps"] if s["dir"] in mining.values()}
    persona_eval = next(s for s in plan["steps"] if s["dir"] == plan["conditions"]["persona"]["mc"])
    assert persona_eval["inputs"]["model"] == mining_steps[mining["setg: evaluate persona (persona)"]][
        "inputs"]["model"] == plan["conditions"]["persona"]["model"]  # one persona model, fused once


def test_statistics_match_statsmodels(demo):
    from statsmodels.stats.contingency_tables import mcnemar
    from statsmodels.stats.proportion import confint_proportions_2indep, proportions_ztest

    res = demo["results"]
    conds = res["conditions"]
    got = {(c["a"], c["b"]): c for c in res["comparisons"]}
    assert list(got) == PAIRS
    plan = run_plan(demo["out"])
    for (a, b), c in got.items():
        ca, cb = conds[a]["correct"], conds[b]["correct"]
        n = len(ca)
        both = sum(x and y for x, y in zip(ca, cb))
        a_only = sum(x and not y for x, y in zip(ca, cb))
        b_only = sum(y and not x for x, y in zip(ca, cb))
        assert c["flips"] == {"both_correct": both, "a_only": a_only, "b_only": b_only,
                              "both_wrong": n - both - a_only - b_only}
        assert c["n"] == n and c["diff"] == pytest.approx((sum(ca) - sum(cb)) / n)
        assert c["mcnemar_p"] == pytest.approx(
            mcnemar([[both, a_only], [b_only, n - both - a_only - b_only]], exact=True).pvalue)
        k1, k2 = sum(ca), sum(cb)
        if k1 + k2 in (0, 2 * n):
            assert c["ztest_p"] == 1.0
        else:
            assert c["ztest_p"] == pytest.approx(proportions_ztest([k1, k2], [n, n])[1])
        low, high = confint_proportions_2indep(k1, n, k2, n, method="newcomb", compare="diff", alpha=0.05)
        assert c["ci"] == pytest.approx([low, high])
        # changed answers, from the evaluation rows' predictions
        pa = [r["prediction"] for r in step_rows(demo["out"], plan["conditions"][a]["mc"])]
        pb = [r["prediction"] for r in step_rows(demo["out"], plan["conditions"][b]["mc"])]
        assert c["changed_predictions"] == sum(x != y for x, y in zip(pa, pb))


def test_verdict_is_the_locked_criterion(demo):
    from statsmodels.stats.contingency_tables import mcnemar

    res, out = demo["results"], demo["out"]
    lock = read_json(out / "prereg.json")
    assert res["prereg"]["sha256"] == lock["sha256"]
    assert res["prereg"]["criterion"] == "diff(A1, A0) >= 5pp and mcnemar_p(A1, A0) < 0.05"
    a1, a0 = res["conditions"]["A1"]["correct"], res["conditions"]["A0"]["correct"]
    diff = Fraction(sum(a1) - sum(a0), len(a1))
    table = [[sum(x and y for x, y in zip(a1, a0)), sum(x and not y for x, y in zip(a1, a0))],
             [sum(y and not x for x, y in zip(a1, a0)), sum(not x and not y for x, y in zip(a1, a0))]]
    p = mcnemar(table, exact=True).pvalue
    expected = diff >= Fraction(5, 100) and p < 0.05
    assert res["verdict"]["passed"] is expected
    assert ("is MET" if expected else "is NOT MET") in res["verdict"]["text"]
    # the power warning (from A0's observed accuracy): at this n a 5-point threshold is under-powered
    if 0 < res["conditions"]["A0"]["accuracy"] < 1:
        assert any("under-powered" in w for w in res["verdict"]["warnings"])


def test_preserve_zero_delta_is_bit_identical_and_fuse_reports(demo):
    res, out = demo["results"], demo["out"]
    persona, a0p = res["conditions"]["persona"], res["conditions"]["A0-preserve"]
    assert a0p["correct"] == persona["correct"]
    cmp = next(c for c in res["comparisons"] if (c["a"], c["b"]) == ("A0-preserve", "persona"))
    assert cmp["changed_predictions"] == 0 and cmp["mcnemar_p"] == 1.0
    plan = run_plan(out)
    fuses = {}
    for name in ("A1", "A0", "A1-preserve", "A0-preserve", "A1-stochastic"):
        stage = [s for s in plan["conditions"][name]["stages"] if s["kind"] == "fuse"][-1]
        fuses[name] = read_json(out / "steps" / stage["step"] / "done.json")["summary"]
    assert fuses["A0-preserve"]["codes_changed"] == 0 and fuses["A0-preserve"]["delta_norm"] == 0
    assert fuses["A0"]["delta_norm"] == 0 and fuses["A0"]["codes_changed"] > 0  # stock: noise
    assert fuses["A1"]["delta_norm"] > 0 and fuses["A1"]["noise"] > 0
    assert 0.8 < fuses["A1-stochastic"]["retention"] < 1.2
    # the zero-delta stock fuse is measured against its noise floor
    noise = [s for s in plan["steps"] if s["kind"] == "noise-floor"]
    assert {s["options"]["policy"] for s in noise} == {"stock", "preserve", "stochastic"}


def test_report_and_screen(demo):
    out, res = demo["out"], demo["results"]
    report = (out / "report.md").read_text()
    assert res["verdict"]["text"] in report
    for section in ("## Conditions", "## Comparisons", "## Fuses and the noise floor", "## Identity",
                    "## Pre-registration"):
        assert section in report
    for png in ("accuracy.png", "flips.png", "noise_floor.png", "identity.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"]({png})" in report
    # the demo sets neither planned_n nor baseline_accuracy: the report says what the power check uses instead
    assert "None" not in report.split("## Pre-registration")[1]
    assert "- Power check: planned n not set, the observed n is used; baseline accuracy not set" in report
    spec = (out / "demo.yaml").read_text()
    assert "quick, reduced" in spec and (out / "inputs" / "mmlu.jsonl").is_file()
    # the screen ends with the verdict sentence and where the report is
    lines = [x for x in demo["stdout"].splitlines() if x.strip()]
    assert lines[-1] == f"Report: {out / 'report.md'}"
    verdict = lines[-2]
    assert verdict.startswith("Verdict: MET." if res["verdict"]["passed"] else "Verdict: NOT MET.")
    a1 = res["conditions"]["A1"]
    assert f"On {a1['n']} held-out Set-G items" in verdict and f"{a1['accuracy'] * 100:.1f} %" in verdict
    assert "pyfuse demo: [1/" in demo["stderr"]  # progress


def test_rerun_resumes_with_identical_results(demo):
    """A rerun on the same OUT resumes: every step is skipped, no step's
    output, input copy or spec is rewritten, and the cached default model is
    reused, not rebuilt (what made the rerun take seconds)."""
    out, cache = demo["out"], demo["cache"]
    before = (out / "results.json").read_bytes()
    steps_before, inputs_before = file_mtimes(out / "steps"), file_mtimes(out / "inputs")
    spec_before = (out / "demo.yaml").stat().st_mtime_ns
    model_before = file_mtimes(cache)
    n_steps = len(run_plan(out)["steps"])
    run = run_cli("demo", "--quick", "--out", out, "--cache", cache)
    assert run.code == 0, run.err
    assert f"0 step(s) run, {n_steps} already done" in run.err
    assert "building the default model" not in run.err
    assert file_mtimes(out / "steps") == steps_before and file_mtimes(out / "inputs") == inputs_before
    assert (out / "demo.yaml").stat().st_mtime_ns == spec_before
    assert file_mtimes(cache) == model_before
    assert (out / "results.json").read_bytes() == before
    assert run.out.splitlines()[-1] == f"Report: {out / 'report.md'}"


def test_refusals(demo, tmp_path, capsys):
    # the full demo into the quick one's directory: refused before anything is touched
    spec_before = (demo["out"] / "demo.yaml").read_text()
    assert main(["demo", "--out", str(demo["out"]), "--cache", str(demo["cache"])]) == 2
    assert "holds a quick demo run" in capsys.readouterr().err
    assert (demo["out"] / "demo.yaml").read_text() == spec_before
    # a directory with other things in it
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    assert main(["demo", "--quick", "--out", str(other), "--cache", str(demo["cache"])]) == 2
    assert "not a pyfuse demo run" in capsys.readouterr().err
    assert sorted(p.name for p in other.iterdir()) == ["notes.txt"]
