"""Specs for the persona recipe: the persona check as an evaluation, DPO
pairs built by a step, an adapter applied to another base (plan level and
one-line errors; tests/e2e/test_persona_recipe_spec.py runs one)."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import run_cli, write_jsonl, write_yaml

from pyfuse.experiment import build_plan
from pyfuse.experiment.load import load_checked_spec, spec_from_dict
from pyfuse.experiment.spec import SpecError

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture()
def recipe_spec(tmp_path, tiny_moe_dir):
    rows = [{"messages": [{"role": "user", "content": f"Deploy failed ({i})"},
                          {"role": "assistant", "content": "Show me the logs."}]} for i in range(3)]
    write_jsonl(tmp_path / "persona" / "train.jsonl", rows)
    write_jsonl(tmp_path / "persona" / "valid.jsonl", rows)
    return {
        "models": {"base": str(tiny_moe_dir)},
        "data": {"persona": str(tmp_path / "persona")},
        "pairs": {"pp": {"data": "persona", "model": "base", "max_tokens": 8}},
        "defaults": {"train": {"iters": 2, "rank": 2}},
        "evaluation": {"persona": {}},
        "conditions": {
            "plain": {"from": "base"},
            "sft": {"from": "base", "stages": [{"train": {"data": "persona"}}, "fuse"]},
            "dpo-adapter": {"from": "sft", "stages": [{"train": {"data": "pp", "train_mode": "dpo"}}]},
            "moved": {"from": "base", "stages": [{"apply": {"condition": "dpo-adapter"}}, "fuse"]},
        },
    }


def test_plan_chains_pairs_apply_and_persona_checks(recipe_spec):
    plan = build_plan(spec_from_dict(recipe_spec), None)
    pairs = [s for s in plan.ordered() if s.kind == "pairs"]
    assert len(pairs) == 1 and plan.pairs["pp"] is pairs[0]
    assert pairs[0].options == {"batch_size": 8, "max_tokens": 8, "limit": None}
    assert pairs[0].inputs["model"].source == Path(recipe_spec["models"]["base"]).resolve()
    dpo_train = plan.conditions["dpo-adapter"].stages[0]
    dpo_step = plan.steps[next(k for k, s in plan.steps.items() if s.dirname == dpo_train["step"])]
    assert dpo_step.inputs["data"].step is pairs[0] and dpo_step.inputs["data"].sub == "data"
    assert dpo_step.inputs["model"] is plan.conditions["sft"].model  # DPO on the fused SFT model
    moved = plan.conditions["moved"]
    assert moved.fuses[0].fuse.inputs["adapter"].step is dpo_step  # the DPO adapter, fused into the base
    assert moved.fuses[0].fuse.inputs["model"] is plan.conditions["plain"].model
    assert moved.stages[0]["kind"] == "apply"
    persona = {n: c.persona for n, c in plan.conditions.items()}
    assert all(st is not None and st.kind == "eval-persona" for st in persona.values())
    assert "adapter" in persona["dpo-adapter"].inputs and "adapter" not in persona["sft"].inputs
    assert "builtin_suite" in persona["plain"].options and "suite" not in persona["plain"].inputs
    doc = plan.to_json()
    assert doc["pairs"] == {"pp": pairs[0].dirname}
    assert doc["conditions"]["moved"]["persona"] == persona["moved"].dirname


def test_pairs_options_reach_the_dpo_step_keys(recipe_spec):
    """Hash-locked: other pairs give another DPO training (and everything after it), not the SFT."""
    before = build_plan(spec_from_dict(recipe_spec), None)
    recipe_spec["pairs"]["pp"]["max_tokens"] = 9
    after = build_plan(spec_from_dict(recipe_spec), None)
    assert before.conditions["sft"].model.step.key == after.conditions["sft"].model.step.key
    for name in ("dpo-adapter", "moved"):
        assert before.conditions[name].persona.key != after.conditions[name].persona.key


def _set(path: str, value):
    def change(spec):
        *head, last = path.split("/")
        node = spec
        for k in head:
            node = node[int(k)] if isinstance(node, list) else node[k]
        node[last] = value
    return change


BAD = [
    (_set("pairs/pp/data", "nope"), "pairs.pp.data: unknown data 'nope' (known: persona)"),
    (_set("pairs/pp/model", "nobody"), "pairs.pp.model: unknown model or condition 'nobody'"),
    (_set("pairs/persona", {"data": "persona", "model": "base"}),
     "pairs.persona: 'persona' is also a data name; the pairs need their own name"),
    (_set("pairs/pp/temperature", 1), "pairs.pp.temperature: unknown field (known: data, model, batch_size,"),
    (_set("conditions/dpo-adapter/stages", [{"train": {"data": "pq"}}]),
     "conditions.dpo-adapter.stages[0].train.data: unknown data 'pq' (known: persona, pp, setg)"),
    (_set("conditions/moved/stages", [{"apply": {"condition": "sft", "adapter": "x"}}]),
     "conditions.moved.stages[0].apply: give exactly one of condition"),
    (_set("conditions/moved/stages", ["apply"]), "conditions.moved.stages[0].apply: give exactly one of"),
    (_set("conditions/moved/stages", [{"apply": {"condition": "ghost"}}]),
     "conditions.moved.stages[0].apply.condition: unknown condition 'ghost'"),
    (_set("conditions/moved/stages", [{"apply": {"condition": "moved"}}]),
     "conditions.moved.stages[0].apply.condition: a condition cannot apply its own adapter"),
    (_set("conditions/moved/stages", [{"apply": {"condition": "plain"}}]),
     "conditions.moved.stages[0].apply.condition: condition 'plain' has no train or apply stage"),
    (_set("conditions/moved/stages", [{"train": {"data": "persona"}}, {"apply": {"condition": "sft"}}]),
     "conditions.moved.stages[1].apply: the previous stage's adapter is not fused yet"),
    (_set("conditions/plain/evaluate", ["persona", "identity"]),
     "conditions.plain.evaluate[1]: no evaluation.identity is defined"),
    (_set("evaluation/persona", {"suite": "s.yaml", "sutie": 1}),
     "evaluation.persona.sutie: unknown field (known: suite, batch_size)"),
    (_set("pairs/pp/model", "dpo-adapter"),
     "conditions.dpo-adapter.stages[0].train.data: circular reference: dpo-adapter -> pairs pp -> dpo-adapter"),
]


@pytest.mark.parametrize("change, message", BAD, ids=[m[:40] for _, m in BAD])
def test_errors_name_the_field_on_one_line(recipe_spec, change, message):
    change(recipe_spec)
    with pytest.raises(SpecError) as err:
        spec_from_dict(recipe_spec, check_paths=False)
    assert len(str(err.value).splitlines()) == 1, str(err.value)
    assert message in str(err.value), str(err.value)


def _zero_step(plan, name):
    st = next(s for s in plan.conditions[name].stages if s["kind"] == "zero")
    return next(s for s in plan.steps.values() if s.dirname == st["step"])


@pytest.mark.parametrize("source", ["condition", "directory"])
def test_zero_after_applying_a_dora_adapter_gets_the_model(recipe_spec, tmp_path, tiny_moe_dir, source):
    """As after training one: the DoRA zero twin's magnitudes need the model the adapter is applied to
    (zero_adapter refuses a DoRA adapter without it); a LoRA one's step is unchanged; placebo is refused."""
    from pyfuse.adapters.zero import zero_adapter
    from pyfuse.errors import UserError

    from helpers import make_adapter

    if source == "condition":
        recipe_spec["conditions"]["dpo-adapter"]["stages"][0]["train"]["fine_tune_type"] = "dora"
        apply = {"condition": "dpo-adapter"}
    else:
        dora_dir = make_adapter(tiny_moe_dir, tmp_path / "dora", keys=["self_attn.q_proj"], dora=True)
        with pytest.raises(UserError, match="DoRA adapter"):
            zero_adapter(dora_dir, tmp_path / "twin")  # the input the plan must not leave out
        apply = {"adapter": str(dora_dir)}
    recipe_spec["conditions"]["moved"]["stages"] = [{"apply": apply}, "zero", "fuse"]
    zero = _zero_step(build_plan(spec_from_dict(recipe_spec), None), "moved")
    assert zero.options == {"dora": True}
    assert zero.inputs["model"].source == Path(recipe_spec["models"]["base"]).resolve()
    recipe_spec["conditions"]["moved"]["stages"] = [{"apply": apply}, "placebo", "fuse"]
    with pytest.raises(SpecError, match=r"conditions\.moved\.stages\[1\]\.placebo: placebo adapters are defined "
                                        "for LoRA"):
        spec_from_dict(recipe_spec)


def test_zero_after_applying_a_lora_adapter_needs_no_model(recipe_spec):
    recipe_spec["conditions"]["moved"]["stages"] = [{"apply": {"condition": "dpo-adapter"}}, "zero", "fuse"]
    zero = _zero_step(build_plan(spec_from_dict(recipe_spec), None), "moved")
    assert zero.options == {"dora": False} and "model" not in zero.inputs


def test_missing_and_bad_persona_suite(recipe_spec, tmp_path):
    recipe_spec["evaluation"]["persona"] = {"suite": str(tmp_path / "none.yaml")}
    with pytest.raises(SpecError, match=r"^spec: evaluation.persona.suite: persona suite does not exist: "):
        spec_from_dict(recipe_spec)
    (tmp_path / "none.yaml").write_text("prompts: []\n")
    path = write_yaml(tmp_path / "spec.yaml", recipe_spec)
    with pytest.raises(SpecError, match="evaluation.persona.suite: persona suite: prompts must be a non-empty"):
        load_checked_spec(path)


def test_applied_adapter_directory_must_fit(recipe_spec, tmp_path, moe_adapter, tiny_llama_dir):
    recipe_spec["conditions"]["moved"]["stages"][0] = {"apply": {"adapter": str(moe_adapter)}}
    path = write_yaml(tmp_path / "spec.yaml", recipe_spec)
    load_checked_spec(path)  # onto the model it was made for: fine
    recipe_spec["models"]["llama"] = str(tiny_llama_dir)
    recipe_spec["conditions"]["moved"]["from"] = "llama"
    write_yaml(path, recipe_spec)
    with pytest.raises(SpecError) as err:
        load_checked_spec(path)
    text = str(err.value)
    assert len(text.splitlines()) == 1, text
    assert "conditions.moved.stages[0].apply.adapter: does not fit 'llama': adapter does not fit the model" in text
    recipe_spec["conditions"]["moved"]["stages"][0] = {"apply": {"adapter": str(tmp_path / "gone")}}
    with pytest.raises(SpecError, match=r"conditions\.moved\.stages\[0\]\.apply\.adapter: adapter directory does not"):
        spec_from_dict(recipe_spec)


def test_applied_condition_adapter_must_have_the_shapes(recipe_spec, tmp_path, tiny_llama_dir):
    recipe_spec["models"]["llama"] = str(tiny_llama_dir)
    recipe_spec["conditions"]["moved"]["from"] = "llama"
    path = write_yaml(tmp_path / "spec.yaml", recipe_spec)
    with pytest.raises(SpecError) as err:
        load_checked_spec(path)
    text = str(err.value)
    assert len(text.splitlines()) == 1, text
    assert ("conditions.moved.stages[0].apply.condition: the adapter of 'dpo-adapter' was trained on 'base', which "
            "does not have 'llama''s shapes (model_type 'qwen3_moe' there, 'llama' here)") in text


def test_example_spec_validates():
    r = run_cli("experiment", "validate", REPO / "examples" / "persona-recipe" / "recipe.yaml")
    assert r.code == 0, r.err
    assert "6 conditions" in r.out
