"""A fuse stage's calibration options in an experiment spec (`calibration`,
`calibration_min_tokens`, `damp`, with `policy: calibrated` and
`requant_bits`): the refusals that name the field, the step identity (the
calibration data's content is an input of the fuse step; its name is not),
the lock (a calibration path is hashed with the data), and the step's model
byte-identical to `pyfuse fuse` run with the same flags."""

from __future__ import annotations

import copy
import filecmp
import json

import pytest

from pyfuse.experiment import build_plan
from pyfuse.experiment.load import spec_from_dict
from pyfuse.experiment.prereg import data_paths
from pyfuse.experiment.spec import SpecError
from pyfuse.experiment.steps import RUNNERS

from helpers import DOWN, make_adapter, run_cli, write_jsonl

TEXTS = ["The quick brown fox jumps over the lazy dog.", "Paris is the capital of France.",
         "Two plus two is four, and four plus four is eight.", "Mixture of experts models route each token.",
         "Water boils at one hundred degrees.", "A tiny model reads tiny sentences."]
FAITHFUL = {"policy": "calibrated", "calibration": "calib", "requant_bits": 8, "damp": 0.02,
            "calibration_min_tokens": 8}


@pytest.fixture(scope="module")
def work(tmp_path_factory, tiny_moe_dir):
    root = tmp_path_factory.mktemp("exp_calib")
    write_jsonl(root / "calib.jsonl", [{"text": t} for t in TEXTS])
    write_jsonl(root / "other.jsonl", [{"text": t.upper()} for t in TEXTS])
    spec = {"models": {"m": str(tiny_moe_dir)}, "data": {"calib": "calib.jsonl", "other": "other.jsonl"},
            "conditions": {"A1": {"from": "m", "stages": [{"train": {"data": "calib"}}, {"fuse": dict(FAITHFUL)}]},
                           "A0": {"from": "m", "stages": [{"train": {"data": "calib"}}, "zero",
                                                          {"fuse": dict(FAITHFUL)}]},
                           "S": {"from": "m", "stages": [{"train": {"data": "calib"}}, {"fuse": {}}]}}}
    return {"root": root, "spec": spec}


def _load(work, spec):
    return spec_from_dict(spec, source="spec.yaml", path=work["root"] / "spec.yaml")


def _fuse_step(plan, name):
    stage = [s for s in plan.conditions[name].stages if s["kind"] == "fuse"][-1]
    return next(s for s in plan.steps.values() if s.dirname == stage["step"])


def _cli_fuse_same_as_step(tiny_moe_dir, adapter, calib, step_out, cli_out, report, damp="0.02"):
    """`pyfuse fuse` with the spec's flags into ``cli_out``; asserts the same
    model files, byte for byte, as the step wrote; returns the file names."""
    r = run_cli("fuse", "--model", tiny_moe_dir, "--adapter-path", adapter, "--save-path", cli_out,
                "--policy", "calibrated", "--calibration", calib, "--requant-bits", "8",
                "--damp", damp, "--calibration-min-tokens", "8", "--report", report)
    assert r.code == 0, r.err
    files = sorted(p.name for p in (step_out / "model").iterdir())
    assert files == sorted(p.name for p in cli_out.iterdir())
    for name in files:
        assert filecmp.cmp(step_out / "model" / name, cli_out / name, shallow=False), name
    return files


def _a1_fuse(spec, **over):
    spec["conditions"]["A1"]["stages"][1]["fuse"].update(over)
    for k in [k for k, v in over.items() if v is None]:
        spec["conditions"]["A1"]["stages"][1]["fuse"].pop(k)
    return spec


BAD = [
    (dict(calibration=None, damp=None, calibration_min_tokens=None),
     "conditions.A1.stages[1].fuse.calibration: required by policy calibrated"),
    (dict(policy="preserve", calibration=None, calibration_min_tokens=None),
     "conditions.A1.stages[1].fuse.damp: needs calibration"),
    (dict(policy="preserve"), "conditions.A1.stages[1].fuse.damp: is used by policy calibrated only, not preserve"),
    (dict(calibration="setg"), "conditions.A1.stages[1].fuse.calibration: 'setg' needs a setg section"),
    (dict(calibration="missing.jsonl"),
     "conditions.A1.stages[1].fuse.calibration: calibration data (a path: no `data` entry has this name) does "
     "not exist"),
    (dict(damp=-1), "conditions.A1.stages[1].fuse.damp: must be greater than or equal to 0 (got -1)"),
    (dict(damp="lots"), "conditions.A1.stages[1].fuse.damp: must be a number, got 'lots'"),
    (dict(calibration_min_tokens=1.5), "conditions.A1.stages[1].fuse.calibration_min_tokens: must be an integer"),
]


@pytest.mark.parametrize("over, expected", BAD)
def test_bad_calibration_options_name_the_field(work, over, expected):
    with pytest.raises(SpecError) as err:
        _load(work, _a1_fuse(copy.deepcopy(work["spec"]), **over))
    assert expected in str(err.value), str(err.value)
    assert str(err.value).count("\n") == 0  # one problem, one line


def test_calibration_through_setg_closes_a_cycle(work):
    """A condition whose fuse calibrates on Set-G while Set-G is mined with
    that condition's model: refused, naming the calibration field."""
    spec = copy.deepcopy(work["spec"])
    spec["data"]["mmlu"] = "calib.jsonl"
    spec["conditions"]["P"] = {"from": "m", "stages": [{"train": {"data": "calib"}},
                                                       {"fuse": {"policy": "preserve", "calibration": "setg"}}]}
    spec["setg"] = {"data": "mmlu", "base": "m", "persona": "P"}
    with pytest.raises(SpecError) as err:
        _load(work, spec)
    assert ("conditions.P.stages[1].fuse.calibration: circular reference: P -> setg -> P (P's fuse calibrates "
            "on Set-G; Set-G is mined with P's model)") in str(err.value)
    # the same calibration in a condition that Set-G does not need: its fuse reads Set-G's training rows
    spec["setg"]["persona"] = "S"
    plan = build_plan(_load(work, spec), split_seed=0)
    calib = _fuse_step(plan, "P").inputs["calibration"]
    assert calib.step is plan.setg and calib.sub == "data"


def test_step_identity_follows_the_calibration_content_not_its_name(work):
    root = work["root"]
    plan = build_plan(_load(work, work["spec"]), split_seed=None)
    a1, a0, stock = (_fuse_step(plan, n) for n in ("A1", "A0", "S"))
    assert a1.options["policy"] == "calibrated" and a1.options["damp"] == 0.02 and "calibration" not in a1.options
    assert a1.inputs["calibration"].source == root / "calib.jsonl"
    assert a1.inputs["calibration"] is a0.inputs["calibration"]
    # a fuse without calibration has no calibration keys (the step keys of older specs are unchanged)
    assert "calibration" not in stock.inputs and not {"calibration_min_tokens", "damp"} & set(stock.options)
    # the same file given as a path: the same step; other data, damp or token threshold: another step,
    # and the training before it is the same step
    by_path = build_plan(_load(work, _a1_fuse(copy.deepcopy(work["spec"]), calibration=str(root / "calib.jsonl"))),
                         split_seed=None)
    assert _fuse_step(by_path, "A1").key == a1.key
    for over in (dict(calibration="other"), dict(damp=0.05), dict(calibration_min_tokens=9), dict(requant_bits=None)):
        other = build_plan(_load(work, _a1_fuse(copy.deepcopy(work["spec"]), **over)), split_seed=None)
        assert _fuse_step(other, "A1").key != a1.key, over
        assert _fuse_step(other, "A0").key == a0.key
    # edited content at the same path: another key
    spec = _a1_fuse(copy.deepcopy(work["spec"]), calibration="edited.jsonl")
    write_jsonl(root / "edited.jsonl", [{"text": t} for t in TEXTS])
    first = _fuse_step(build_plan(_load(work, spec), split_seed=None), "A1").key
    assert first == a1.key  # same content as calib.jsonl
    write_jsonl(root / "edited.jsonl", [{"text": t} for t in TEXTS[:-1]])
    assert _fuse_step(build_plan(_load(work, spec), split_seed=None), "A1").key != first
    # a calibration path is one of the data files the lock hashes
    assert data_paths(_load(work, spec))["conditions.A1.stages[1].fuse.calibration"] == root / "edited.jsonl"
    # no refined noise floor (it would re-fit the base, not refine it); the stock fuse keeps its own
    assert plan.conditions["A1"].fuses[0].noise_floor is None
    assert plan.conditions["A1"].fuses[0].setting == "8-bit g64, calibrated"
    assert plan.conditions["S"].fuses[0].noise_floor is not None


def test_fuse_step_is_byte_identical_to_the_cli(work, tiny_moe_dir):
    """The planned step's options through the step runner, and `pyfuse fuse`
    with the same flags: the same model bytes and the same report figures."""
    root = work["root"]
    adapter = make_adapter(tiny_moe_dir, root / "adapter", keys=[DOWN], b_std=1e-3)
    step = _fuse_step(build_plan(_load(work, work["spec"]), split_seed=None), "A1")
    out = root / "step_out"
    out.mkdir()
    RUNNERS["fuse"](step.options, {"model": tiny_moe_dir, "adapter": adapter,
                                   "calibration": step.inputs["calibration"].source}, out)
    files = _cli_fuse_same_as_step(tiny_moe_dir, adapter, root / "calib.jsonl", out, root / "cli_out",
                                   root / "cli.json")
    ours = json.loads((out / "fuse_report.json").read_text())["tensors"]
    theirs = json.loads((root / "cli.json").read_text())["tensors"]
    assert ours == theirs
    assert all(t["calibration"]["min_expert_tokens"] >= 0 and t["output_error"] is not None for t in ours)
    # a different damp changes the model: the option reaches the fuse
    r = run_cli("fuse", "--model", tiny_moe_dir, "--adapter-path", adapter, "--save-path", root / "cli_damp",
                "--policy", "calibrated", "--calibration", root / "calib.jsonl", "--requant-bits", "8",
                "--damp", "5", "--calibration-min-tokens", "8")
    assert r.code == 0, r.err
    assert any(not filecmp.cmp(out / "model" / n, root / "cli_damp" / n, shallow=False) for n in files)


def test_measurement_only_calibration_is_not_part_of_the_locked_design(work):
    """Calibration data under stock / preserve / stochastic only adds the
    report's output error (the model bytes are those of the fuse without it):
    the pre-registered design, hence the lock and the Set-G split seed, is
    the same with or without it; under calibrated it steers the rounding and
    is part of the design."""
    from pyfuse.experiment.prereg import prereg_document

    def design(**over):
        spec = copy.deepcopy(work["spec"])
        spec["conditions"]["S"]["stages"][1]["fuse"].update(over)
        spec["preregistration"] = {"hypothesis": "h", "criterion": "diff(A1, S) >= 0.05"}
        spec["evaluation"] = {"mc": {"data": "calib", "method": "logprob"}}
        return prereg_document(_load(work, spec))["design"]

    plain = design()
    assert design(calibration="calib") == plain and design(calibration="other", policy="stock") == plain
    assert design(policy="preserve", calibration="calib") == design(policy="preserve")
    assert design(policy="calibrated", calibration="calib") != design(policy="calibrated", calibration="other")
    assert plain["A1"]["stages"][1]["fuse"]["calibration"] == "calib"  # A1 is calibrated


def _calibrate_step(plan, name):
    return _fuse_step(plan, name).inputs["hessians"].step


def test_fuses_of_one_adapter_share_one_calibrate_step(work):
    """Fuses of the same model and adapter over the same data and module
    selection read the sums of ONE calibrate step, whatever their policy,
    damp or re-quantization; its key (hence theirs) follows the data's
    content, the token threshold and the module selection."""
    spec = copy.deepcopy(work["spec"])
    for name, fuse in (("P", {"policy": "preserve", "calibration": "calib", "calibration_min_tokens": 8}),
                       ("Q", {"policy": "stock", "calibration": "calib", "calibration_min_tokens": 8})):
        spec["conditions"][name] = {"from": "m", "stages": [{"train": {"data": "calib"}}, {"fuse": fuse}]}
    plan = build_plan(_load(work, spec), split_seed=None)
    shared = _calibrate_step(plan, "A1")
    assert shared.kind == "calibrate" and _calibrate_step(plan, "P") is shared and _calibrate_step(plan, "Q") is shared
    assert [s.kind for s in plan.steps.values()].count("calibrate") == 2  # A1/P/Q's and the zero twin's (A0)
    assert _calibrate_step(plan, "A0") is not shared
    assert shared.inputs["adapter"].step is plan.steps[shared.inputs["adapter"].step.key]
    assert shared.inputs["adapter"].step.kind == "train" and shared.inputs["data"].source == work["root"] / "calib.jsonl"
    assert shared.options == {"calibration_min_tokens": 8, "only": None, "layers": None, "modules": None,
                              "dequantize": False}
    # the fuse reads the data too (its held-out sequences: the agreement) and the calibrate step's sums
    assert _fuse_step(plan, "A1").inputs["calibration"] is shared.inputs["data"]
    order = list(plan.steps.values())
    assert order.index(shared) < order.index(_fuse_step(plan, "A1"))
    a1_key = _fuse_step(plan, "A1").key
    for over in (dict(calibration="other"), dict(calibration_min_tokens=9), dict(modules=["*.mlp.*"])):
        other = build_plan(_load(work, _a1_fuse(copy.deepcopy(spec), **over)), split_seed=None)
        assert _calibrate_step(other, "A1").key != shared.key, over
        assert _fuse_step(other, "A1").key != a1_key, over
        assert _calibrate_step(other, "P").key == shared.key  # the others keep theirs
    other = build_plan(_load(work, _a1_fuse(copy.deepcopy(spec), damp=0.05)), split_seed=None)
    assert _calibrate_step(other, "A1").key == shared.key and _fuse_step(other, "A1").key != a1_key


def test_fuse_from_a_calibrate_step_is_byte_identical_to_the_cli(work, tiny_moe_dir, tmp_path):
    """The calibrate step, then the fuse step reading its saved sums: the
    model bytes and the report figures (the agreement on the held-out
    sequences included) of `pyfuse fuse --calibration` with the same flags."""
    root = work["root"]
    adapter = make_adapter(tiny_moe_dir, tmp_path / "adapter", keys=[DOWN], b_std=1e-3)
    fuse = _fuse_step(build_plan(_load(work, work["spec"]), split_seed=None), "A1")
    calib = fuse.inputs["hessians"].step
    (tmp_path / "cal").mkdir()
    summary = RUNNERS["calibrate"](calib.options, {"model": tiny_moe_dir, "adapter": adapter,
                                                   "data": root / "calib.jsonl"}, tmp_path / "cal")
    assert summary["modules"] == 2 and summary["tokens"] > 0 and summary["held_out_tokens"] > 0
    out = tmp_path / "step_out"
    out.mkdir()
    RUNNERS["fuse"](fuse.options, {"model": tiny_moe_dir, "adapter": adapter, "calibration": root / "calib.jsonl",
                                   "hessians": tmp_path / "cal" / fuse.inputs["hessians"].sub}, out)
    _cli_fuse_same_as_step(tiny_moe_dir, adapter, root / "calib.jsonl", out, tmp_path / "cli_out",
                           tmp_path / "cli.json")
    ours, theirs = (json.loads(p.read_text()) for p in (out / "fuse_report.json", tmp_path / "cli.json"))
    assert ours["tensors"] == theirs["tensors"]
    assert all(t["calibration"]["tokens"] > 0 and t["output_error"] is not None for t in ours["tensors"])
    drop = ("seconds",)
    assert {k: v for k, v in ours["summary"].items() if k not in drop} == \
        {k: v for k, v in theirs["summary"].items() if k not in drop}
    assert ours["summary"]["kl_to_unfused"] is not None


def test_saved_sums_read_back_bit_for_bit(work, tiny_moe_dir, tmp_path):
    """pyfuse.calibration.store: every array, count and fallback as collected."""
    import mlx.core as mx
    import numpy as np

    from pyfuse.calibration import collect_hessians, load_hessians, save_hessians

    paths = [f"model.layers.{i}.{DOWN}" for i in range(2)] + ["model.layers.1.self_attn.q_proj"]
    got = collect_hessians(tiny_moe_dir, work["root"] / "calib.jsonl", paths, min_tokens=40)
    assert any(mh.fallback for mh in got.values())  # a fallback expert is saved too
    save_hessians(got, tmp_path / "h")
    back = load_hessians(tmp_path / "h")
    assert list(back) == list(got)
    for path, mh in got.items():
        b = back[path]
        assert np.array_equal(np.array(b.fit), np.array(mh.fit)) and b.fit.dtype == mx.float32
        assert np.array_equal(np.array(b.held_out), np.array(mh.held_out))
        assert (b.tokens, b.held_out_tokens, b.fallback) == (mh.tokens, mh.held_out_tokens, mh.fallback)
