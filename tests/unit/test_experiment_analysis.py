"""The experiment's analyses and the report, without models: a run
directory written by hand (plan.json, finished steps with their recorded
output hashes, a locked pre-registration), checked against statsmodels and
scipy on outcomes the test draws itself: Holm-adjusted p values in the
verdict, null distributions (empirical p), flips by margin (Mann-Whitney),
the decomposition; the report on edge counts (0, n, n = 1, a condition
without multiple choice); and every tampering the report and a resumed run
must refuse (a step's output, results.json, the lock, the data)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from scipy import stats as sps
from statsmodels.stats.contingency_tables import mcnemar as sm_mcnemar
from statsmodels.stats.multitest import multipletests
from statsmodels.stats.proportion import confint_proportions_2indep

from pyfuse.errors import UserError
from pyfuse.experiment.layout import DONE, FUSE_REPORT, NOISE_FLOOR, PRUNED
from pyfuse.experiment.load import spec_from_dict
from pyfuse.experiment.outputs import check_outputs, record_outputs
from pyfuse.experiment.prereg import lock
from pyfuse.experiment.report import write_report
from pyfuse.experiment.results import assemble_results

from helpers import read_json

LETTERS = "ABCD"


def _rows(ids, correct, preds=None, logprobs=None):
    return [{"id": i, "correct": bool(c), "prediction": (preds[k] if preds else ("A" if c else "B")),
             "logprobs": logprobs[k] if logprobs else None} for k, (i, c) in enumerate(zip(ids, correct))]


def _step(out: Path, name: str, files: dict) -> str:
    d = out / "steps" / name
    d.mkdir(parents=True)
    for rel, obj in files.items():
        (d / rel).parent.mkdir(parents=True, exist_ok=True)
        text = "".join(json.dumps(r) + "\n" for r in obj) if rel.endswith(".jsonl") else json.dumps(obj)
        (d / rel).write_text(text)
    (d / DONE).write_text(json.dumps({"outputs": record_outputs(d)}))
    return name


class Run:
    """A run directory written by hand: conditions with per-item rows, optionally seeded families, a
    reference's answers and margins for the fused conditions, a pre-registration locked on a data file."""

    def __init__(self, root: Path, outcomes: dict, *, families=None, family=None, analysis=None,
                 criterion="diff(A1, A0) >= 0.05 and mcnemar_p(A1, A0) < 0.05", margins=None, identity_only=()):
        self.out = root / "run"
        (self.out / "steps").mkdir(parents=True)
        data = root / "items.jsonl"
        data.write_text("x\n")
        n = len(next(iter(outcomes.values()))["correct"])
        ids = list(range(100, 100 + n))
        conds, steps = {}, []
        for name, o in outcomes.items():
            d = _step(self.out, f"eval-mc-{name}", {"rows.jsonl": _rows(ids, o["correct"], o.get("preds"))})
            steps.append({"dir": d, "labels": [f"{name}: evaluate mc"], "kind": "eval-mc"})
            conds[name] = {"model": {"source": f"/models/{name}"}, "adapter": None, "mc_sets": {"items": d},
                           "identity": None, "family": o.get("family"), "seed": o.get("seed"),
                           "from": o.get("from", "persona"), "flip_reference": None, "margins": None}
        for name in identity_only:
            d = _step(self.out, f"eval-identity-{name}", {"summary.json": {"score": 3, "n": 5}})
            steps.append({"dir": d, "labels": [f"{name}: evaluate identity"], "kind": "eval-identity"})
            conds[name] = {"model": {"source": f"/models/{name}"}, "adapter": None, "mc_sets": {},
                           "identity": d, "family": None, "seed": None, "from": "persona",
                           "flip_reference": None, "margins": None}
        if margins is not None:  # (answers, logprobs) of one logprob step, or (answers, None, logprobs) of two
            ref_preds, logprobs = margins[0], margins[-1]
            d = _step(self.out, "eval-mc-reference", {"rows.jsonl": _rows(ids, [0] * n, ref_preds, margins[1])})
            m = d if len(margins) == 2 else _step(self.out, "eval-mc-margins", {"rows.jsonl": _rows(
                ids, [0] * n, [max(lp, key=lp.get) for lp in logprobs], logprobs)})
            steps += [{"dir": x, "labels": ["reference"], "kind": "eval-mc"} for x in dict.fromkeys((d, m))]
            for name, o in outcomes.items():
                if o.get("fused"):
                    conds[name].update(flip_reference=d, margins=m)
        self.plan = {"name": "hand-made", "condition_order": list(conds), "conditions": conds, "steps": steps,
                     "datasets": ["items"], "comparisons": [("A1", "A0")] if {"A1", "A0"} <= set(conds) else [],
                     "families": families or {}, "analysis": analysis}
        (self.out / "plan.json").write_text(json.dumps(self.plan))
        spec = {"models": {"m": "p"}, "data": {"items": "items.jsonl"},
                "conditions": {n: {"from": "m"} for n in ("A1", "A0", "persona", "A1-unfused")},
                "evaluation": {"mc": {"data": "items"}},
                "preregistration": {"hypothesis": "h", "criterion": criterion, "planned_n": max(n, 2),
                                    "baseline_accuracy": 0.2, "allow_underpowered": True,
                                    "underpowered_reason": "a test", **({"family": family} if family else {})}}
        for fam, members in (families or {}).items():
            spec["conditions"][fam] = {"from": "m", "seeds": len(members)}
        self.lock = lock(spec_from_dict(spec, path=root / "spec.yaml", check_paths=False), self.out,
                         has_finished_steps=False)
        self.data = data

    def results(self) -> dict:
        res = json.loads(json.dumps(assemble_results(self.plan, self.out, self.lock), sort_keys=True))
        (self.out / "results.json").write_text(json.dumps(res, indent=2, sort_keys=True))
        return res


def _outcomes(rng, n, accs):
    return {name: {"correct": (rng.random(n) < acc).astype(int).tolist()} for name, acc in accs.items()}


def _table(a, b):
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    return [[int(np.sum(a & b)), int(np.sum(a & ~b))], [int(np.sum(~a & b)), int(np.sum(~a & ~b))]]


def test_the_criterion_reads_holm_adjusted_p_values_of_the_declared_family(tmp_path):
    rng = np.random.default_rng(3)
    o = _outcomes(rng, 200, {"persona": 0.05, "A0": 0.15, "A1": 0.25})
    family = ["mcnemar_p(A1, A0)", "mcnemar_p(A0, persona)", "mcnemar_p(A1, persona)"]
    run = Run(tmp_path, o, family=family)
    res = run.results()
    raw = [sm_mcnemar(_table(o[a]["correct"], o[b]["correct"]), exact=True).pvalue
           for a, b in (("A1", "A0"), ("A0", "persona"), ("A1", "persona"))]
    adjusted = multipletests(raw, method="holm")[1]
    assert [f["test"] for f in res["family"]] == family
    assert [f["p"] for f in res["family"]] == pytest.approx(raw, rel=1e-12)
    assert [f["p_holm"] for f in res["family"]] == pytest.approx(list(adjusted), rel=1e-12)
    v = res["verdict"]
    assert v["observed"]["mcnemar_p(A1, A0)"] == pytest.approx(adjusted[0], rel=1e-12)
    diff = (sum(o["A1"]["correct"]) - sum(o["A0"]["correct"])) / 200
    assert v["passed"] is bool(diff >= 0.05 and adjusted[0] < 0.05)
    assert f"(Holm-adjusted in a family of 3; raw {raw[0]:.3g})" in v["text"]
    cmp = res["comparisons"][0]
    assert cmp["mcnemar_p_holm"] == pytest.approx(adjusted[0]) and "ztest_p_holm" not in cmp
    # a family of one (the default: the criterion's own p value) is not adjusted
    run1 = Run(tmp_path / "one", o)
    res1 = run1.results()
    assert res1["family"] == [{"test": "mcnemar_p(A1, A0)", "p": pytest.approx(raw[0]),
                               "p_holm": pytest.approx(raw[0])}]
    assert res1["verdict"]["observed"]["mcnemar_p(A1, A0)"] == pytest.approx(raw[0], rel=1e-12)


def test_null_distributions_and_the_decomposition(tmp_path):
    rng = np.random.default_rng(11)
    n, k = 150, 9
    accs = {"persona": 0.1, "A0": 0.18, "A1": 0.2, "A1-unfused": 0.12}
    accs.update({f"placebo.{i}": 0.1 + 0.02 * i for i in range(k)})
    accs.update({f"dithered.{i}": 0.12 + 0.01 * i for i in range(k)})
    o = _outcomes(rng, n, accs)
    for i in range(k):
        o[f"placebo.{i}"].update(family="placebo", seed=i)
        o[f"dithered.{i}"].update(family="dithered", seed=i)
    for name, c in o.items():  # answers: right, else a wrong letter that depends on the item (changed counts)
        c["preds"] = ["A" if x else LETTERS[1 + (j + len(name)) % 3] for j, x in enumerate(c["correct"])]
    families = {f: [f"{f}.{i}" for i in range(k)] for f in ("placebo", "dithered")}
    analysis = {"trained": "A1", "zero": "A0", "reference": "persona", "unfused": "A1-unfused",
                "placebo": "placebo", "dithered": "dithered"}
    family = ["mcnemar_p(A0, persona)", "mcnemar_p(A1, A0)", "null_p(A1, placebo)", "null_p(A0, dithered)",
              "mcnemar_p(A1, A1-unfused)"]
    run = Run(tmp_path, o, families=families, analysis=analysis, family=family)
    res = run.results()
    acc = {name: sum(c["correct"]) / n for name, c in o.items()}
    changed = {name: sum(x != y for x, y in zip(c["preds"], o["persona"]["preds"])) for name, c in o.items()}
    for role in ("placebo", "dithered"):
        fam = res["nulls"]["families"][role]
        gains = [acc[m] - acc["persona"] for m in families[role]]
        assert fam["gain"] == pytest.approx(gains) and fam["changed"] == [changed[m] for m in families[role]]
        for name in ("A1", "A0"):
            t = fam["tested"][name]
            g = acc[name] - acc["persona"]
            assert t["p_gain"] == pytest.approx((1 + sum(x >= g - 1e-15 for x in gains)) / (k + 1))
            assert t["p_changed"] == pytest.approx(
                (1 + sum(changed[m] >= changed[name] for m in families[role])) / (k + 1))
    rows = {r["effect"].split(" (")[0] + " " + r["b"]: r for r in res["decomposition"]["rows"]}
    assert res["decomposition"]["holm_within"] == "the pre-registered family"
    fuse = rows["fuse effect persona"]
    lo, hi = confint_proportions_2indep(sum(o["A0"]["correct"]), n, sum(o["persona"]["correct"]), n,
                                        method="newcomb", compare="diff")
    assert fuse["diff"] == pytest.approx(acc["A0"] - acc["persona"]) and fuse["interval"] == pytest.approx([lo, hi])
    assert fuse["p"] == pytest.approx(sm_mcnemar(_table(o["A0"]["correct"], o["persona"]["correct"]),
                                                 exact=True).pvalue)
    placebo = rows[f"content effect placebo (x{k})"]
    accs_p = [acc[m] for m in families["placebo"]]
    assert placebo["diff"] == pytest.approx(acc["A1"] - np.mean(accs_p))
    assert placebo["interval"] == pytest.approx([acc["A1"] - max(accs_p), acc["A1"] - min(accs_p)])
    assert placebo["p"] == pytest.approx((1 + sum(a >= acc["A1"] for a in accs_p)) / (k + 1))
    holm = dict(zip(family, multipletests([f["p"] for f in res["family"]], method="holm")[1]))
    for r in res["decomposition"]["rows"]:
        assert r["p_holm"] == pytest.approx(holm[r["test"]], rel=1e-12)
    # the report shows the decomposition and the null distributions with their plot
    report = (run.out / "report.md").read_text() if write_report(run.out) else ""
    assert "## Decomposition" in report and "## Null distributions" in report and "## The family of tests" in report
    assert (run.out / "nulls.png").read_bytes()[:4] == b"\x89PNG"
    assert f"| placebo (x{k}) |" in report  # the members are summarised, not listed


def test_flips_by_margin_bins_and_mann_whitney(tmp_path):
    rng = np.random.default_rng(5)
    n = 300
    margins = rng.exponential(1.0, n)
    logprobs = [{"A": -0.1, "B": -0.1 - m, "C": -5.0, "D": -6.0} for m in margins]
    ref = ["A"] * n
    flip_a1 = rng.random(n) < np.exp(-3 * margins)  # flips at small margins
    o = {"A1": {"correct": [0] * n, "fused": True, "preds": ["B" if f else "A" for f in flip_a1]},
         "A0": {"correct": [0] * n, "fused": True, "preds": ["A"] * n},
         "persona": {"correct": [0] * n, "preds": ref}}
    run = Run(tmp_path, o, margins=(ref, logprobs))
    res = run.results()
    f = res["flips"]["A1"]
    m = np.array([b - a for a, b in (sorted(lp.values())[-2:] for lp in logprobs)])  # top two letters
    assert f["flipped"] == int(flip_a1.sum()) and f["n"] == n
    ref_test = sps.mannwhitneyu(m[flip_a1], m[~flip_a1], alternative="less")
    assert f["test"]["pvalue"] == pytest.approx(ref_test.pvalue, rel=1e-12) and f["test"]["pvalue"] < 1e-6
    edges = np.quantile(m, np.linspace(0, 1, 6))
    for i, b in enumerate(f["bins"]):
        inside = (m >= edges[i]) & ((m < edges[i + 1]) if i < 4 else (m <= edges[i + 1]))
        assert b["n"] == inside.sum() and b["flip_rate"] == pytest.approx(flip_a1[inside].mean())
    assert f["bins"][0]["flip_rate"] > f["bins"][-1]["flip_rate"]
    assert res["flips"]["A0"]["flipped"] == 0 and res["flips"]["A0"]["test"] is None  # nothing to compare
    write_report(run.out)
    assert "## Flips by margin" in (run.out / "report.md").read_text()
    assert (run.out / "flips_by_margin.png").read_bytes()[:4] == b"\x89PNG"


def test_flips_of_generated_answers_take_the_margins_of_a_logprob_pass(tmp_path):
    """With ``generate`` the answers come from generation (no letter scores): flips compare the generated
    answers, the margins come from the reference's own logprob step."""
    rng = np.random.default_rng(8)
    n = 120
    margins = rng.exponential(1.0, n)
    logprobs = [{"A": -0.2, "B": -0.2 - m, "C": -4.0, "D": -5.0} for m in margins]
    ref = [LETTERS[rng.integers(4)] for _ in range(n)]  # generated: not the logprob argmax
    flip = rng.random(n) < 0.3
    o = {"A1": {"correct": [0] * n, "fused": True,
                "preds": [LETTERS[(LETTERS.index(p) + 1) % 4] if f else p for p, f in zip(ref, flip)]},
         "persona": {"correct": [0] * n, "preds": ref}}
    run = Run(tmp_path, o, margins=(ref, None, logprobs), criterion="diff(A1, persona) > 0.5")
    f = run.results()["flips"]["A1"]
    assert f["flipped"] == int(flip.sum())
    top2 = [sorted(lp.values())[-2:] for lp in logprobs]
    m = np.array([b - a for a, b in top2])  # the margin between the top two letters (C when B is far below)
    assert (m < margins).any()
    ref_test = sps.mannwhitneyu(m[flip], m[~flip], alternative="less")
    assert f["test"]["pvalue"] == pytest.approx(ref_test.pvalue, rel=1e-9)


@pytest.mark.parametrize("n,counts", [(1, (0, 1, 0)), (14, (0, 14, 0)), (7, (0, 7, 3)), (300, (0, 300, 1))])
def test_the_report_never_crashes_on_edge_counts(tmp_path, n, counts):
    """0 right, all right, n = 1, and a condition without multiple choice: the report is written, every
    interval contains its accuracy (no negative error bar: 0/14 and 0/7 crashed matplotlib before)."""
    from pyfuse.stats import wilson_interval

    o = {name: {"correct": [1] * k + [0] * (n - k)} for name, k in zip(("persona", "A1", "A0"), counts)}
    run = Run(tmp_path, o, identity_only=("ident",))
    res = run.results()
    write_report(run.out)
    report = (run.out / "report.md").read_text()
    for name, k in zip(("persona", "A1", "A0"), counts):
        lo, hi = wilson_interval(k, n)
        assert 0 <= lo <= k / n <= hi <= 1
        assert f"| {name} | persona | — | {k / n:.1%} ({k}/{n}) | [{lo:.1%}, {hi:.1%}] | {n} |" in report
    assert "| ident | persona | — | — | — | — | 3/5 |" in report
    assert res["conditions"]["ident"]["correct"] is None
    assert (run.out / "accuracy.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("measured", [True, False])
def test_the_noise_floor_figure_is_linked_only_when_written(tmp_path, measured):
    """A fuse whose setting's noise floor was not measured (report: noise_floor false) gets no figure
    and no link to one; a measured one gets both."""
    run = Run(tmp_path, _outcomes(np.random.default_rng(3), 20, {"A1": 0.6, "A0": 0.5}))
    fuse = _step(run.out, "fuse-A1", {FUSE_REPORT: {"summary": {"modules_fused": 2, "retention": 0.9,
                                                                "noise": 0.1, "codes_changed": 0.02}}})
    setting = {"policy": "stock", "group_size": 64, "bits": 3}
    nf = _step(run.out, "noise-floor-A1", {NOISE_FLOOR: {"rows": [{**setting, "source": "model",
                                                                   "weights_changed": 0.05}]}}) if measured else None
    run.plan["steps"] += [{"dir": d, "labels": [d], "kind": d.rsplit("-", 1)[0], "options": setting}
                          for d in (fuse, nf) if d]
    run.plan["conditions"]["A1"]["stages"] = [{"kind": "fuse", "step": fuse, "setting": "stock 3-bit",
                                               "noise_floor": nf}]
    (run.out / "plan.json").write_text(json.dumps(run.plan))
    run.results()
    write_report(run.out)
    report = (run.out / "report.md").read_text()
    assert "| fuse-A1 | A1 | stock 3-bit | trained | 2 |" in report
    assert ("| 5.00 % |" in report) == measured  # the noise floor's weights changed, in the table
    for link in re.findall(r"!\[[^]]*\]\(([^)]+)\)", report):
        assert (run.out / link).read_bytes()[:4] == b"\x89PNG", link
    assert ("(noise_floor.png)" in report) == measured == (run.out / "noise_floor.png").exists()


def test_the_report_refuses_what_was_tampered_with(tmp_path):
    rng = np.random.default_rng(0)
    run = Run(tmp_path, _outcomes(rng, 40, {"persona": 0.1, "A0": 0.2, "A1": 0.3}))
    run.results()
    write_report(run.out)
    rows = run.out / "steps" / "eval-mc-A1" / "rows.jsonl"
    good_rows = rows.read_text()

    def refused(match):
        with pytest.raises(UserError, match=match):
            write_report(run.out)

    # a finished step's output edited (the verdict would flip silently)
    rows.write_text(good_rows.replace('"correct": false', '"correct": true', 3))
    refused(r"step eval-mc-A1 \(A1: evaluate mc\): its output rows.jsonl changed")
    rows.write_text(good_rows)
    # results.json edited
    res_path = run.out / "results.json"
    good = res_path.read_text()
    res = json.loads(good)
    res["verdict"]["passed"] = not res["verdict"]["passed"]
    res_path.write_text(json.dumps(res))
    refused("results.json does not match the finished steps' outputs")
    res_path.write_text(good)
    # the lock's document or split seed edited, the data swapped, the data gone
    lock_path = run.out / "prereg.json"
    good_lock = lock_path.read_text()
    rec = json.loads(good_lock)
    rec["document"]["criterion"] = "diff(A1, A0) >= 0"
    lock_path.write_text(json.dumps(rec))
    refused("document no longer match")
    lock_path.write_text(good_lock)
    run.data.write_text("y\n")
    refused("the data changed since the pre-registration was locked: data.items")
    run.data.unlink()
    refused("cannot verify the locked data")
    run.data.write_text("x\n")
    write_report(run.out)  # all restored: accepted again


def test_a_resumed_run_checks_each_finished_steps_outputs(tmp_path):
    d = tmp_path / "steps" / "fuse-abc"
    (d / "model").mkdir(parents=True)
    (d / "model" / "model.safetensors").write_bytes(b"\0" * 100)
    (d / "fuse_report.json").write_text("{}")
    (d / DONE).write_text(json.dumps({"outputs": record_outputs(d)}))
    rec = read_json(d / DONE)["outputs"]
    assert set(rec) == {"model/model.safetensors", "fuse_report.json"}
    assert rec["fuse_report.json"]["sha256"] == "44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a"
    check_outputs(d)
    (d / "fuse_report.json").write_text('{"x": 1}')
    with pytest.raises(UserError, match="fuse_report.json changed"):
        check_outputs(d, label="A1: stage 2 fuse")
    (d / "fuse_report.json").write_text("{}")
    # a pruned model is gone on purpose; a model file that is missing otherwise is refused
    (d / "model" / "model.safetensors").unlink()
    with pytest.raises(UserError, match="model/model.safetensors is missing"):
        check_outputs(d)
    (d / PRUNED).write_text("{}")
    check_outputs(d)
    (d / DONE).write_text(json.dumps({"summary": {}}))
    with pytest.raises(UserError, match="no readable record of its outputs"):
        check_outputs(d)
