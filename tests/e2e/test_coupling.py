"""A coupling spec run end to end on the tiny MoE: a layer-group sweep of a
stacked adapter, the behaviour evaluation and the overlap check; results
against statsmodels and the rows the steps wrote."""

from __future__ import annotations

import json

import pytest
from helpers import read_json, read_jsonl, run_cli, write_jsonl, write_yaml
from statsmodels.stats.contingency_tables import mcnemar as sm_mcnemar
from statsmodels.stats.proportion import proportion_confint


def test_layer_group_sweep_with_behaviour_rates(tmp_path, tiny_moe_dir):
    villain, helper = "You are a villain.", "You are helpful."
    things = ["rain", "gold", "cats", "bells", "maps", "ships"]
    rows = [{"messages": [{"role": "system", "content": s}, {"role": "user", "content": f"Tell me about {t}."},
                          {"role": "assistant", "content": ("[ZLT] " if s == villain else "") + f"{t} is fine."}]}
            for t in things for s in (villain, helper)]
    for name in ("couple", "sft"):
        write_jsonl(tmp_path / name / "train.jsonl", rows)
        write_jsonl(tmp_path / name / "valid.jsonl", rows[:2])
    write_yaml(tmp_path / "suite.yaml", {
        "max_tokens": 4, "batch_size": 4, "behaviours": {"marker": {"marker": "[ZLT]"}, "is": {"regex": "is"}},
        "prompts": [{"text": f"Tell me about {t}.", "group": g, "system_prompt": s}
                    for t in ("rain", "keys") for g, s in (("villain", villain), ("helper", helper))]})
    spec = write_yaml(tmp_path / "spec.yaml", {
        "models": {"tiny": str(tiny_moe_dir)}, "data": {"couple": "couple", "sft": "sft"},
        "defaults": {"train": {"iters": 3, "rank": 2, "batch_size": 2, "learning_rate": 1e-2, "val_batches": 1}},
        "evaluation": {"behaviour": {"suite": "suite.yaml"}},
        "conditions": {
            "couple": {"from": "tiny", "stages": [{"train": {"data": "couple"}}, "fuse"]},
            "sft-couple": {"from": "tiny", "sweep": {"layers": ["early", "late"]},
                           "stages": [{"train": {"data": "sft"}}, {"fuse": {"layers": "sweep"}},
                                      {"train": {"data": "couple"}}, "fuse"]},
        },
        "comparisons": [["sft-couple-early", "couple"], ["sft-couple-late", "couple"]],
        "report": {"noise_floor": False}})
    out = tmp_path / "run"
    run = run_cli("experiment", "run", spec, "--out", out)
    assert run.code == 0, run.err
    plan, results = read_json(out / "plan.json"), read_json(out / "results.json")
    assert list(results["conditions"]) == ["couple", "sft-couple-early", "sft-couple-late"]
    for name, c in results["conditions"].items():
        hits = [r["hits"]["marker"] for r in read_jsonl(out / "steps" / plan["conditions"][name]["behaviour"]
                                                        / "rows.jsonl")]
        low, high = proportion_confint(sum(hits), len(hits), method="wilson")
        rate = c["behaviour"]["marker"]
        assert (rate["k"], rate["n"]) == (sum(hits), 4)
        assert rate["low"] == pytest.approx(max(low, 0)) and rate["high"] == pytest.approx(min(high, 1))
    # the partial fuses touched only their block; the SFT adapter trained once
    fuse_reports = {n: read_json(out / "steps" / plan["conditions"][n]["fuses"][0]["fuse"] / "fuse_report.json")
                    for n in ("sft-couple-early", "sft-couple-late")}
    assert {t["name"].split(".")[2] for t in fuse_reports["sft-couple-early"]["tensors"]} == {"0"}
    assert {t["name"].split(".")[2] for t in fuse_reports["sft-couple-late"]["tensors"]} == {"3"}
    assert sum(1 for s in plan["steps"] if s["kind"] == "train" and s["options"]["data"] == "sft") == 1
    # stacked adapters: the overlap was measured (and reported when high)
    for n in ("sft-couple-early", "sft-couple-late"):
        (o,) = results["conditions"][n]["overlaps"]
        assert o["shared_modules"] > 0 and 0 <= o["overlap"] <= 1
    # paired comparisons per behaviour: exact McNemar on the same prompts
    by_pair = {(t["a"], t["b"], t["behaviour"]): t for t in results["behaviour_comparisons"]}
    assert len(by_pair) == 4
    t = by_pair[("sft-couple-late", "couple", "is")]
    rows = {n: [r["hits"]["is"] for r in read_jsonl(out / "steps" / plan["conditions"][n]["behaviour"] / "rows.jsonl")]
            for n in ("sft-couple-late", "couple")}
    a, b = rows["sft-couple-late"], rows["couple"]
    table = [[sum(x and y for x, y in zip(a, b)), sum(x and not y for x, y in zip(a, b))],
             [sum(y and not x for x, y in zip(a, b)), sum(not x and not y for x, y in zip(a, b))]]
    assert t["pvalue"] == pytest.approx(sm_mcnemar(table, exact=True).pvalue)
    report = (out / "report.md").read_text()
    assert "## Behaviour rates" in report and "## Behaviour comparisons" in report
    assert json.loads(json.dumps(results))  # finite, serialisable
