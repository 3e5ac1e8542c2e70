"""`pyfuse experiment` without training: spec errors that name the field,
the shipped examples, the criterion's grammar and exact evaluation, the
lock and the verdict on the study's numbers, time estimates, and the plan
of a mixed-precision model. (Whole runs: tests/e2e/test_experiment.py.)"""

from __future__ import annotations

import copy
import json
from fractions import Fraction
from pathlib import Path

import pytest
import yaml

from pyfuse.errors import UserError
from pyfuse.experiment import build_plan, parse_criterion
from pyfuse.experiment.load import spec_from_dict
from pyfuse.experiment.prereg import Lock, canonical_json, lock, power_warnings, prereg_document, read_lock
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
     "conditions.A1.stages[1].fuse.policy: must be one of stock, preserve, stochastic (got 'stok')"),
    (lambda s: s["conditions"]["A1"]["stages"][0]["train"].update(lr=1),
     "conditions.A1.stages[0].train.lr: unknown field (known: data, fine_tune_type, rank,"),
    (lambda s: s["conditions"]["A1"]["stages"][0]["train"].update(rank=0),
     "conditions.A1.stages[0].train.rank: must be greater than or equal to 1 (got 0)"),
    (lambda s: s["conditions"]["A1"].update({"from": "nobody"}),
     "conditions.A1.from: unknown model or condition 'nobody'"),
    (lambda s: s["conditions"]["A1"].pop("from"), "conditions.A1.from: required"),
    (lambda s: s["conditions"]["A1"].update(stages=["zero"]),
     "conditions.A1.stages[0].zero: a zero stage needs an adapter: put it after a train stage"),
    (lambda s: s["conditions"]["A1"]["stages"].insert(0, {"train": {}, "fuse": {}}),
     "conditions.A1.stages[0]: a stage has exactly one of train, zero, fuse, stack; got train, fuse"),
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
    # the study's own design is flagged as under-powered (MDE ~6.1 points > 5 at n = 692)
    r = run_cli("experiment", "validate", REPO / "examples" / "stacking-confound.yaml")
    assert r.code == 0
    assert "minimum detectable effect is 6.1 points" in r.err


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
    spec = spec_from_dict(spec_dict, check_paths=False)
    return lock(spec, tmp_path, has_finished_steps=False)


def test_verdict_on_the_studys_numbers_and_the_lock(tmp_path):
    spec = {"models": {"persona": "p"}, "data": {"mmlu": "m.jsonl"},
            "conditions": {"A1": {"from": "persona", "stages": [{"train": {"data": "mmlu"}}, {"fuse": {}}]},
                           "A0": {"from": "persona", "stages": [{"train": {"data": "mmlu"}}, "zero",
                                                                {"fuse": {}}]}},
            "evaluation": {"mc": {"data": "mmlu"}},
            "preregistration": {"hypothesis": "Set-G content contributes real knowledge",
                                "criterion": "diff(A1, A0) >= 0.05 and ztest_p(A1, A0) < 0.05",
                                "kill": "the knowledge-injection line is closed", "planned_n": 692,
                                "baseline_accuracy": 0.178}}
    lk = _lock_for(spec, tmp_path / "d1")
    assert lk.created and lk.split_seed == int(lk.sha256[:8], 16)
    # 128/692 vs 123/692 (the study): z-test p = 0.727, not met; the design is under-powered
    a1 = [1] * 128 + [0] * 564
    a0 = [1] * 100 + [0] * 28 + [1] * 23 + [0] * 541
    ids = list(range(692))
    results = {"conditions": {"A1": {"correct": a1, "n": 692, "accuracy": 128 / 692, "ids": ids, "identity": None},
                              "A0": {"correct": a0, "n": 692, "accuracy": 123 / 692, "ids": ids, "identity": None}}}
    v = verdict(results, lk)
    assert v["passed"] is False
    assert v["observed"]["ztest_p(A1, A0)"] == pytest.approx(0.727, abs=5e-4)
    assert "diff(A1, A0) = +0.72 points (128/692 vs 123/692)" in v["text"]
    assert "ztest_p(A1, A0) = 0.727" in v["text"] and "is NOT MET" in v["text"]
    assert any("6.1 points" in w and "under-powered" in w for w in v["warnings"])
    pw = power_warnings(lk.document)
    assert pw[0]["warn"] and pw[0]["mde"] == pytest.approx(0.061, abs=5e-4)
    # at 2000 items per arm the same threshold is within reach
    assert not power_warnings({**lk.document, "planned_n": 2000})[0]["warn"]

    # the same spec locks again; a changed threshold or a tampered lock is refused
    assert _lock_for(spec, tmp_path / "d1").sha256 == lk.sha256
    changed = copy.deepcopy(spec)
    changed["preregistration"]["criterion"] = "diff(A1, A0) >= 0.04 and ztest_p(A1, A0) < 0.05"
    with pytest.raises(UserError, match="changed: criterion, thresholds"):
        _lock_for(changed, tmp_path / "d1")
    assert prereg_document(spec_from_dict(changed, check_paths=False))["criterion"] != lk.criterion
    lock_path = tmp_path / "d1" / "prereg.json"
    rec = read_json(lock_path)
    rec["canonical"] = rec["canonical"].replace("0.05", "0.04", 1)
    lock_path.write_text(json.dumps(rec))
    with pytest.raises(UserError, match="does not match its SHA-256"):
        read_lock(tmp_path / "d1")
    # no pre-registration after the fact: finished steps but no lock
    with pytest.raises(UserError, match="must be locked before any training"):
        lock(spec_from_dict(spec, check_paths=False), tmp_path / "d2", has_finished_steps=True)
    assert canonical_json({"b": 1, "a": [1, 2]}) == '{"a":[1,2],"b":1}'


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
