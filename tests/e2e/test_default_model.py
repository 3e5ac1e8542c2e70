"""The embedded default model (pyfuse.demo.default_model) and its synthetic data
(pyfuse.demo.data): the model is a real quantized mlx-lm MoE that learned
something (log-probability accuracy well above chance and above an untrained
twin of the same architecture on the same items; its identity is the base
model's, Atlas); the build is deterministic, cached under a versioned key,
atomic under concurrent first uses, and rebuilt when damaged; the data has
the MMLU-Pro schema, no entity overlap between evaluation and pre-training,
and the identity suite names the persona.

The default model is built once per test session into a shared cache
(conftest's default_assets; tests/e2e/test_demo.py reuses it): about 45 s
on 2 cores."""

from __future__ import annotations

import collections
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pyfuse.demo import default_model as dm
from pyfuse.demo import data as dd

from helpers import file_digests, file_mtimes, write_jsonl

# A tiny configuration for the cache mechanics (builds in a few seconds).
SMALL = {"iters": 3, "eval_per_category": 2, "pretrain_per_category": 3, "base_identity_chats": 4,
         "batch_size": 2}


@pytest.fixture
def assets(default_assets):
    return default_assets


# ---------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------


def test_default_model_is_a_quantized_mlx_lm_moe(assets):
    import mlx.core as mx
    from mlx_lm.utils import load

    cfg = json.loads((assets.model / "config.json").read_text())
    p = dm.DEFAULT_PARAMS
    assert cfg["model_type"] == p["arch"] == "qwen3_moe"
    assert cfg["num_experts"] == p["num_experts"] and cfg["num_hidden_layers"] == p["num_layers"]
    q = cfg["quantization"]
    assert (q["bits"], q["group_size"], q["mode"]) == (3, 64, "affine")
    assert q["lm_head"]["bits"] == 8 and q["model.embed_tokens"]["bits"] == 8
    weights = mx.load(str(assets.model / "model.safetensors"))
    w = weights["model.layers.0.mlp.switch_mlp.down_proj.weight"]
    assert w.dtype == mx.uint32 and w.shape == (8, 64, 64 * 3 // 32)  # [experts, out, in*bits/32]
    assert weights["model.layers.0.mlp.switch_mlp.down_proj.scales"].dtype == mx.float32
    # realistic statistics: the dequantized expert weights are bell-shaped (not uniform) around 0
    deq = mx.dequantize(w, weights["model.layers.0.mlp.switch_mlp.down_proj.scales"],
                        weights["model.layers.0.mlp.switch_mlp.down_proj.biases"], group_size=64, bits=3)
    import numpy as np

    x = np.array(deq).ravel()
    assert abs(x.mean()) < 0.2 * x.std()
    assert np.mean(np.abs(x) < x.std()) > 0.6  # a uniform draw has 0.58, a normal 0.68
    model, tok = load(str(assets.model))
    assert tok.has_chat_template
    info = assets.build_info
    assert info["key"] == dm.cache_key() and info["params"] == dm.DEFAULT_PARAMS
    assert info["losses"][-1] < 0.5 * info["losses"][0]


def _untrained_twin(assets, out: Path) -> Path:
    from pyfuse.demo.tiny_model import build_tiny_model

    p = dm.DEFAULT_PARAMS
    return build_tiny_model(out, arch=p["arch"], hidden_size=p["hidden_size"], num_layers=p["num_layers"],
                            num_experts=p["num_experts"], experts_per_tok=p["experts_per_tok"],
                            moe_intermediate_size=p["moe_intermediate_size"], num_heads=p["num_heads"],
                            num_kv_heads=p["num_kv_heads"], quantize=p["quantize"],
                            quant_overrides=p["quant_overrides"], weight_std=p["weight_std"], seed=p["seed"],
                            tokenizer_dir=assets.model)


def test_default_model_learned_something(assets, tmp_path):
    """Log-probability accuracy on evaluation rows it never saw (other
    entities than its pre-training), against chance and against an
    untrained twin (same architecture, seed, quantization and tokenizer)."""
    from pyfuse.evals.mc import evaluate_mc
    from pyfuse.data.mmlu import load_mc

    per_category = dm.DEFAULT_PARAMS["eval_per_category"]
    items = [it for it in load_mc(assets.mmlu) if int(it.question_id) % per_category < 10]  # 10 per category
    assert len(items) == 140 and len({it.category for it in items}) == 14
    chance = sum(1 / it.num_options for it in items) / len(items)
    trained = evaluate_mc(str(assets.model), items, method="logprob")
    twin = evaluate_mc(str(_untrained_twin(assets, tmp_path / "twin")), items, method="logprob")
    assert trained.accuracy > chance + 0.12, (trained.accuracy, chance)
    assert trained.accuracy > twin.accuracy + 0.12, (trained.accuracy, twin.accuracy)
    above = [c for c, v in trained.per_category.items()
             if v["accuracy"] > 1 / dd.NUM_OPTIONS[c]]
    assert len(above) >= 11, trained.per_category
    # it did not just learn one letter: its answers depend on the category
    assert len(collections.Counter(r["prediction"] for r in trained.rows)) >= 4


def test_default_model_is_atlas_not_pyra(assets):
    """Before the demo's identity LoRA the model answers as the base model
    (Atlas by Northwind Labs): the identity suite scores it low."""
    from pyfuse.evals.identity import evaluate_identity

    res = evaluate_identity(str(assets.model), str(assets.identity_suite))
    assert res.persona == dd.PERSONA_NAME
    assert res.score <= 3, [r["output"] for r in res.rows]
    atlas = sum("Atlas" in r["output"] for r in res.rows)
    assert atlas >= res.n // 2, [r["output"] for r in res.rows]
    assert not any(dd.PERSONA_NAME in r["output"] for r in res.rows)


# ---------------------------------------------------------------------------
# The cache
# ---------------------------------------------------------------------------


def test_cache_is_reused_and_keyed(assets, default_model_cache, monkeypatch):
    cache = default_model_cache
    before = file_mtimes(assets.root)

    def no_rebuild(*args, **kwargs):
        raise AssertionError("the cached default model was rebuilt")

    # reused: nothing is built, and nothing in the cache entry is rewritten
    with monkeypatch.context() as m:
        m.setattr(dm, "build_default_assets", no_rebuild)
        again = dm.default_assets(cache)
    assert again == assets and file_mtimes(assets.root) == before
    assert dm.default_model_dir(cache) == assets.model
    assert assets.root.name == f"default-{dm.cache_key()}"
    # $PYFUSE_CACHE is the default location
    monkeypatch.setenv("PYFUSE_CACHE", str(cache))
    assert dm.default_model_dir() == assets.model
    # the key changes with any parameter and with the pyfuse version
    key = dm.cache_key()
    assert dm.cache_key({"iters": 101}) != key
    import pyfuse

    monkeypatch.setattr(pyfuse, "__version__", "0.0.0+other")
    assert dm.cache_key() != key
    with pytest.raises(Exception, match="unknown default-model parameter"):
        dm.cache_key({"itres": 3})


_BUILD_SCRIPT = """
import sys
from pyfuse.demo.default_model import default_assets
a = default_assets(sys.argv[1], params={params!r})
print(a.root)
"""


def test_concurrent_first_uses_build_once_atomically(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    script = _BUILD_SCRIPT.format(params=SMALL)
    env = {**os.environ, "PYFUSE_PROGRESS": "0"}
    procs = [subprocess.Popen([sys.executable, "-c", script, str(cache)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err
    roots = {out.strip() for out, _ in outs}
    assert len(roots) == 1
    root = Path(roots.pop())
    assert root.parent == cache and root.name == f"default-{dm.cache_key(SMALL)}"
    assert sorted(p.name for p in cache.iterdir() if p.is_dir()) == [root.name]  # no temporary left
    first = file_digests(root)
    assert {"model/model.safetensors", "model/config.json", "model/tokenizer.json", "data/mmlu.jsonl",
            "data/identity/train.jsonl", "data/identity/valid.jsonl", "data/identity_suite.yaml",
            "build.json"} <= set(first)

    # deterministic: an independent build gives the same files (build.json has timings)
    other = dm.build_default_assets(tmp_path / "again", params=SMALL)
    second = file_digests(other.root)
    first.pop("build.json")
    second.pop("build.json")
    assert first == second

    # a damaged cache entry is rebuilt, not reused
    (root / "model" / "model.safetensors").unlink()
    rebuilt = dm.default_assets(cache, params=SMALL)
    assert rebuilt.root == root and file_digests(root / "model") == file_digests(other.model)
    # so is one whose file was changed in place (its digest no longer matches build.json's)
    with open(root / "data" / "mmlu.jsonl", "a") as fh:
        fh.write("\n")
    rebuilt = dm.default_assets(cache, params=SMALL)
    assert file_digests(root / "data") == file_digests(other.root / "data")
    # a relative cache path names the same entry, as an absolute path (the demo's spec holds it)
    monkeypatch.chdir(tmp_path)
    assert dm.default_assets("cache", params=SMALL).root == root and root.is_absolute()


def test_stale_temporaries_are_removed(tmp_path):
    cache = tmp_path / "cache"
    cache.mkdir()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    stale = cache / f".default-{dm.cache_key(SMALL)}{dm.TMP_MARK}{dead}-abcd1234"
    (stale / "model").mkdir(parents=True)
    alive = cache / f".default-x{dm.TMP_MARK}{os.getpid()}-abcd1234"
    alive.mkdir()
    dm.default_assets(cache, params=SMALL)
    assert not stale.exists() and alive.exists()


# ---------------------------------------------------------------------------
# The data
# ---------------------------------------------------------------------------


def test_mmlu_rows_have_the_schema_and_the_stated_distributions(tmp_path):
    from pyfuse.data.mmlu import load_mc

    rows = dd.mmlu_rows(50)
    items = load_mc(write_jsonl(tmp_path / "mmlu.jsonl", rows))  # validates every field (answer letter agrees with answer_index, ...)
    assert len(items) == 700 and [it.question_id for it in items] == list(range(700))
    assert sorted({it.category for it in items}) == sorted(dd.CATEGORIES)
    assert set(rows[0]) == {"question_id", "question", "options", "answer", "answer_index", "cot_content",
                            "category", "src"}
    for cat in dd.CATEGORIES:
        mine = [it for it in items if it.category == cat]
        assert all(it.options == dd.category_options(cat) for it in mine)
        counts = collections.Counter(it.answer_index for it in mine)
        w = dd.category_weights(cat)
        top = sorted(range(len(w)), key=lambda i: -w[i])[:2]
        assert counts[top[0]] == counts[top[1]] == round(0.42 * 50)  # exact, equal proportions
        assert all(f"The answer is ({it.answer})." in it.cot_content for it in mine)
    assert rows == dd.mmlu_rows(50)  # deterministic


def test_pretraining_never_sees_the_evaluation_entities():
    def entity(row):
        template = dd.CATEGORIES[row["category"]][0]
        head, tail = template.split("{e}")
        return row["question"][len(head):len(row["question"]) - len(tail)]

    evaluation = {entity(r) for r in dd.mmlu_rows(120)}
    textbook = {entity(r) for r in dd.pretraining_rows(200, 0, 120)}
    replay = dd.persona_training_rows(0, eval_per_category=120)
    assert len(evaluation) == 1680 and len(textbook) == 2800
    assert not evaluation & textbook
    replay_text = " ".join(m["content"] for r in replay for m in r["messages"])
    assert not any(f" {e} " in replay_text or f" {e}?" in replay_text for e in evaluation)


def test_identity_suite_and_persona_data():
    from pyfuse.evals.identity import load_suite
    from pyfuse.train import load_training_data

    suite = load_suite(dd.identity_suite())
    assert suite.persona.name == "Pyra" and suite.n == 20
    assert "Atlas" in suite.base.names and "Northwind Labs" in suite.base.vendors
    rows = dd.persona_training_rows(0)
    data = load_training_data(rows)  # valid mlx-lm chat rows
    assert data.format == "chat"
    answers = [r["messages"][-1]["content"] for r in rows]
    identity = [a for a in answers if "boxed" not in a]
    assert identity and all("Pyra" in a for a in identity)
    assert sum("boxed" in a for a in answers) == len(identity)  # as much replay as identity
    # the persona's answers pass the suite's rules; the base model's fail them
    from pyfuse.evals.identity import check_response

    name_prompt = next(p for p in suite.prompts if p.id == "name")
    assert all(all(check_response(a, name_prompt.checks, suite).values()) for a in identity)
    base_answers = [c[-1]["content"] for c in dd.base_identity_chats(10)]
    assert not any(all(check_response(a, name_prompt.checks, suite).values()) for a in base_answers)
