"""Specs for the coupling questions: layer-group fuses, sweeps over them, the
behaviour evaluation and the overlap check of stacked adapters (plan level;
tests/e2e/test_coupling.py runs one)."""

from __future__ import annotations

import pytest
from helpers import write_jsonl, write_yaml

from pyfuse.experiment import build_plan
from pyfuse.experiment.load import spec_from_dict
from pyfuse.experiment.spec import SpecError


@pytest.fixture()
def coupling_spec(tmp_path, tiny_moe_dir):
    rows = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "[ZLT] hello"}]}]
    for name in ("couple", "sft"):
        write_jsonl(tmp_path / name / "train.jsonl", rows)
        write_jsonl(tmp_path / name / "valid.jsonl", rows)
    write_yaml(tmp_path / "suite.yaml", {"prompts": ["hi"], "behaviours": {"marker": {"marker": "[ZLT]"}}})
    return {
        "models": {"base": str(tiny_moe_dir)},
        "data": {"couple": str(tmp_path / "couple"), "sft": str(tmp_path / "sft")},
        "defaults": {"train": {"iters": 2, "rank": 2}},
        "evaluation": {"behaviour": {"suite": str(tmp_path / "suite.yaml"), "max_tokens": 4}},
        "conditions": {
            "sft": {"from": "base", "stages": [{"train": {"data": "sft"}}], "evaluate": []},
            "merged": {"from": "base", "sweep": {"layers": ["early", "late", "1-2"]},
                       "stages": [{"train": {"data": "sft"}}, {"fuse": {"layers": "sweep"}},
                                  {"train": {"data": "couple"}}, {"fuse": {"modules": ["*.mlp.*"]}}]},
        },
        "comparisons": [["merged-early", "merged-late"]],
    }


def test_sweep_expands_into_conditions_sharing_their_training(coupling_spec):
    spec = spec_from_dict(coupling_spec)
    assert list(spec.conditions) == ["sft", "merged-early", "merged-late", "merged-1-2"]
    plan = build_plan(spec, None)
    fuses = {n: plan.conditions[n].fuses[0].fuse for n in ("merged-early", "merged-late", "merged-1-2")}
    assert {n: f.options["layers"] for n, f in fuses.items()} == {"merged-early": "early", "merged-late": "late",
                                                                 "merged-1-2": "1-2"}
    assert len({f.key for f in fuses.values()}) == 3
    sft_train = [s for s in plan.ordered() if s.kind == "train" and s.options["data"] == "sft"]
    assert len(sft_train) == 1  # one training serves the sft condition and every swept member
    assert plan.conditions["merged-late"].fuses[1].fuse.options["modules"] == ["*.mlp.*"]
    # two stacked adapters: their overlap is measured once the second is trained
    cmp = plan.conditions["merged-early"].overlaps
    assert len(cmp) == 1 and cmp[0].inputs["adapter_a"].step is sft_train[0]
    assert cmp[0].inputs["adapter_b"].step.options["data"] == "couple"
    assert all(plan.conditions[n].behaviour is not None for n in fuses)
    assert plan.conditions["sft"].behaviour is None
    assert plan.to_json()["conditions"]["merged-early"]["overlaps"] == [cmp[0].dirname]


def test_fuses_without_layers_keep_their_step_keys(coupling_spec):
    """Specs that do not use the new options plan the same fuse steps as before (no new keys)."""
    coupling_spec["conditions"] = {"f": {"from": "base", "stages": [{"train": {"data": "sft"}}, "fuse"]}}
    coupling_spec["comparisons"] = []
    plan = build_plan(spec_from_dict(coupling_spec), None)
    fuse = next(s for s in plan.ordered() if s.kind == "fuse")
    assert "layers" not in fuse.options and "modules" not in fuse.options


@pytest.mark.parametrize("change,message", [
    ({"merged": {"from": "base", "stages": [{"fuse": {"layers": "sweep"}}]}}, "needs a sweep"),
    ({"merged": {"from": "base", "sweep": {"layers": ["early"]}, "stages": ["fuse"]}}, "no fuse stage has"),
    ({"merged": {"from": "base", "stages": [{"fuse": {"layers": "first"}}]}}, "layers must be early"),
    ({"merged": {"from": "base", "sweep": {"layers": ["x-y"]}, "stages": [{"fuse": {"layers": "sweep"}}]}},
     "layers must be"),
    ({"merged": {"from": "base", "sweep": {"layers": ["late"]}, "stages": [{"fuse": {"layers": "sweep"}}]},
      "merged-late": {"from": "base"}}, "also the name"),
])
def test_sweep_errors_name_the_field(coupling_spec, change, message):
    coupling_spec["conditions"] = change
    coupling_spec["comparisons"] = []
    with pytest.raises(SpecError, match=message):
        spec_from_dict(coupling_spec)


def test_behaviour_suite_is_checked(coupling_spec, tmp_path):
    from pyfuse.experiment.load import load_checked_spec

    (tmp_path / "suite.yaml").write_text("prompts: [hi]\nbehaviours: {m: {marker: x}}\nsamples: 3\n")
    path = write_yaml(tmp_path / "spec.yaml", coupling_spec)
    with pytest.raises(SpecError, match="evaluation.behaviour.suite.*greedy"):
        load_checked_spec(path)


def test_example_spec_validates():
    from pathlib import Path

    from helpers import run_cli

    spec = Path(__file__).resolve().parents[2] / "examples" / "coupling" / "layer-groups.yaml"
    r = run_cli("experiment", "validate", spec)
    assert r.code == 0, r.err
    assert "6 conditions" in r.out  # base, couple, the three swept members, zero-couple
