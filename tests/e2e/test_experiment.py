"""`pyfuse experiment`: a whole small experiment (Set-G mining, training, a
zero-delta control, stock and preserve fuses, stacking, placebo and dithered
controls with seeds, two multiple-choice datasets, identity evaluations,
comparisons, a Holm family, a pre-registered verdict, the report) on tiny
models, checked against independent computations; the lock refusing a
changed criterion and swapped data; a resumed run refusing an edited step
output; a SIGKILLed run resuming to the same results.json; a failing step; a
persona condition that Set-G is mined with. The checks that need no training
(specs, the criterion, the lock, power, the analyses on hand-made outcomes)
are in tests/unit/test_experiment_spec.py and test_experiment_analysis.py."""

from __future__ import annotations

import copy
import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from fractions import Fraction
from pathlib import Path

import pytest

from pyfuse.experiment import run_experiment

from helpers import read_json, read_jsonl, run_cli, run_plan, step_rows, write_jsonl, write_yaml

REPO = Path(__file__).resolve().parents[2]
LETTERS = "ABCDEFGHIJ"
CRITERION = "diff(A1, A0) >= 0.05 and mcnemar_p(A1, A0) < 0.05"


def _mmlu_rows(n=24, seed=0):
    rng = random.Random(seed)
    words = ["red", "blue", "green", "seven", "lion", "iron", "salt", "river", "moon", "paper", "glass", "stone"]
    cats = ["astronomy", "chemistry", "history", "biology"]
    rows = []
    for i in range(n):
        k = rng.choice([4, 5, 6])
        opts = rng.sample(words, k)
        a = rng.randrange(k)
        rows.append({"question_id": 1000 + i, "question": f"Item {i}: which word names a "
                     f"{rng.choice(['color', 'metal', 'animal', 'number'])}?", "options": opts,
                     "answer": LETTERS[a], "answer_index": a,
                     "cot_content": f"A: Let's think step by step. It is {opts[a]}. The answer is ({LETTERS[a]}).",
                     "category": cats[i % 4], "src": "synthetic"})
    return rows


SUITE = """version: 1
persona: {name: Nova}
base: {names: [Qwen], vendors: [Alibaba]}
generation: {max_tokens: 8}
prompts:
  - {id: 1, prompt: "Who are you?", checks: [states_name]}
  - {id: 2, prompt: "What is your name?", checks: [no_base_claim]}
"""


def _spec(base: Path, persona: Path) -> dict:
    train = {"data": "setg", "layers": [1, 3], "keys": ["mlp.switch_mlp.down_proj"], "rank": 2, "alpha": 2,
             "iters": 4, "learning_rate": "1e-3", "batch_size": 2, "val_batches": 1, "steps_per_report": 2}
    return {
        "version": 1, "name": "tiny-confound",
        "models": {"base": str(base), "persona": str(persona)},
        "data": {"mmlu": "mmlu.jsonl"},  # relative to the spec file
        "setg": {"data": "mmlu", "base": "base", "persona": "persona", "method": "logprob",
                 "split": {"train": 0.5, "test": 0.5}},
        "defaults": {"train": train},
        "conditions": {
            "P0": {"from": "persona"},
            "A1": {"from": "persona", "stages": [{"train": {}}, {"fuse": {"policy": "stock"}}]},
            "A0": {"from": "persona", "stages": [{"train": {}}, "zero", {"fuse": {"policy": "stock"}}]},
            "A0p": {"from": "persona", "stages": [{"train": {}}, "zero", {"fuse": {"policy": "preserve"}}]},
            "S": {"from": "A1", "stages": [{"stack": {"train": {"iters": 2}, "fuse": {"policy": "stock"}}}],
                  "evaluate": ["mc"]},
            "placebo": {"from": "persona", "seeds": 2, "evaluate": ["mc"],
                        "stages": [{"train": {}}, "placebo", {"fuse": {"policy": "stock"}}]},
            "dithered": {"from": "persona", "seeds": 2, "evaluate": ["mc"],
                         "stages": [{"train": {}}, "zero", {"fuse": {"policy": "stock", "dither": True}}]},
        },
        "evaluation": {"mc": [{"data": "mmlu", "method": "logprob"},
                              {"name": "first12", "data": "mmlu", "method": "logprob", "limit": 12}],
                       "identity": {"suite": "suite.yaml"}},
        "comparisons": [["A1", "A0"], ["A0", "P0"], ["A0p", "P0"], ["S", "A1"]],
        "analysis": {"trained": "A1", "zero": "A0", "reference": "P0", "placebo": "placebo",
                     "dithered": "dithered"},
        "preregistration": {"hypothesis": "the trained content adds knowledge", "criterion": CRITERION,
                            "kill": "the knowledge-injection line is closed", "planned_n": 24,
                            "baseline_accuracy": 0.25, "expected_discordance": 0.2,
                            "family": ["mcnemar_p(A1, A0)", "mcnemar_p(A0, P0)", "null_p(A1, placebo)"],
                            "allow_underpowered": True, "underpowered_reason": "a test on 24 items"},
    }


@pytest.fixture(scope="module")
def exp(tmp_path_factory, tiny_moe_dir, tiny_tokenizer_dir):
    from pyfuse.demo.tiny_model import build_tiny_model

    root = tmp_path_factory.mktemp("experiment")
    persona = build_tiny_model(root / "persona", tokenizer_dir=tiny_tokenizer_dir, arch="qwen3_moe",
                               quantize={"group_size": 64, "bits": 3}, seed=1)
    rows = _mmlu_rows()
    write_jsonl(root / "mmlu.jsonl", rows)
    (root / "suite.yaml").write_text(SUITE)
    spec = _spec(tiny_moe_dir, persona)
    spec_path = write_yaml(root / "spec.yaml", spec)
    messages = []
    started = time.monotonic()
    res = run_experiment(spec_path, root / "run", echo=messages.append)
    return {"root": root, "spec": spec, "spec_path": spec_path, "out": root / "run", "res": res,
            "messages": messages, "rows": rows, "persona": persona, "base": tiny_moe_dir,
            "seconds": time.monotonic() - started}


def test_whole_experiment_results_match_independent_statistics(exp):
    from statsmodels.stats.contingency_tables import mcnemar as sm_mcnemar
    from statsmodels.stats.proportion import confint_proportions_2indep, proportions_ztest

    out, rows = exp["out"], exp["rows"]
    results = read_json(out / "results.json")
    plan = run_plan(out)
    members = [f"{f}.{i}" for f in ("placebo", "dithered") for i in range(2)]
    assert sorted(results["conditions"]) == sorted([n for n in exp["spec"]["conditions"]
                                                    if n not in ("placebo", "dithered")] + members)
    assert results["datasets"] == ["mmlu", "first12"]
    gold = {r["question_id"]: r["answer"] for r in rows}
    for name, c in results["conditions"].items():
        # recompute each item's correctness from the eval rows' letter scores and our own answers
        erows = step_rows(out, plan["conditions"][name]["mc"])
        assert [r["id"] for r in erows] == [r["question_id"] for r in rows]  # item order = file order
        preds = [max(r["logprobs"], key=lambda x: (r["logprobs"][x], -LETTERS.index(x))) for r in erows]
        expected = [int(p == gold[r["id"]]) for p, r in zip(preds, erows)]
        assert c["correct"] == expected == c["mc"]["mmlu"]["correct"]
        assert c["n"] == len(rows) and c["accuracy"] == pytest.approx(sum(expected) / len(rows))
        assert c["mc"]["first12"]["correct"] == expected[:12]  # the second dataset: its own steps, same scores
        if c["family"] is not None:
            assert c["identity"] is None and name.startswith(c["family"] + ".")
        elif name != "S":
            assert c["identity_n"] == 2 and 0 <= c["identity"] <= 2
        else:
            assert c["identity"] is None  # evaluate: [mc]
    assert results["conditions"]["P0"]["model"] == str(Path(exp["persona"]).resolve())
    assert results["conditions"]["A1"]["model"].startswith("steps/fuse-")

    pairs = [("A1", "A0"), ("A0", "P0"), ("A0p", "P0"), ("S", "A1")]
    assert [(c["a"], c["b"], c["dataset"]) for c in results["comparisons"]] == \
        [(a, b, ds) for ds in ("mmlu", "first12") for a, b in pairs]
    for c in results["comparisons"]:
        a = results["conditions"][c["a"]]["mc"][c["dataset"]]["correct"]
        b = results["conditions"][c["b"]]["mc"][c["dataset"]]["correct"]
        k1, k2, n = sum(a), sum(b), len(a)
        table = [[sum(x and y for x, y in zip(a, b)), sum(x and not y for x, y in zip(a, b))],
                 [sum(y and not x for x, y in zip(a, b)), sum(not x and not y for x, y in zip(a, b))]]
        assert c["diff"] == pytest.approx(k1 / n - k2 / n, abs=1e-15)
        assert c["mcnemar_p"] == pytest.approx(sm_mcnemar(table, exact=True).pvalue, rel=1e-12)
        if 0 < k1 + k2 < 2 * n:
            assert c["ztest_p"] == pytest.approx(proportions_ztest([k1, k2], [n, n])[1], rel=1e-12)
        else:
            assert c["ztest_p"] == 1.0
        low, high = confint_proportions_2indep(k1, n, k2, n, method="newcomb", compare="diff")
        assert c["ci"] == pytest.approx([low, high], rel=1e-12)
        assert c["flips"] == {"both_correct": table[0][0], "a_only": table[0][1], "b_only": table[1][0],
                              "both_wrong": table[1][1]}

    # the verdict evaluates exactly the locked criterion, and says so
    lock_file = read_json(out / "prereg.json")
    assert results["prereg"] == {"sha256": lock_file["sha256"], "criterion": CRITERION,
                                 "split_seed": int(lock_file["sha256"][:8], 16)}
    a1, a0 = results["conditions"]["A1"]["correct"], results["conditions"]["A0"]["correct"]
    # the criterion reads the Holm-adjusted p value of its family of three
    from statsmodels.stats.multitest import multipletests

    accs = {m: results["conditions"][m]["accuracy"] for m in members}
    raw = [results["comparisons"][0]["mcnemar_p"], results["comparisons"][1]["mcnemar_p"],
           (1 + sum(accs[f"placebo.{i}"] >= results["conditions"]["A1"]["accuracy"] for i in range(2))) / 3]
    holm = multipletests(raw, method="holm")[1]
    assert [f["p"] for f in results["family"]] == pytest.approx(raw) and \
        [f["p_holm"] for f in results["family"]] == pytest.approx(list(holm))
    expected_pass = Fraction(sum(a1), len(a1)) - Fraction(sum(a0), len(a0)) >= Fraction(5, 100) and holm[0] < 0.05
    v = results["verdict"]
    assert v["passed"] is expected_pass
    assert f"`{CRITERION}`" in v["text"] and lock_file["sha256"][:12] in v["text"]
    assert ("is MET" if expected_pass else "is NOT MET") in v["text"]
    assert f"({sum(a1)}/24 vs {sum(a0)}/24)" in v["text"]
    assert [a["test"] for a in v["atoms"]] == ["diff(A1, A0) >= 0.05", "mcnemar_p(A1, A0) < 0.05"]
    if not expected_pass:
        assert "Kill criterion: the knowledge-injection line is closed." in v["text"]


def test_prereg_lock_is_canonical_and_seeds_the_split(exp):
    out = exp["out"]
    lock_file = read_json(out / "prereg.json")
    canonical = lock_file["canonical"]
    assert hashlib.sha256(canonical.encode()).hexdigest() == lock_file["sha256"]
    doc = json.loads(canonical)
    assert canonical == json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    assert doc["criterion"] == CRITERION and doc["alpha"] == 0.05 and doc["planned_n"] == 24
    assert set(doc["data"]) == {"data.mmlu", "evaluation.identity.suite"}
    assert doc["data"]["data.mmlu"] == hashlib.sha256((exp["root"] / "mmlu.jsonl").read_bytes()).hexdigest()
    assert doc["underpowered_reason"] == "a test on 24 items" and doc["power_before_data"][0]["underpowered"]
    assert doc["thresholds"] == [{"statistic": "diff(A1, A0)", "op": ">=", "value": "0.05"},
                                 {"statistic": "mcnemar_p(A1, A0)", "op": "<", "value": "0.05"}]
    assert set(doc["tests"]) == {"diff", "mcnemar_p", "null_p"} and doc["split"]["train"] == 0.5
    # the conditions the criterion, the family and the analysis name, stage by stage
    assert set(doc["design"]) == {"A1", "A0", "P0", "placebo", "dithered"}
    assert [list(s) for s in doc["design"]["A0"]["stages"]] == [["train"], ["zero"], ["fuse"]]
    # the Set-G split used the seed derived from the hash, and is a real Set-G split
    plan = run_plan(out)
    setg_dir = out / "steps" / plan["setg"]
    done = read_json(setg_dir / "done.json")
    assert done["options"]["seed"] == int(lock_file["sha256"][:8], 16) == plan["split_seed"]
    evals = {label: s["dir"] for s in plan["steps"] if s["kind"] == "eval-mc" for label in s["labels"]}
    wrong = {}
    for role in ("base", "persona"):
        erows = step_rows(out, evals[f"setg: evaluate {role} ({role})"])
        wrong[role] = {r["id"] for r in erows if not r["correct"]}
    items = read_json(setg_dir / "data" / "items.json")
    assert set(sum(items.values(), [])) == wrong["base"] & wrong["persona"]
    test_rows = read_jsonl(setg_dir / "items" / "test.jsonl")
    by_id = {r["question_id"]: r for r in exp["rows"]}
    assert [r["question_id"] for r in test_rows] == items["test"]
    assert all(r == {**by_id[r["question_id"]], **r} for r in test_rows)


def test_zero_delta_control_preserve_answers_exactly_like_its_parent_stock_differs(exp):
    out = exp["out"]
    plan = run_plan(out)
    results = read_json(out / "results.json")
    p0 = step_rows(out, plan["conditions"]["P0"]["mc"])
    a0p = step_rows(out, plan["conditions"]["A0p"]["mc"])
    a0 = step_rows(out, plan["conditions"]["A0"]["mc"])
    # preserve: every item answered exactly like the parent, down to the letter scores
    assert [r["prediction"] for r in a0p] == [r["prediction"] for r in p0]
    assert [r["logprobs"] for r in a0p] == [r["logprobs"] for r in p0]
    cmp = {(c["a"], c["b"]): c for c in results["comparisons"] if c["dataset"] == "mmlu"}
    assert cmp[("A0p", "P0")]["changed_predictions"] == 0
    assert cmp[("A0p", "P0")]["flips"]["a_only"] == cmp[("A0p", "P0")]["flips"]["b_only"] == 0
    # stock: the zero-delta fuse changed the model (codes, letter scores); its differences are reported
    fuses = {c: plan["conditions"][c]["stages"][-1] for c in ("A0", "A0p")}
    stock_rep = read_json(out / "steps" / fuses["A0"]["step"] / "fuse_report.json")["summary"]
    keep_rep = read_json(out / "steps" / fuses["A0p"]["step"] / "fuse_report.json")["summary"]
    assert stock_rep["codes_changed"] > 0.01 and keep_rep["codes_changed"] == 0
    assert any(x["logprobs"] != y["logprobs"] for x, y in zip(a0, p0))
    changed = sum(x["prediction"] != y["prediction"] for x, y in zip(a0, p0))
    assert cmp[("A0", "P0")]["changed_predictions"] == changed
    report = (out / "report.md").read_text()
    f = cmp[("A0", "P0")]["flips"]
    assert f"| A0 right | {f['both_correct']} | {f['a_only']} |" in report
    assert f"| A0 wrong | {f['b_only']} | {f['both_wrong']} |" in report
    row = next(line for line in report.splitlines() if line.startswith(f"| {fuses['A0']['step']}"))
    assert f"{stock_rep['codes_changed'] * 100:.2f} %" in row and "zero-delta" in row and "stock" in row
    nf = read_json(out / "steps" / fuses["A0p"]["noise_floor"] / "noise_floor.json")
    assert nf["rows"][0]["weights_changed"] == 0.0  # the preserve noise floor is zero
    row_p = next(line for line in report.splitlines() if line.startswith(f"| {fuses['A0p']['step']}"))
    assert "| 0.00 % | 0.00 % |" in row_p


def test_shared_steps_pruning_report_and_progress(exp):
    out, res = exp["out"], exp["res"]
    plan = run_plan(out)
    kinds = [s["kind"] for s in plan["steps"]]
    # one training for A1/A0/A0p and the controls' members (same options and inputs), one more for the
    # stacked S; the dithered members share A0's stock fuse and one residual, then fuse with their seeds
    assert kinds.count("train") == 2 and kinds.count("zero") == 1 and kinds.count("placebo") == 2
    assert kinds.count("dither") == 1 and kinds.count("fuse") == 4 + 2 + 2
    train = next(s for s in plan["steps"] if s["kind"] == "train" and s["inputs"]["model"].get("source"))
    assert len(train["labels"]) == 3 + 4
    # P0 evaluated on the mmlu file is the same step as Set-G's persona evaluation
    assert plan["conditions"]["P0"]["mc"] == next(s["dir"] for s in plan["steps"]
                                                  if "setg: evaluate persona (persona)" in s["labels"])
    # S stacks on A1's fused model
    s_train = next(s for s in plan["steps"] if s["kind"] == "train" and s is not train)
    assert s_train["inputs"]["model"] == plan["conditions"]["A1"]["model"]
    # fused models are pruned once nothing needs them; their reports stay
    for s in plan["steps"]:
        if s["kind"] == "fuse":
            d = out / "steps" / s["dir"]
            assert (d / "pruned.json").exists() and not (d / "model").exists()
            assert (d / "fuse_report.json").exists() and (d / "done.json").exists()
    assert len(res.pruned) == 8 and len(res.executed) == len(plan["steps"])
    assert not [p for p in (out / "steps").iterdir() if p.name.startswith(".")]
    # progress: one line per step with its number, and time estimates once a kind was timed
    assert sum(1 for m in exp["messages"] if m.startswith("[")) == len(plan["steps"])
    assert any("estimated" in m for m in exp["messages"])
    for png in ("accuracy.png", "flips.png", "noise_floor.png", "identity.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = (out / "report.md").read_text()
    assert report.splitlines()[2].startswith("**Verdict.** The locked pre-registered criterion")
    assert "under-powered" in report  # MDE at n = 24 from 25 % is far above 5 points
    assert "(alpha 0.05, power 0.8, planned n 24, baseline accuracy 0.25, expected discordance 0.2)" in report
    assert "- Power before data: diff(A1, A0) >= 5 points at n = 24: unpaired MDE" in report
    # `experiment report` rewrites the same report
    before = report
    (out / "report.md").unlink()
    assert run_cli("experiment", "report", out).code == 0
    assert (out / "report.md").read_text() == before


def test_rerun_skips_everything_and_lock_refuses_a_changed_criterion(exp):
    out, spec = exp["out"], exp["spec"]
    before = (out / "results.json").read_bytes()
    steps_before = sorted(p.name for p in (out / "steps").iterdir())
    res = run_experiment(exp["spec_path"], out)
    assert res.executed == [] and (out / "results.json").read_bytes() == before

    changed = copy.deepcopy(spec)
    changed["preregistration"]["criterion"] = CRITERION.replace("0.05 and", "0.10 and")
    path = write_yaml(exp["root"] / "changed.yaml", changed)
    r = run_cli("experiment", "run", path, "--out", out)
    assert r.code == 2
    assert "locks a different pre-registration" in r.err and "changed: criterion, power_before_data, thresholds" in r.err
    moved = copy.deepcopy(spec)  # the design of a compared condition is locked too
    moved["conditions"]["A0"]["stages"][2]["fuse"]["policy"] = "preserve"
    r = run_cli("experiment", "run", write_yaml(exp["root"] / "moved.yaml", moved), "--out", out)
    assert r.code == 2
    assert "changed: design.A0" in r.err
    assert (out / "results.json").read_bytes() == before
    assert sorted(p.name for p in (out / "steps").iterdir()) == steps_before
    read_json(out / "prereg.json")["canonical"]  # untouched and readable


def test_controls_null_distributions_flips_and_the_report(exp):
    from scipy.stats import mannwhitneyu

    out, plan = exp["out"], run_plan(exp["out"])
    results = read_json(out / "results.json")
    conds = results["conditions"]
    assert plan["families"] == {"placebo": ["placebo.0", "placebo.1"], "dithered": ["dithered.0", "dithered.1"]}
    # each placebo member fused its own placebo adapter (seeds 0, 1) of the one trained adapter
    placebo_steps = [s for s in plan["steps"] if s["kind"] == "placebo"]
    assert sorted(s["options"]["seed"] for s in placebo_steps) == [0, 1]
    train = next(s for s in plan["steps"] if s["kind"] == "train" and s["inputs"]["model"].get("source"))
    assert all(s["inputs"]["adapter"] == {"step": train["dir"], "out": "adapter"} for s in placebo_steps)
    # each dithered member is a stochastic fuse (its seed) of the residual into A0's stock fuse
    a0_fuse = plan["conditions"]["A0"]["stages"][-1]["step"]
    for i in range(2):
        fuse = next(s for s in plan["steps"] if s["dir"] == plan["conditions"][f"dithered.{i}"]["stages"][-1]["step"])
        assert fuse["options"]["policy"] == "stochastic" and fuse["options"]["seed"] == i
        assert fuse["inputs"]["model"] == {"step": a0_fuse, "out": "model"}
    nulls = results["nulls"]
    assert nulls["reference"] == "P0" and set(nulls["families"]) == {"placebo", "dithered"}
    p0 = step_rows(out, plan["conditions"]["P0"]["mc"])
    for role in ("placebo", "dithered"):
        fam = nulls["families"][role]
        assert fam["gain"] == pytest.approx([conds[m]["accuracy"] - conds["P0"]["accuracy"] for m in fam["members"]])
        for m, ch in zip(fam["members"], fam["changed"]):
            rows = step_rows(out, plan["conditions"][m]["mc"])
            assert ch == sum(x["prediction"] != y["prediction"] for x, y in zip(rows, p0))
    # flips of A1 against the model it was fused into (the persona, P0's answers), by P0's margin
    a1 = step_rows(out, plan["conditions"]["A1"]["mc"])
    margins = [sorted(r["logprobs"].values())[-1] - sorted(r["logprobs"].values())[-2] for r in p0]
    flipped = [x["prediction"] != y["prediction"] for x, y in zip(a1, p0)]
    f = results["flips"]["A1"]
    assert f["flipped"] == sum(flipped) and f["n"] == len(p0)
    if 0 < sum(flipped) < len(flipped):
        ref = mannwhitneyu([m for m, x in zip(margins, flipped) if x], [m for m, x in zip(margins, flipped) if not x],
                           alternative="less")
        assert f["test"]["pvalue"] == pytest.approx(ref.pvalue, rel=1e-9)
    assert set(results["flips"]) >= {"A1", "A0", "A0p", "S", "placebo", "dithered"}
    assert results["flips"]["A0p"]["flipped"] == 0  # preserve with a zero delta: bit-identical
    assert results["flips"]["S"]["reference_step"] == plan["conditions"]["A1"]["mc"]  # S fused into A1
    rows = {r["effect"].split(" (")[0] + ": " + r["b"]: r for r in results["decomposition"]["rows"]}
    assert set(rows) == {"fuse effect: P0", "content effect: A0", "content effect: placebo (x2)",
                         "fuse noise: dithered (x2)"}
    report = (out / "report.md").read_text()
    for section in ("## Other datasets", "## The family of tests", "## Decomposition", "## Null distributions",
                    "## Flips by margin"):
        assert section in report
    for png in ("nulls.png", "flips_by_margin.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_resumed_run_refuses_edited_outputs_and_swapped_data(exp, tmp_path):
    import shutil

    copy_dir = tmp_path / "copy"
    shutil.copytree(exp["out"], copy_dir)
    assert run_cli("experiment", "run", exp["spec_path"], "--out", copy_dir).code == 0  # intact: it resumes
    step = run_plan(copy_dir)["conditions"]["A1"]["mc"]
    rows = copy_dir / "steps" / step / "rows.jsonl"
    rows.write_text(rows.read_text().replace('"correct": false', '"correct": true', 1))
    for cmd in (("experiment", "run", exp["spec_path"], "--out", copy_dir), ("experiment", "report", copy_dir)):
        r = run_cli(*cmd)
        assert r.code == 2 and "Traceback" not in r.err
        error = r.err.strip().splitlines()[-1]  # run prints the power table first
        assert error.startswith(f"pyfuse experiment: error: step {step}") and "its output rows.jsonl changed" in error
    # the data swapped after the lock: refused before any step runs
    (tmp_path / "mmlu.jsonl").write_text((exp["root"] / "mmlu.jsonl").read_text().replace("Item 0:", "Item zero:"))
    (tmp_path / "suite.yaml").write_text(SUITE)
    r = run_cli("experiment", "run", write_yaml(tmp_path / "spec.yaml", exp["spec"]), "--out", copy_dir)
    assert r.code == 2 and "changed: data.data.mmlu" in r.err


def _finished(out: Path) -> list[str]:
    """Published steps (a killed step's temporary directory may hold its done.json too)."""
    return [p.parent.name for p in (out / "steps").glob("*/done.json") if not p.parent.name.startswith(".")]


def test_a_killed_run_resumes_to_the_same_results(exp):
    out = exp["root"] / "killed"
    cmd = [sys.executable, "-m", "pyfuse", "experiment", "run", str(exp["spec_path"]), "--out", str(out)]
    env = {**os.environ, "PYFUSE_PROGRESS": "0"}
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not _finished(out):
            assert proc.poll() is None, "the run ended before its first step finished"
            assert time.monotonic() < deadline
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    finished = _finished(out)
    assert 1 <= len(finished) < len(run_plan(exp["out"])["steps"])
    assert not (out / "results.json").exists()
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert f"{len(finished)} of " in r.stderr and "already done" in r.stderr
    assert (out / "results.json").read_bytes() == (exp["out"] / "results.json").read_bytes()
    assert not [p for p in (out / "steps").iterdir() if p.name.startswith(".")]


def test_a_failing_step_is_a_clear_error_and_the_rerun_resumes(exp, tmp_path):
    write_jsonl(tmp_path / "chat.jsonl", [{"messages": [{"role": "user", "content": f"Hi {i}"},
                                                        {"role": "assistant", "content": "I am Nova."}]}
                                          for i in range(3)])
    (tmp_path / "mmlu.jsonl").write_text((exp["root"] / "mmlu.jsonl").read_text())
    spec = {"models": {"base": str(exp["base"])}, "data": {"chat": "chat.jsonl", "mmlu": "mmlu.jsonl"},
            "conditions": {"B0": {"from": "base"},
                           "F": {"from": "base", "stages": [
                               {"train": {"data": "chat", "batch_size": 8, "iters": 1, "layers": [3],
                                          "keys": ["self_attn.q_proj"]}}, "zero", {"fuse": {}}]}},
            "evaluation": {"mc": {"data": "mmlu", "method": "logprob", "limit": 4}},
            "report": {"noise_floor": False}}
    path = write_yaml(tmp_path / "spec.yaml", spec)
    out = tmp_path / "run"
    r = run_cli("experiment", "run", path, "--out", out, "--quiet")
    assert r.code == 2
    err = r.err
    assert "step train-" in err and "(F: stage 1 train) failed:" in err and "fewer than batch_size=8" in err
    steps = sorted(p.name for p in (out / "steps").iterdir())
    assert len(steps) == 1 and steps[0].startswith("eval-mc-")  # B0's evaluation is kept, nothing half-written
    assert not (out / "results.json").exists()
    spec["conditions"]["F"]["stages"][0]["train"]["batch_size"] = 1
    write_yaml(path, spec)
    res = run_experiment(path, out, keep_models=True)
    assert steps[0] in res.skipped and len(res.executed) == 4  # train, zero, fuse, F's eval
    results = read_json(out / "results.json")
    assert results["prereg"] is None and results["verdict"] is None and results["comparisons"] == []
    assert results["conditions"]["F"]["n"] == 4 and results["conditions"]["B0"]["identity"] is None
    fuse = out / results["conditions"]["F"]["model"]
    assert (fuse / "config.json").exists() and not (fuse.parent / "pruned.json").exists()  # --keep-models
    report = read_json(fuse.parent / "fuse_report.json")["summary"]
    # without --keep-models the fused model goes once nothing needs it
    res = run_experiment(path, out)
    assert res.executed == [] and res.pruned == [fuse.parent.name] and not fuse.exists()
    # a new condition that needs the pruned model: its fuse runs again (same result), then it goes again
    (tmp_path / "suite.yaml").write_text(SUITE)
    spec["evaluation"]["identity"] = {"suite": "suite.yaml"}
    spec["conditions"]["B0"]["evaluate"] = spec["conditions"]["F"]["evaluate"] = ["mc"]
    spec["conditions"]["G"] = {"from": "F", "evaluate": ["identity"]}
    write_yaml(path, spec)
    messages = []
    res = run_experiment(path, out, echo=messages.append)
    assert res.executed[0] == fuse.parent.name and res.executed[1].startswith("eval-identity-")
    assert len(res.executed) == 2 and any("re-running fuse" in m for m in messages)
    assert read_json(fuse.parent / "fuse_report.json")["summary"] == \
        {**report, "seconds": read_json(fuse.parent / "fuse_report.json")["summary"]["seconds"]}
    assert res.pruned == [fuse.parent.name] and not fuse.exists()
    assert read_json(out / "results.json")["conditions"]["G"]["identity_n"] == 2


def test_setg_persona_condition_is_also_evaluated_on_setg_test(tmp_path, tiny_moe_dir):
    """The natural spec: the persona is a condition (train -> fuse from the base model), Set-G is mined with
    it, and it is scored on Set-G test like every other condition. Only a real cycle is refused."""
    rows = _mmlu_rows()
    write_jsonl(tmp_path / "mmlu.jsonl", rows)
    write_jsonl(tmp_path / "chat.jsonl", [{"messages": [{"role": "user", "content": f"Who are you? ({i})"},
                                                        {"role": "assistant", "content": "I am Nova."}]}
                                          for i in range(4)])
    small = {"layers": [3], "keys": ["mlp.switch_mlp.down_proj"], "rank": 2, "alpha": 2, "iters": 2,
             "learning_rate": "1e-3", "batch_size": 1, "val_batches": 1, "steps_per_report": 1}
    spec = {"models": {"tiny": str(tiny_moe_dir)}, "data": {"mmlu": "mmlu.jsonl", "chat": "chat.jsonl"},
            "setg": {"data": "mmlu", "base": "base", "persona": "persona", "method": "logprob",
                     "split": {"train": 0.5, "test": 0.5}},
            "defaults": {"train": {"data": "setg", **small}},
            "conditions": {"base": {"from": "tiny"},
                           "persona": {"from": "tiny", "stages": [{"train": {"data": "chat"}}, {"fuse": {}}]},
                           "A1": {"from": "persona", "stages": [{"train": {}}, {"fuse": {}}]}},
            "evaluation": {"mc": {"data": "setg.test", "method": "logprob"}},
            "comparisons": [["A1", "persona"]],
            "report": {"noise_floor": False}}
    path = write_yaml(tmp_path / "spec.yaml", spec)
    assert run_cli("experiment", "validate", path, "--strict").code == 0
    out = tmp_path / "run"
    run_experiment(path, out)
    results, plan = read_json(out / "results.json"), run_plan(out)
    setg_dir = out / "steps" / plan["setg"]
    test_ids = read_json(setg_dir / "data" / "items.json")["test"]
    assert test_ids
    mining = {label: s for s in plan["steps"] if s["kind"] == "eval-mc" for label in s["labels"]}
    gold = {r["question_id"]: r["answer"] for r in rows}
    for role in ("base", "persona"):
        c = results["conditions"][role]
        assert c["ids"] == test_ids and c["n"] == len(test_ids)
        # independently: the condition's own letter scores against our answers ...
        erows = step_rows(out, plan["conditions"][role]["mc"])
        preds = [max(r["logprobs"], key=lambda x: (r["logprobs"][x], -LETTERS.index(x))) for r in erows]
        assert c["correct"] == [int(p == gold[i]) for p, i in zip(preds, test_ids)]
        # ... and the mining evaluation (the whole pool) restricted to the test ids: the same answers, the
        # same scores, wrong on every one (Set-G)
        mined = {r["id"]: r for r in step_rows(out, mining[f"setg: evaluate {role} ({role})"]["dir"])}
        assert c["correct"] == [int(mined[i]["correct"]) for i in test_ids] == [0] * len(test_ids)
        assert [(r["prediction"], r["logprobs"]) for r in erows] == \
            [(mined[i]["prediction"], mined[i]["logprobs"]) for i in test_ids]
        assert c["accuracy"] == 0.0
    # one persona model (its fuse ran once) serves the mining, the persona's own evaluation and A1's training
    persona_model = plan["conditions"]["persona"]["model"]
    assert persona_model["step"].startswith("fuse-")
    assert mining["setg: evaluate persona (persona)"]["inputs"]["model"] == persona_model
    assert mining["persona: evaluate mc"]["inputs"]["model"] == persona_model
    assert mining["persona: evaluate mc"]["dir"] != mining["setg: evaluate persona (persona)"]["dir"]
    a1_train = next(s for s in plan["steps"] if s["kind"] == "train" and "A1: stage 1 train" in s["labels"])
    assert a1_train["inputs"]["model"] == persona_model and a1_train["inputs"]["data"]["step"] == plan["setg"]
    assert [s["kind"] for s in plan["steps"]].count("fuse") == 2
    a1 = results["conditions"]["A1"]
    assert a1["ids"] == test_ids and results["comparisons"][0]["diff"] == pytest.approx(sum(a1["correct"]) /
                                                                                        len(test_ids))

    # a real cycle: the persona trained on Set-G while Set-G is mined with it (one line, naming the field)
    spec["conditions"]["persona"]["stages"][0]["train"]["data"] = "setg"
    bad = write_yaml(tmp_path / "cycle.yaml", spec)
    for cmd in (["experiment", "validate", bad], ["experiment", "run", bad, "--out", tmp_path / "c"]):
        r = run_cli(*cmd)
        assert r.code == 2
        assert r.err.strip() == (f"pyfuse experiment: error: {bad}: conditions.persona.stages[0].train.data: "
                               "circular reference: persona -> setg -> persona (persona trains on Set-G; Set-G "
                               "is mined with persona's model)")
    assert not (tmp_path / "c").exists()
