"""The persona recipe's example spec (examples/persona-recipe/recipe.yaml),
reduced (fewer iterations, fewer pairs), run as an experiment on the
embedded default model; then the same steps through the CLI commands
(`pyfuse pairs`, `pyfuse eval persona`, `pyfuse fuse`) on the run's inputs
and models: the pairs, the per-prompt persona rows and the applied fuse must
come out byte-identical."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import yaml

from pyfuse.experiment.runner import run_experiment

from helpers import file_digests, read_json, read_jsonl, run_cli, run_plan

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "persona-recipe"
REDUCED_SFT = {"iters": 8, "steps_per_eval": 4, "steps_per_report": 4, "save_every": 4,
               "lr_schedule": {"name": "cosine_decay", "arguments": [2.0e-3, 8, 2.0e-5], "warmup": 2}}


def _make_data(out: Path, cache: Path) -> None:
    spec = importlib.util.spec_from_file_location("persona_make_data", EXAMPLE / "make_data.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.main(["--out", str(out), "--cache", str(cache)]) == 0


def _reduced(path: Path) -> dict:
    spec = yaml.safe_load(path.read_text())
    spec["pairs"]["pairs"].update(limit=6, max_tokens=12)
    conds = spec["conditions"]
    for name in ("sft-adapter", "sft"):
        conds[name]["stages"][0]["train"].update(REDUCED_SFT)
    for name in ("dpo-adapter", "dpo"):
        conds[name]["stages"][0]["train"].update(iters=4, steps_per_eval=2, steps_per_report=2)
    return spec


def test_reduced_recipe_matches_the_cli(tmp_path, default_model_cache):
    _make_data(tmp_path, default_model_cache)
    spec_path = tmp_path / "recipe.yaml"
    spec_path.write_text(yaml.safe_dump(_reduced(spec_path), sort_keys=False))
    assert run_cli("experiment", "validate", spec_path, "--strict").code == 0
    out = tmp_path / "run"
    run_experiment(spec_path, out, keep_models=True)
    plan, results = run_plan(out), read_json(out / "results.json")
    steps = out / "steps"

    # the pairs step is `pyfuse pairs` on the same model and data
    cli_pairs = tmp_path / "cli-pairs"
    r = run_cli("pairs", "--model", tmp_path / "model", "--data", tmp_path / "persona", "--out", cli_pairs,
                "--max-tokens", 12, "--limit", 6)
    assert r.code == 0, r.err
    assert file_digests(steps / plan["pairs"]["pairs"] / "data") == file_digests(cli_pairs)
    made = results["pairs"]["pairs"]
    assert sum(made["written"].values()) + made["identical"] == 12  # the first 6 rows of train and of valid
    dpo_train = next(s for s in plan["steps"] if s["kind"] == "train" and s["options"].get("train_mode") == "dpo")
    assert dpo_train["inputs"]["data"] == {"step": plan["pairs"]["pairs"], "out": "data"}

    # every condition's persona rows are `pyfuse eval persona --out`'s bytes
    assert plan["condition_order"] == ["base", "sft-adapter", "sft", "dpo-adapter", "dpo", "dpo-on-base"]
    for name, c in results["conditions"].items():
        args = ["eval", "persona", "--model", out / c["model"] if c["model"].startswith("steps/") else c["model"],
                "--suite", tmp_path / "suite.yaml", "--out", tmp_path / f"{name}.jsonl"]
        if c["adapter"]:
            args += ["--adapter-path", out / c["adapter"]]
        r = run_cli(*args)
        assert r.code == 0, r.err
        step_rows = steps / plan["conditions"][name]["persona"] / "rows.jsonl"
        assert step_rows.read_bytes() == (tmp_path / f"{name}.jsonl").read_bytes(), name
        assert c["persona"]["rows"] == read_jsonl(step_rows)
        assert c["persona"]["passed"] == sum(row["passes"] for row in c["persona"]["rows"])

    # the applied adapter: the DPO adapter fused into the base, as `pyfuse fuse` does it
    moved = plan["conditions"]["dpo-on-base"]
    assert moved["stages"][0]["kind"] == "apply"
    cli_fused = tmp_path / "cli-fused"
    r = run_cli("fuse", "--model", tmp_path / "model", "--adapter-path", steps / dpo_train["dir"] / "adapter",
                "--save-path", cli_fused, "--quiet")
    assert r.code == 0, r.err
    step_model = steps / moved["fuses"][0]["fuse"] / "model"
    mine = {k: v for k, v in file_digests(step_model).items() if k.endswith(".safetensors")}
    assert mine and mine == {k: v for k, v in file_digests(cli_fused).items() if k.endswith(".safetensors")}

    # resumable: a second run reuses every step and writes the same results
    first = (out / "results.json").read_bytes()
    again = run_experiment(spec_path, out, keep_models=True)
    assert again.executed == [] and (out / "results.json").read_bytes() == first

    report = (out / "report.md").read_text()
    assert "## Persona check" in report and "| dpo-on-base |" in report and "## DPO pairs" in report
