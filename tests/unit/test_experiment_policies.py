"""The per-policy table's choice of rows and twins (pyfuse.experiment.policies)
on plan.json stand-ins: the fuses of the adapter the unfused condition
applies, each paired with the condition that fuses its zero-delta twin with
the same setting; calibration data pairs a twin only where it steers the
rounding (policy calibrated). The figures themselves are checked against
a real run in tests/e2e/test_demo.py."""

from __future__ import annotations

from pyfuse.experiment.policies import _trained_fuses, _twin


def _fuse(step, policy="stock", setting=None, **opts):
    return {"kind": "fuse", "step": step, "setting": setting or f"3-bit g64, {policy}",
            "options": {"policy": policy, "dither": False, **opts}}


TRAIN, OTHER, ZERO = {"kind": "train", "step": "train-1"}, {"kind": "train", "step": "train-2"}, \
    {"kind": "zero", "step": "zero-1"}


def _plan(conditions: dict) -> dict:
    return {"condition_order": list(conditions),
            "conditions": {n: {"stages": st, "family": fam} for n, (st, fam) in conditions.items()}}


def test_rows_are_the_unfused_adapters_fuses_and_twins_match_their_setting():
    plan = _plan({
        "persona": ([OTHER, _fuse("f-p")], None),  # another adapter: not a row
        "A1": ([TRAIN, _fuse("f-1", calibration="setg")], None),  # measured only: A0 is still its twin
        "A0": ([TRAIN, ZERO, _fuse("f-0")], None),
        "A1-unfused": ([TRAIN], None),
        "A1-faithful": ([TRAIN, _fuse("f-2", "calibrated", "8-bit g64, calibrated", calibration="setg",
                                      requant_bits=8)], None),
        "A0-faithful": ([TRAIN, ZERO, _fuse("f-3", "calibrated", "8-bit g64, calibrated", calibration="other",
                                            requant_bits=8)], None),  # other data: another rounding
        "A1-preserve": ([TRAIN, _fuse("f-4", "preserve")], None),
        "A0-preserve": ([TRAIN, ZERO, _fuse("f-5", "preserve")], None),
        "A1-dithered": ([TRAIN, _fuse("f-6", dither=True)], None),
        "placebo.0": ([TRAIN, _fuse("f-7")], "placebo"),
    })
    rows = _trained_fuses(plan, "A1-unfused")
    assert list(rows) == ["A1", "A1-faithful", "A1-preserve"]
    assert list(_trained_fuses(plan, None)) == ["persona", "A1", "A1-faithful", "A1-preserve"]
    twins = {name: _twin(plan, stages) for name, stages in rows.items()}
    assert twins == {"A1": "A0", "A1-faithful": None, "A1-preserve": "A0-preserve"}
    plan["conditions"]["A0-faithful"]["stages"][-1]["options"]["calibration"] = "setg"
    assert _twin(plan, rows["A1-faithful"]) == "A0-faithful"
