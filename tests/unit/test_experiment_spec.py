"""`pyfuse experiment` without training: spec errors that name the field,
the shipped examples, the criterion's grammar and exact evaluation, power
before data (predicted n, unpaired and paired MDE, the refusal to lock an
under-powered criterion), the lock (data hashes, tampering) and the verdict
on the study's numbers, time estimates, and the plan of a mixed-precision
model. (Analyses: test_experiment_analysis.py; whole runs:
tests/e2e/test_experiment.py.)"""

from __future__ import annotations

import copy
import hashlib
import json
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import yaml

from pyfuse.errors import UserError
from pyfuse.experiment import build_plan, parse_criterion
from pyfuse.experiment.load import spec_from_dict
from pyfuse.experiment.prereg import Lock, canonical_json, lock, read_lock, verify_data
from pyfuse.experiment.results import verdict

from helpers import read_json, run_cli, write_yaml

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "examples" / "stacking-confound.yaml"


def _example_with_paths(tmp_path: Path) -> dict:
    """The shipped stacking-confound spec, its paths pointing at (empty) stand-ins in ``tmp_path``."""
    spec = yaml.safe_load(EXAMPLE.read_text())
    for name in spec["models"]:
        (tmp_path / name).mkdir()
        spec["models"][name] = name
    (tmp_path / "mmlu.jsonl").write_text("")
    spec["data"] = {"mmlu": "mmlu.jsonl"}
    spec["evaluation"]["identity"] = {"persona_name": "Nova"}  # the shipped suite template
    return spec


BAD_SPECS = [
    (lambda s: s["conditions"]["A1"]["stages"][1]["fuse"].update(policy="stok"),
     "conditions.A1.stages[1].fuse.policy: must be one of stock, preserve, stochastic, calibrated (got 'stok')"),
    (lambda s: s["conditions"]["A1"]["stages"][0]["train"].update(lr=1),
     "conditions.A1.stages[0].train.lr: unknown field (known: train_mode, beta, lr_schedule, save_every, "
     "select_best, early_stop_patience, requant_policy, data, fine_tune_type, rank,"),
    (lambda s: s["conditions"]["A1"]["stages"][0]["train"].update(rank=0),
     "conditions.A1.stages[0].train.rank: must be greater than or equal to 1 (got 0)"),
    (lambda s: s["conditions"]["A1"].update({"from": "nobody"}),
     "conditions.A1.from: unknown model or condition 'nobody'"),
    (lambda s: s["conditions"]["A1"].pop("from"), "conditions.A1.from: required"),
    (lambda s: s["conditions"]["A1"].update(stages=["zero"]),
     "conditions.A1.stages[0].zero: a zero stage needs an adapter: put it after a train or apply stage"),
    (lambda s: s["conditions"]["A1"]["stages"].insert(0, {"train": {}, "fuse": {}}),
     "conditions.A1.stages[0]: a stage has exactly one of train, zero, placebo, fuse, stack, apply; got train, fuse"),
    (lambda s: s["conditions"]["A1"]["stages"].insert(1, {"train": {}}),
     "conditions.A1.stages[1].train: the previous stage's adapter is not fused yet"),
    (lambda s: s["conditions"].update(C1={"from": "C2"}, C2={"from": "C1"}),
     "conditions.C1.from: circular reference: C1 -> C2 -> C1"),
    # a real cycle through Set-G: P1's model is trained on Set-G (defaults.train.data), which is mined with it
    (lambda s: (s["conditions"].update(P1={"from": "persona", "stages": [{"train": {}}, {"fuse": {}}]}),
                s["setg"].update(persona="P1")),
     "conditions.P1.stages[0].train.data: circular reference: P1 -> setg -> P1 (P1 trains on Set-G; Set-G "
     "is mined with P1's model)"),
    (lambda s: s["conditions"]["A1"]["stages"][0]["train"].update(data="nope"),
     "conditions.A1.stages[0].train.data: unknown data 'nope' (known: mmlu, setg)"),
    (lambda s: s["defaults"]["train"].update(layers="8;14"),
     "defaults.train.layers: must be layer indices like '8,14,20' or '4-7', got '8;14'"),
    (lambda s: s["evaluation"]["mc"].update(method="sample"),
     "evaluation.mc.method: must be one of generate, logprob (got 'sample')"),
    (lambda s: s["preregistration"].update(criterion="dif(A1, A0) > 0"),
     "preregistration.criterion: unknown statistic 'dif'"),
    (lambda s: s["preregistration"].update(criterion="diff(A1, Z) > 0"),
     "preregistration.criterion: diff(A1, Z): unknown condition 'Z'"),
    (lambda s: s["preregistration"].update(alpha=2), "preregistration.alpha: must be less than 1 (got 2)"),
    (lambda s: s["setg"].update(seed=3), "setg.seed: the split seed is derived from the pre-registration's hash"),
    (lambda s: (s["conditions"]["persona_only"].update(evaluate=["identity"]),
                s.update(comparisons=[["A1", "persona_only"]])),
     "comparisons[0].b: condition 'persona_only' is not evaluated on multiple choice"),
    (lambda s: s["conditions"].update(persona={"from": "base"}),
     "conditions.persona: 'persona' is also a model name"),
    (lambda s: s.update(extras=1), "extras: unknown field (known: version, name,"),
    (lambda s: s["setg"].update(train_frac=0.7), "setg: train_frac was replaced by split"),
    (lambda s: s["setg"].update(split={"train": 0.7, "test": 0.4}), "setg.split: train + test must be 1"),
    (lambda s: s["conditions"]["A1"].update(seeds=3), "comparisons[0].a: condition 'A1' has seeds"),
    (lambda s: s["conditions"]["A1"]["stages"].insert(0, "placebo"),
     "conditions.A1.stages[0].placebo: a placebo stage needs an adapter"),
    (lambda s: s["conditions"]["A1"]["stages"][1]["fuse"].update(dither=True),
     "conditions.A1.stages[1].fuse.dither: a dithered fuse is a zero-delta fuse"),
    (lambda s: s["conditions"]["A0"]["stages"][2]["fuse"].update(dither=True, policy="preserve"),
     "conditions.A0.stages[2].fuse.dither: dither re-rounds the stock fuse's grid: it needs policy stock"),
    (lambda s: s["preregistration"].update(family=["mcnemar_p(A0, persona_only)"]),
     "preregistration.family: the criterion's ztest_p(A1, A0) is not in the family"),
    (lambda s: s["preregistration"].update(family=["diff(A1, A0)"]),
     "preregistration.family: 'diff(A1, A0)': a family holds p values"),
    (lambda s: s["preregistration"].update(criterion="null_p(A1, A0) < 0.05"),
     "null_p(A1, A0): 'A0' must be a condition with seeds"),
    (lambda s: s["analysis"].update(placebo="A0"), "analysis.placebo: condition 'A0' needs seeds"),
    (lambda s: s["analysis"].update(reference="nobody"), "analysis.reference: unknown condition 'nobody'"),
    (lambda s: s["preregistration"].pop("underpowered_reason"),
     "preregistration: allow_underpowered: true needs underpowered_reason"),
    (lambda s: s["preregistration"].update(criterion="diff(A1, A0 @ nope) >= 0.05"),
     "diff(A1, A0 @ nope): unknown dataset 'nope' (known: setg.test)"),
    (lambda s: s["evaluation"].update(mc=[s["evaluation"]["mc"], {"data": "mmlu", "method": "beam"}]),
     "evaluation.mc[1].method: must be one of generate, logprob (got 'beam')"),
    (lambda s: s["evaluation"].update(mc=[s["evaluation"]["mc"], {"data": "setg.test"}]),
     "evaluation.mc[1].data: dataset 'setg.test' is also evaluation.mc[0]"),
    # absurd numbers a careless edit makes: refused before anything is locked
    (lambda s: s["conditions"]["A1"]["stages"][0]["train"].update(rank=100_000_000),
     "train.rank: must be less than or equal to 4096 (got 100000000)"),
    (lambda s: s["preregistration"].update(criterion="diff(A1, A0) >= 500pp"),
     "diff(A1, A0) >= 500pp: diff lies in [-1, 1]"),
    # a full fine-tune yields a model: nothing to fuse (or to zero)
    (lambda s: s["conditions"]["A1"]["stages"][0]["train"].update(fine_tune_type="full"),
     "conditions.A1.stages[1].fuse: conditions.A1.stages[0].train has fine_tune_type full: it yields a model, "
     "not an adapter; there is nothing to fuse (remove this stage)"),
    (lambda s: s["conditions"]["A0"]["stages"][0]["train"].update(fine_tune_type="full"),
     "conditions.A0.stages[1].zero: conditions.A0.stages[0].train has fine_tune_type full"),
    (lambda s: s["conditions"]["A1"]["stages"][0]["train"].update(requant_policy="calibrated"),
     "conditions.A1.stages[0].train.requant_policy: must be one of stock, preserve, stochastic"),
]



def test_bad_specs_name_the_field(tmp_path):
    spec = _example_with_paths(tmp_path)
    good = write_yaml(tmp_path / "good.yaml", spec)
    assert run_cli("experiment", "validate", good, "--strict").code == 0
    for mutate, expected in BAD_SPECS:
        bad = copy.deepcopy(spec)
        mutate(bad)
        path = write_yaml(tmp_path / "bad.yaml", bad)
        r = run_cli("experiment", "validate", path)
        assert r.code == 2, expected
        assert expected in r.err, (expected, r.err)
        assert r.err.startswith(f"pyfuse experiment: error: {path}")
    # several problems at once, one line each
    bad = copy.deepcopy(spec)
    bad["conditions"]["A1"]["stages"][1]["fuse"]["policy"] = "x"
    bad["conditions"]["A1"]["stages"][0]["train"]["iters"] = "many"
    r = run_cli("experiment", "validate", write_yaml(tmp_path / "bad.yaml", bad))
    assert r.code == 2
    assert "2 problems" in r.err and "train.iters: must be an integer (got 'many')" in r.err
    # YAML problems: duplicate names, syntax
    text = good.read_text().replace("  A0_preserve:", "  A0:")
    (tmp_path / "dup.yaml").write_text(text)
    r = run_cli("experiment", "validate", tmp_path / "dup.yaml")
    assert r.code == 2
    assert "duplicate key 'A0'" in r.err
    (tmp_path / "syntax.yaml").write_text("models: [a\n")
    r = run_cli("experiment", "validate", tmp_path / "syntax.yaml")
    assert r.code == 2
    assert "not valid YAML (line" in r.err
    # missing paths: a note for validate, an error for --strict and for run (nothing created)
    missing = copy.deepcopy(spec)
    missing["models"]["base"] = "no/such/model"
    path = write_yaml(tmp_path / "missing.yaml", missing)
    r = run_cli("experiment", "validate", path)
    assert r.code == 0
    assert "models.base: model directory does not exist (yet)" in r.err
    r = run_cli("experiment", "validate", path, "--strict")
    assert r.code == 2
    assert "models.base: model directory does not exist" in r.err
    r = run_cli("experiment", "run", path, "--out", tmp_path / "never")
    assert r.code == 2
    assert "models.base: model directory does not exist" in r.err
    assert not (tmp_path / "never").exists()


def test_examples_validate():
    for name in ("stacking-confound.yaml", "identity-stacking.yaml"):
        r = run_cli("experiment", "validate", REPO / "examples" / name)
        assert r.code == 0
        assert "is valid" in r.out and "pre-registered" in r.out
    # the study's own design is flagged as under-powered (MDE ~6.1 points > 5 at n = 692), and allowed
    # with the reason the spec gives
    r = run_cli("experiment", "validate", REPO / "examples" / "stacking-confound.yaml")
    assert r.code == 0
    assert "predicted n on setg.test: 692 items per condition (planned_n" in r.out
    assert "unpaired MDE 6.1 points (from 17.8 %)" in r.out and "-> UNDER-POWERED" in r.out
    assert "under-powered design (allowed: reproduces the published study" in r.err


def test_time_estimates_scale_with_the_work_of_each_step(tmp_path):
    from pyfuse.experiment.estimate import Estimator, rate_group, work_units
    from pyfuse.experiment.plan import Step

    est = Estimator()
    assert est.estimate("eval-mc/logprob", 204) is None  # nothing of the kind timed yet
    # seconds per item observed so far x this step's items: 19.2 s on 1,680 items -> 204 items
    est.add("eval-mc/logprob", 19.2, 1680)
    assert est.estimate("eval-mc/logprob", 204) == pytest.approx(19.2 / 1680 * 204)  # ~2.3 s, not 19.2 s
    est.add("eval-mc/logprob", 2.6, 204)
    assert est.estimate("eval-mc/logprob", 100) == pytest.approx((19.2 + 2.6) / (1680 + 204) * 100)
    assert est.estimate("eval-mc/logprob", 200) == pytest.approx(2 * est.estimate("eval-mc/logprob", 100))
    # without a unit count: the mean duration of the kind (the old behaviour)
    assert est.estimate("eval-mc/logprob") == pytest.approx((19.2 + 2.6) / 2)
    # generation is timed apart from log-prob scoring
    assert est.estimate("eval-mc/generate", 204) is None
    assert rate_group("eval-mc", {"method": "generate"}) == "eval-mc/generate"
    assert rate_group("train", {"iters": 10}) == "train"

    # train: iters x batch_size examples (80 x 4 then 30 x 1)
    est.add("train", 18.0, work_units("train", {"iters": 80, "batch_size": 4}, {}))
    units = work_units("train", {"iters": 30, "batch_size": 1}, {})
    assert units == 30 and est.estimate("train", units) == pytest.approx(18.0 / 320 * 30)

    # eval-mc: the data file's rows (blank lines skipped), capped by limit; a file not written yet: unknown
    data = tmp_path / "items.jsonl"
    data.write_text("".join(json.dumps({"i": i}) + "\n" + ("\n" if i % 3 == 0 else "") for i in range(7)))
    assert work_units("eval-mc", {"method": "logprob", "limit": None}, {"data": data}) == 7
    assert work_units("eval-mc", {"method": "logprob", "limit": 5}, {"data": data}) == 5
    assert work_units("eval-mc", {"method": "logprob", "limit": None}, {"data": tmp_path / "later.jsonl"}) is None
    # eval-identity: the suite's prompts (the shipped template without a suite)
    suite = tmp_path / "suite.yaml"
    suite.write_text(yaml.safe_dump({"persona": {"name": "P"}, "prompts": [{"id": i, "prompt": "who?"}
                                                                          for i in range(4)]}))
    assert work_units("eval-identity", {}, {"model": tmp_path, "suite": suite}) == 4
    assert work_units("eval-identity", {}, {"model": tmp_path}) >= 1
    assert work_units("fuse", {}, {}) is None and work_units("noise-floor", {}, {}) is None

    # the run log of an earlier run feeds the rates
    again = Estimator([{"event": "step", "kind": "eval-mc", "group": "eval-mc/logprob", "seconds": 10.0,
                         "units": 1000}, {"event": "step", "kind": "fuse", "seconds": 0.5, "units": None}])
    assert again.estimate("eval-mc/logprob", 100) == pytest.approx(1.0)
    assert again.estimate("fuse") == pytest.approx(0.5)

    # a step shared by several conditions says so
    st = Step(kind="train", options={}, inputs={}, key="k" * 64, labels=["A1: stage 1 train"])
    assert st.label == "A1: stage 1 train"
    st.labels += ["A0: stage 1 train"]
    assert st.label == "A1: stage 1 train (shared with 1 other condition)"
    st.labels += ["A2: stage 1 train", "A3: stage 1 train"]
    assert st.label == "A1: stage 1 train (shared with 3 other conditions)"


def test_criterion_grammar_and_exact_evaluation():
    c = parse_criterion("diff(A1,A0)>=5pp and ztest_p(A1, A0) < 0.05")
    assert str(c) == "diff(A1, A0) >= 5pp and ztest_p(A1, A0) < 0.05"
    assert c.pairs() == [("A1", "A0")]
    c2 = parse_criterion("not (acc(A) > 0.5 or n(A) < 10) and 0.1 <= diff(A, B)")
    assert str(c2) == "not (acc(A) > 0.5 or n(A) < 10) and 0.1 <= diff(A, B)"
    assert c2.thresholds()[-1] == {"statistic": "diff(A, B)", "op": ">=", "value": "0.1"}
    for bad, msg in [("diff(A) > 0", "takes 2"), ("diff(A, A) > 0", "itself"), ("0.1 < 0.2", "two numbers"),
                     ("diff(A, B) > 0 and", "ends early"), ("diff(A, B) 0.1", "expected a comparison"),
                     ("0 < diff(A, B) < 1", "chained"), ("foo(A) > 1", "unknown statistic")]:
        with pytest.raises(ValueError, match=msg):
            parse_criterion(bad)
    # exact: 6/20 - 5/20 is 0.05, though 0.3 - 0.25 in floats is 0.04999999999999999
    assert 0.3 - 0.25 < 0.05
    ev = parse_criterion("diff(A, B) >= 0.05").evaluate(lambda s: Fraction(6, 20) - Fraction(5, 20))
    assert ev.passed and ev.atoms == [("diff(A, B) >= 0.05", True)]
    ev = parse_criterion("diff(A, B) > 5pp").evaluate(lambda s: Fraction(1, 20))
    assert not ev.passed


def _lock_for(spec_dict, tmp_path) -> Lock:
    spec = spec_from_dict(spec_dict, path=tmp_path / "spec.yaml", check_paths=False)
    return lock(spec, tmp_path, has_finished_steps=False)


def _study_spec(tmp_path: Path) -> dict:
    (tmp_path / "m.jsonl").write_text("")
    return {"models": {"persona": "p"}, "data": {"mmlu": "m.jsonl"},
            "conditions": {"A1": {"from": "persona", "stages": [{"train": {"data": "mmlu"}}, {"fuse": {}}]},
                           "A0": {"from": "persona", "stages": [{"train": {"data": "mmlu"}}, "zero",
                                                                {"fuse": {}}]}},
            "evaluation": {"mc": {"data": "mmlu"}},
            "preregistration": {"hypothesis": "Set-G content contributes real knowledge",
                                "criterion": "diff(A1, A0) >= 0.05 and ztest_p(A1, A0) < 0.05",
                                "kill": "the knowledge-injection line is closed", "planned_n": 692,
                                "baseline_accuracy": 0.178}}


def test_verdict_on_the_studys_numbers_and_the_lock(tmp_path):
    from pyfuse.stats import min_detectable_effect

    d1 = tmp_path / "d1"
    d1.mkdir()
    spec = _study_spec(d1)
    # the study's design cannot detect its own threshold: refused before anything is locked ...
    with pytest.raises(UserError, match=r"under-powered before any data: diff\(A1, A0\) >= 0.05: unpaired MDE "
                                        r"6.1 points > the 5-point threshold"):
        _lock_for(spec, d1)
    assert not (d1 / "prereg.json").exists()
    # ... unless the spec says so, with a reason that goes into the lock
    spec["preregistration"].update(allow_underpowered=True, underpowered_reason="reproduce the study as run")
    lk = _lock_for(spec, d1)
    assert lk.created and lk.split_seed == int(lk.sha256[:8], 16)
    doc = lk.document
    assert doc["underpowered_reason"] == "reproduce the study as run" and doc["allow_underpowered"] is True
    (rec,) = doc["power_before_data"]
    assert rec["n"] == 692 and rec["underpowered"] and rec["decides"] == "unpaired" and rec["test"] == "ztest_p"
    assert rec["mde_unpaired"] == pytest.approx(min_detectable_effect(692, 0.178), abs=1e-6)
    assert rec["mde_unpaired"] == pytest.approx(0.061, abs=5e-4)
    assert doc["data"] == {"data.mmlu": hashlib.sha256(b"").hexdigest()}
    # 128/692 vs 123/692 (the study): z-test p = 0.727, not met; the design is under-powered
    a1 = [1] * 128 + [0] * 564
    a0 = [1] * 100 + [0] * 28 + [1] * 23 + [0] * 541
    ids = list(range(692))

    def cond(correct):
        mc = {"correct": correct, "n": 692, "accuracy": sum(correct) / 692, "ids": ids}
        return {**mc, "mc": {"mmlu": mc}, "identity": None}

    results = {"datasets": ["mmlu"], "conditions": {"A1": cond(a1), "A0": cond(a0)}, "comparisons": [],
               "family": [], "families": {}}
    v = verdict(results, lk)
    assert v["passed"] is False
    assert v["observed"]["ztest_p(A1, A0)"] == pytest.approx(0.727, abs=5e-4)
    assert "diff(A1, A0) = +0.72 points (128/692 vs 123/692)" in v["text"]
    assert "ztest_p(A1, A0) = 0.727" in v["text"] and "is NOT MET" in v["text"]
    assert any("from 17.8 % (observed accuracy of A0), diff(A1, A0) is under-powered: unpaired MDE 6.1 points > "
               "the 5-point threshold" in w
               for w in v["warnings"])

    # the same spec locks again; a changed threshold, changed data or a tampered lock is refused
    assert _lock_for(spec, d1).sha256 == lk.sha256
    changed = copy.deepcopy(spec)
    changed["preregistration"]["criterion"] = "diff(A1, A0) >= 0.04 and ztest_p(A1, A0) < 0.05"
    with pytest.raises(UserError, match="changed: criterion, power_before_data, thresholds"):
        _lock_for(changed, d1)
    (d1 / "m.jsonl").write_text("swapped\n")
    with pytest.raises(UserError, match="changed: data.data.mmlu"):
        _lock_for(spec, d1)
    with pytest.raises(UserError, match="the data changed since the pre-registration was locked: data.mmlu"):
        verify_data(read_lock(d1))
    (d1 / "m.jsonl").write_text("")
    verify_data(read_lock(d1))
    lock_path = d1 / "prereg.json"
    good = lock_path.read_text()
    for forge, msg in [(lambda r: r.update(canonical=r["canonical"].replace("0.05", "0.04", 1)),
                        "does not match its SHA-256"),
                       (lambda r: r["document"].update(criterion="diff(A1, A0) >= 0.01"), "document no longer match"),
                       (lambda r: r.update(split_seed=r["split_seed"] + 1), "split_seed no longer match")]:
        rec = json.loads(good)
        forge(rec)
        lock_path.write_text(json.dumps(rec))
        with pytest.raises(UserError, match=msg):
            read_lock(d1)
    lock_path.write_text(good)
    # no pre-registration after the fact: finished steps but no lock
    with pytest.raises(UserError, match="must be locked before any training"):
        lock(spec_from_dict(spec, path=d1 / "spec.yaml", check_paths=False), tmp_path / "d2",
             has_finished_steps=True)
    assert canonical_json({"b": 1, "a": [1, 2]}) == '{"a":[1,2],"b":1}'


def test_power_before_data_predicts_n_from_the_data_and_the_split(tmp_path):
    """6,000 mined rows over 14 categories, 38.5 % expected in Set-G, split 70/30: ~692 test items per
    condition; the MDEs at that n, unpaired and paired (from a noise-floor result), and validate's refusal."""
    from pyfuse.experiment.power import power_table, predicted_n
    from pyfuse.stats import mcnemar_mde, min_detectable_effect

    rng = np.random.default_rng(0)
    cats = [f"cat{i}" for i in range(14)]
    counts = rng.multinomial(6000, rng.dirichlet([5] * 14))
    categories = [c for c, n in zip(cats, counts) for _ in range(n)]
    rows = [{"question_id": k, "question": "q?", "options": ["a", "b", "c", "d"], "answer": "A",
             "answer_index": 0, "category": c} for k, c in enumerate(categories)]
    (tmp_path / "mmlu.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    nf = {"rows": [{"policy": "stock", "source": "model", "bits": 3, "group_size": 64, "mc_flip": 0.2},
                   {"policy": "stock", "source": "quantized", "bits": 4, "group_size": 64, "mc_flip": 0.3},
                   {"policy": "preserve", "source": "model", "bits": 3, "group_size": 64, "mc_flip": 0.0}]}
    (tmp_path / "nf.json").write_text(json.dumps(nf))
    for name in ("base", "persona"):
        (tmp_path / name).mkdir()
    spec = yaml.safe_load(EXAMPLE.read_text())
    spec["models"] = {"base": "base", "persona": "persona"}
    spec["data"] = {"mmlu": "mmlu.jsonl"}
    spec["evaluation"]["identity"] = {"persona_name": "Nova"}
    spec["preregistration"].update(criterion="diff(A1, A0) >= 0.05 and mcnemar_p(A1, A0) < 0.05",
                                   discordance_from="nf.json", planned_n=None)
    path = write_yaml(tmp_path / "spec.yaml", spec)
    loaded = spec_from_dict(spec, path=path, check_paths=True)
    # the oracle: each category's expected Set-G (rounded), 30 % of it (halves of 0.7 n round up into train)
    expected = sum(int(round(n * 0.385)) - int(np.floor(0.7 * round(n * 0.385) + 0.5)) for n in counts)
    n = predicted_n(loaded)["setg.test"]
    assert n["n"] == expected and abs(expected - 692) <= 10 and "6000 rows x 0.385" in n["source"]
    (rec,) = power_table(loaded)
    assert rec["decides"] == "paired" and rec["discordance"] == 0.2  # the model's own setting, stock
    assert rec["mde_paired"] == pytest.approx(mcnemar_mde(expected, 0.2), abs=1e-6)
    assert rec["mde_unpaired"] == pytest.approx(min_detectable_effect(expected, 0.178), abs=1e-6)
    assert not rec["underpowered"] and rec["mde_paired"] < 0.05
    r = run_cli("experiment", "validate", path)
    assert r.code == 0
    out = r.out
    assert f"predicted n on setg.test: {expected} items per condition" in out
    assert f"paired MDE {rec['mde_paired'] * 100:.1f} points (discordance 0.2, MC answers a zero-delta stock " \
           "fuse flips at 3-bit g64 (nf.json; an upper bound))" in out
    # a family of 3 takes the MDE at alpha / 3 (Holm's first step); without the allowance, validate refuses
    spec["preregistration"].update(family=["mcnemar_p(A1, A0)", "mcnemar_p(A0, persona_only)",
                                           "mcnemar_p(A1, persona_only)"], allow_underpowered=False,
                                   underpowered_reason=None)
    path = write_yaml(tmp_path / "spec.yaml", spec)
    (rec3,) = power_table(spec_from_dict(spec, path=path))
    assert rec3["alpha_used"] == pytest.approx(0.05 / 3, abs=1e-6)
    assert rec3["mde_paired"] == pytest.approx(mcnemar_mde(expected, 0.2, alpha=0.05 / 3), abs=1e-6)
    assert rec3["mde_paired"] > 0.05 and rec3["underpowered"]
    r = run_cli("experiment", "validate", path)
    assert r.code == 2
    err = r.err
    assert "under-powered before any data" in err and "allow_underpowered: true" in err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_the_plan_reads_a_mixed_precision_model_as_the_fuse_does(tmp_path, tiny_moe_mixed_dir):
    """config.json's default quantization (3-bit g64) names the fuse setting and its noise floor,
    though every down_proj is 6-bit: the fuse keeps each module's own bits unless requant_bits says
    otherwise, and ModelDir (the one reader) sees the same default and the same override."""
    from pyfuse.io.model_dir import ModelDir

    quant = read_json(Path(tiny_moe_mixed_dir) / "config.json")["quantization"]
    overrides = {k: v for k, v in quant.items() if isinstance(v, dict) and k.endswith("down_proj")}
    assert overrides and all(v["bits"] == 6 for v in overrides.values())  # really mixed
    (tmp_path / "chat.jsonl").write_text("")
    spec = spec_from_dict({
        "models": {"m": str(tiny_moe_mixed_dir)}, "data": {"chat": "chat.jsonl"},
        "defaults": {"train": {"data": "chat"}},
        "conditions": {"F": {"from": "m", "stages": [{"train": {}}, {"fuse": {}}]},
                       "G": {"from": "m", "stages": [{"train": {}}, {"fuse": {"requant_bits": 4}}]}},
    }, path=tmp_path / "spec.yaml")
    plan = build_plan(spec, None)
    default = {"bits": quant["bits"], "group_size": quant["group_size"]}
    assert default == {"bits": 3, "group_size": 64}
    md = ModelDir(tiny_moe_mixed_dir)
    try:
        assert (md.quantization.bits, md.quantization.group_size) == (default["bits"], default["group_size"])
        module = next(iter(overrides))
        assert md.quant_params(module).bits == 6
    finally:
        md.close()
    for name, bits in (("F", 3), ("G", 4)):
        cp = plan.conditions[name]
        assert cp.quant == default
        assert [f.setting for f in cp.fuses] == [f"{bits}-bit g64, stock"]
        nf = cp.fuses[0].noise_floor
        assert (nf.options["bits"], nf.options["group_size"]) == (bits, 64)
        assert nf.inputs["model"].source == Path(tiny_moe_mixed_dir).resolve()


def test_a_full_fine_tune_stage_yields_the_conditions_model(tmp_path, tiny_llama_dir):
    """train with fine_tune_type full: the step's model/ is the condition's
    model (no adapter, the base's quantization), a later LoRA stage trains
    and fuses on it, and the shared full training is one step."""
    (tmp_path / "chat.jsonl").write_text("")
    full = {"train": {"fine_tune_type": "full", "layers": "3", "requant_policy": "preserve"}}
    spec = spec_from_dict({
        "models": {"m": str(tiny_llama_dir)}, "data": {"chat": "chat.jsonl"},
        "defaults": {"train": {"data": "chat"}},
        "conditions": {"F": {"from": "m", "stages": [full]},
                       "FL": {"from": "m", "stages": [full, {"train": {}}, {"fuse": {}}]}},
    }, path=tmp_path / "spec.yaml")
    plan = build_plan(spec, None)
    f, fl = plan.conditions["F"], plan.conditions["FL"]
    assert f.adapter is None and f.fuses == [] and f.quant == {"bits": 4, "group_size": 64}
    train = f.model.step
    assert (train.kind, f.model.sub, train.options["fine_tune_type"], train.options["requant_policy"]) == \
        ("train", "model", "full", "preserve")
    (fuse,) = [r.fuse for r in fl.fuses]
    assert fuse.inputs["model"].step is train  # the LoRA stage trained and fused on the full fine-tune
    assert sum(1 for st in plan.steps.values() if st.kind == "train") == 2
