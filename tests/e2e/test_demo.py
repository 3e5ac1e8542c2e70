"""`pyfuse demo --quick`: the stacking-confound experiment end to end on the
default model, through the CLI, checked against independent computations:
results.json's statistics recomputed with statsmodels from the `correct`
lists, the verdict recomputed from the pre-registered criterion with its
Holm-adjusted family, Set-G recomputed from the mining evaluations (70/30,
a validation set carved from train), the second dataset a stratified
sample, the placebo and dithered controls' null distributions, the flips by
margin (scipy), the zero-delta preserve fuse bit-identical to the persona;
the report and plots; the power before data on screen; the verdict on screen;
a rerun that resumes (no step runs again, nothing is rewritten, the cached
model is reused) with identical results; refusals. How long a rerun takes
is measured in bench/bench_demo.py.

Uses the session's default-model cache (conftest's default_model_cache)."""

from __future__ import annotations

import json
import math
from fractions import Fraction
from pathlib import Path

import pytest

from pyfuse.cli import main

from helpers import file_mtimes, identical, model_tensors, read_json, read_jsonl, run_cli, run_plan, step_rows

IDENTITY_SCORED = ["base", "persona", "A1", "A0", "A1-unfused", "A1-stochastic", "A1-preserve", "A0-preserve"]
CONDITIONS = IDENTITY_SCORED + ["A1-faithful", "A0-faithful"]
SEEDS = 3  # the quick configuration's members of each control
MEMBERS = [f"{f}.{i}" for f in ("placebo", "dithered") for i in range(SEEDS)]
PAIRS = [("A1", "A0"), ("A1", "persona"), ("A0", "persona"), ("A1-unfused", "persona"), ("A1-stochastic", "persona"),
         ("A1-preserve", "persona"), ("A0-preserve", "persona"), ("A1-faithful", "persona"), ("A0-faithful", "persona")]
# the per-policy table: each fuse of the trained adapter and its zero-delta twin
TWINS = {"A1": "A0", "A1-stochastic": None, "A1-preserve": "A0-preserve", "A1-faithful": "A0-faithful"}


@pytest.fixture(scope="module")
def demo(tmp_path_factory, default_model_cache):
    out = tmp_path_factory.mktemp("demo") / "run"
    run = run_cli("demo", "--quick", "--out", out, "--cache", default_model_cache)
    assert run.code == 0, run.err[-3000:]
    return {"out": out, "cache": default_model_cache, "stdout": run.out, "stderr": run.err,
            "results": read_json(out / "results.json")}


def _primary(res: dict) -> dict:
    return {(c["a"], c["b"]): c for c in res["comparisons"] if c["dataset"] == res["datasets"][0]}


def test_results_shape_and_setg(demo):
    res, out = demo["results"], demo["out"]
    assert set(res) == {"datasets", "conditions", "comparisons", "behaviour_comparisons", "family", "families", "nulls", "flips",
                        "decomposition", "prereg", "verdict", "policies", "pairs"}
    assert res["datasets"] == ["setg.test", "general"]
    assert sorted(res["conditions"]) == sorted(CONDITIONS + MEMBERS)
    ids = res["conditions"]["A1"]["ids"]
    assert len(ids) >= 15
    for name in CONDITIONS:
        c = res["conditions"][name]
        assert c["ids"] == ids and c["n"] == len(ids) == len(c["correct"])
        assert set(c["correct"]) <= {0, 1}
        assert c["accuracy"] == pytest.approx(sum(c["correct"]) / c["n"])
        assert (0 <= c["identity"] <= c["identity_n"] == 6) if name in IDENTITY_SCORED else c["identity"] is None
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
    counts = read_json(setg_dir / "data" / "counts.json")
    assert counts["split"] == {"train": 0.7, "test": 0.3} and counts["valid_frac"] == 0.1
    for c in counts["categories"].values():  # 70/30 per category, a tenth of train carved out for validation
        n_train = int(c["total"] * 0.7 + 0.5)
        assert (c["train"] + c["valid"], c["test"], c["valid"]) == (n_train, c["total"] - n_train,
                                                                    int(n_train * 0.1 + 0.5))
    # the second dataset: 2 rows of each of the 14 categories, drawn by the stratified sampler
    general = read_jsonl(out / "inputs" / "general.jsonl")
    assert len(general) == 28 and len({r["category"] for r in general}) == 14
    assert all(res["conditions"][n]["mc"]["general"]["n"] == 28 for n in CONDITIONS + MEMBERS)
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
    got = _primary(res)
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


def test_verdict_is_the_locked_criterion_with_holm_adjusted_p(demo):
    from statsmodels.stats.contingency_tables import mcnemar
    from statsmodels.stats.multitest import multipletests

    res, out = demo["results"], demo["out"]
    conds = res["conditions"]
    lock = read_json(out / "prereg.json")
    assert res["prereg"]["sha256"] == lock["sha256"]
    assert res["prereg"]["criterion"] == "diff(A1, A0) >= 5pp and mcnemar_p(A1, A0) < 0.05"

    def p_mcnemar(a, b):
        ca, cb = conds[a]["correct"], conds[b]["correct"]
        table = [[sum(x and y for x, y in zip(ca, cb)), sum(x and not y for x, y in zip(ca, cb))],
                 [sum(y and not x for x, y in zip(ca, cb)), sum(not x and not y for x, y in zip(ca, cb))]]
        return mcnemar(table, exact=True).pvalue

    def p_null(a, fam):
        accs = [conds[f"{fam}.{i}"]["accuracy"] for i in range(SEEDS)]
        return (1 + sum(x >= conds[a]["accuracy"] for x in accs)) / (SEEDS + 1)

    raw = [p_mcnemar("A0", "persona"), p_mcnemar("A1", "A0"), p_null("A1", "placebo"), p_null("A0", "dithered"),
           p_mcnemar("A1", "A1-unfused")]
    holm = multipletests(raw, method="holm")[1]
    assert [f["p_holm"] for f in res["family"]] == pytest.approx(list(holm))
    a1, a0 = conds["A1"]["correct"], conds["A0"]["correct"]
    diff = Fraction(sum(a1) - sum(a0), len(a1))
    expected = diff >= Fraction(5, 100) and holm[1] < 0.05
    assert res["verdict"]["passed"] is expected
    assert res["verdict"]["observed"]["mcnemar_p(A1, A0)"] == pytest.approx(holm[1])
    assert ("is MET" if expected else "is NOT MET") in res["verdict"]["text"]
    # allowed under-powered before the data (locked with the reason), and under-powered at the observed numbers
    doc = json.loads(lock["canonical"])
    assert doc["allow_underpowered"] and doc["power_before_data"][0]["underpowered"]
    assert any("under-powered" in w for w in res["verdict"]["warnings"])


def test_null_distributions_and_flips(demo):
    from scipy.stats import mannwhitneyu

    res, out = demo["results"], demo["out"]
    conds, plan = res["conditions"], run_plan(out)
    persona = step_rows(out, plan["conditions"]["persona"]["mc"])
    for role in ("placebo", "dithered"):
        fam = res["nulls"]["families"][role]
        assert fam["members"] == [f"{role}.{i}" for i in range(SEEDS)]
        assert fam["gain"] == pytest.approx([conds[m]["accuracy"] - conds["persona"]["accuracy"]
                                             for m in fam["members"]])
        t = fam["tested"]["A1"]
        assert t["p_gain"] == pytest.approx((1 + sum(g >= t["gain"] - 1e-12 for g in fam["gain"])) / (SEEDS + 1))
    # flips of A1 against the persona it was fused into, by the persona's margin between its top two letters
    a1 = step_rows(out, plan["conditions"]["A1"]["mc"])
    margins = [sorted(r["logprobs"].values())[-1] - sorted(r["logprobs"].values())[-2] for r in persona]
    flipped = [x["prediction"] != y["prediction"] for x, y in zip(a1, persona)]
    f = res["flips"]["A1"]
    assert f["flipped"] == sum(flipped)
    if 0 < sum(flipped) < len(flipped):
        ref = mannwhitneyu([m for m, x in zip(margins, flipped) if x], [m for m, x in zip(margins, flipped) if not x],
                           alternative="less")
        assert f["test"]["pvalue"] == pytest.approx(ref.pvalue, rel=1e-9)
    assert res["flips"]["A0-preserve"]["flipped"] == 0
    effects = [r["effect"].split(" (")[0] for r in res["decomposition"]["rows"]]
    assert effects == ["fuse effect", "content effect", "content effect", "fuse noise", "fuse-vs-runtime effect"]
    assert res["decomposition"]["holm_within"] == "the pre-registered family"


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
    for section in ("## Conditions", "## Comparisons", "## Other datasets", "## The family of tests",
                    "## Decomposition", "## Null distributions", "## Flips by margin",
                    "## Fuses and the noise floor", "## Fuse policies", "## Identity", "## Pre-registration"):
        assert section in report
    for png in ("accuracy.png", "flips.png", "nulls.png", "flips_by_margin.png", "noise_floor.png", "identity.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"]({png})" in report
    prereg = report.split("## Pre-registration")[1]
    assert "None" not in prereg and "- Power before data: diff(A1, A0) >= 5 points at n = " in prereg
    assert "- Locked although under-powered, because: a demonstration on a tiny model" in prereg
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
    # before any model ran: the predicted n and what the criterion can detect there
    before = demo["stderr"].split("pyfuse demo: [1/")[0]
    assert "predicted n on setg.test:" in before and "decides: paired (mcnemar_p at alpha 0.01 (Holm" in before


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


def _fuse_stage(plan: dict, name: str) -> dict:
    return [s for s in plan["conditions"][name]["stages"] if s["kind"] == "fuse"][-1]


def _step_input(out, art: dict):
    return out / "steps" / art["step"] / art["out"] if "step" in art else Path(art["source"])


def _dequantized(model_dir) -> dict:
    """Every tensor of a model, quantized ones dequantized with mx.dequantize at
    the bits and group size config.json gives their module (its per-module
    entries over the default)."""
    import mlx.core as mx

    tensors = model_tensors(model_dir)
    quant = read_json(model_dir / "config.json")["quantization"]
    out = {}
    for name, arr in tensors.items():
        module, _, kind = name.rpartition(".")
        if kind in ("scales", "biases") or (kind == "weight" and f"{module}.scales" in tensors):
            if kind == "weight":
                q = {**quant, **(quant.get(module) or {})}
                out[name] = mx.dequantize(arr, tensors[f"{module}.scales"], tensors[f"{module}.biases"],
                                          group_size=q["group_size"], bits=q["bits"])
            continue
        out[name] = arr
    return out


def test_faithful_zero_delta_twin_is_the_persona_bit_for_bit(demo, tmp_path):
    """A0-faithful (the zero-delta adapter, refined to 8 bits, calibrated
    rounding) answers every item as the persona does, with the same scores;
    rebuilt with `pyfuse fuse` from the run's own inputs, the persona model
    and A0-faithful's model have the bytes the run recorded for its steps
    (the spec's fuse step = the CLI with the same flags), and every
    dequantized weight of A0-faithful equals the persona's."""
    import hashlib

    res, out = demo["results"], demo["out"]
    plan = run_plan(out)
    persona, twin = res["conditions"]["persona"], res["conditions"]["A0-faithful"]
    for ds in res["datasets"]:
        assert twin["mc"][ds]["predictions"] == persona["mc"][ds]["predictions"]
        assert twin["mc"][ds]["correct"] == persona["mc"][ds]["correct"]
    assert [r["logprobs"] for r in step_rows(out, plan["conditions"]["A0-faithful"]["mc"])] == \
        [r["logprobs"] for r in step_rows(out, plan["conditions"]["persona"]["mc"])]
    assert res["flips"]["A0-faithful"]["flipped"] == 0
    steps = {s["dir"]: s for s in plan["steps"]}
    # its fuse report: nothing moved, and the next-token distributions are the persona's (the zero adapter
    # applied unfused) on every held-out calibration token
    summary = read_json(out / "steps" / _fuse_stage(plan, "A0-faithful")["step"] / "fuse_report.json")["summary"]
    assert summary["delta_norm"] == 0 and summary["change_norm"] == 0
    assert summary["kl_to_unfused"] == 0 and summary["top1_agreement"] == 1 and summary["agreement"]["tokens"] > 0
    built = {}
    for name, flags in (("persona", []), ("A0-faithful", ["--policy", "calibrated", "--requant-bits", "8"])):
        st = steps[_fuse_stage(plan, name)["step"]]
        assert st["options"]["policy"] == ("stock" if name == "persona" else "calibrated")
        model = built.get("persona") or _step_input(out, st["inputs"]["model"])
        calib = ["--calibration", _step_input(out, st["inputs"]["calibration"])] if "calibration" in st["inputs"] else []
        built[name] = tmp_path / name
        r = run_cli("fuse", "--model", model, "--adapter-path", _step_input(out, st["inputs"]["adapter"]),
                    "--save-path", built[name], *flags, *calib)
        assert r.code == 0, r.err
        recorded = read_json(out / "steps" / st["dir"] / "done.json")["outputs"]
        files = {rel[len("model/"):]: rec["sha256"] for rel, rec in recorded.items() if rel.startswith("model/")}
        assert files == {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in built[name].iterdir()}
    assert read_json(built["A0-faithful"] / "config.json")["quantization"][
        "model.layers.0.mlp.switch_mlp.down_proj"]["bits"] == 8  # refined, not kept at 3 bits
    before, after = _dequantized(built["persona"]), _dequantized(built["A0-faithful"])
    assert sorted(before) == sorted(after)
    for name in before:
        assert identical(before[name], after[name]), name


def test_policy_table_recomputed(demo):
    """results.json's per-policy table against the per-item lists of
    results.json and the fuse reports."""
    res, out = demo["results"], demo["out"]
    plan, conds, table = run_plan(out), res["conditions"], res["policies"]
    assert table["unfused"] == "A1-unfused" and table["dataset"] == "setg.test"
    rows = {r["condition"]: r for r in table["rows"]}
    assert list(rows) == list(TWINS)

    def pred(name):
        return conds[name]["mc"]["setg.test"]["predictions"]

    for name, twin in TWINS.items():
        r = rows[name]
        assert r["changed_vs_unfused"] == sum(x != y for x, y in zip(pred(name), pred("A1-unfused")))
        assert r["twin"] == twin
        assert r["twin_changed"] == (None if twin is None else sum(x != y for x, y in zip(pred(twin), pred("persona"))))
        rep = read_json(out / "steps" / _fuse_stage(plan, name)["step"] / "fuse_report.json")
        assert r["weight_retention"] == rep["summary"]["retention"]
        errs = [t["output_error"] for t in rep["tensors"] if t.get("output_error") is not None]
        assert len(errs) == r["modules_measured"] == len(rep["tensors"])
        assert r["output_error"] == pytest.approx(sum(errs) / len(errs))
        assert (r["kl_to_unfused"], r["top1_agreement"]) == (rep["summary"]["kl_to_unfused"],
                                                             rep["summary"]["top1_agreement"])
        assert r["kl_to_unfused"] >= 0 and 0 <= r["top1_agreement"] <= 1
        # what the refined modules' codes grow by (3 -> 8 bits); the rest of the model is copied
        growth = sum(math.prod(t["shape"]) * (t["bits"] - t.get("from_bits", t["bits"])) // 8 for t in rep["tensors"])
        if name == "A1-faithful":
            assert 0 < growth <= r["bytes_added"] < growth + 8192  # + config.json's per-module entries, headers
        else:
            assert growth == 0 and r["bytes_added"] == 0
    assert rows["A1-preserve"]["twin_changed"] == rows["A1-faithful"]["twin_changed"] == 0
    assert rows["A1"]["twin_changed"] > 0  # the stock fuse's noise
    report = (out / "report.md").read_text()
    for r in table["rows"]:
        assert (f"| {r['condition']} | {r['setting']} | {r['weight_retention']:.3g} | {r['output_error']:.3g} | "
                f"{r['output_retention']:.3g} | {r['kl_to_unfused']:.3g} | {r['top1_agreement']:.4f} |") in report
