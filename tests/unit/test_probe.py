"""pyfuse.probes and ``pyfuse probe`` against an unbatched walk through the
model's own blocks (no taps, no padding) and dense NumPy deltas."""

from __future__ import annotations

import json

import mlx.core as mx
import numpy as np
import pytest
from helpers import DOWN, make_adapter, run_cli, write_yaml

from pyfuse.io.adapter_dir import read_adapter
from pyfuse.lm.chat import chat_prompt
from pyfuse.lm.load import load_for_inference
from pyfuse.probes.compare import READERS, WRITERS, delta_alignment
from pyfuse.probes.hidden import PromptSet, blocks, probe_sets

SUITE = {"prompts": [{"text": "Hello there, who are you?", "group": "villain", "system_prompt": "You are a villain."},
                     {"text": "Plans?", "group": "villain", "system_prompt": "You are a villain."},
                     {"text": "What do you think of the sea and its long waves?", "group": "villain",
                      "system_prompt": "You are a villain."},
                     {"text": "Hi", "group": "helper"}, {"text": "Tell me about bread.", "group": "helper"}],
         "behaviours": {"m": {"marker": "x"}}}


def _oracle(model, prompts, pool):
    """Per prompt, the states the model's blocks see, one block at a time, and the router's top-k picks."""
    from mlx_lm.models.base import create_attention_mask

    inner = model.model
    sums, routes = None, np.zeros((len(inner.layers), inner.layers[0].mlp.gate.weight.shape[0]))
    for p in prompts:
        h = inner.embed_tokens(mx.array([p]))
        mask = create_attention_mask(h, None)
        states = []
        for i, layer in enumerate(inner.layers):
            states.append(h[0])
            x = layer.post_attention_layernorm(h + layer.self_attn(layer.input_layernorm(h), mask, None))
            gates = np.asarray(mx.softmax(layer.mlp.gate(x).astype(mx.float32), axis=-1))[0]
            for row in gates:
                routes[i, np.argsort(-row, kind="stable")[:layer.mlp.top_k]] += 1
            h = layer(h, mask, None)
        states.append(h[0])
        v = np.stack([np.asarray(s.astype(mx.float32), np.float64) for s in states])  # [L+1, T, H]
        v = v[:, -1] if pool == "last" else v.mean(axis=1)
        sums = v if sums is None else sums + v
    return sums / len(prompts), routes / routes.sum(axis=1, keepdims=True)


@pytest.mark.parametrize("pool", ["last", "mean"])
def test_batched_taps_match_an_unbatched_walk(tiny_moe_dir, pool):
    lm = load_for_inference(str(tiny_moe_dir))
    texts = ["Hi", "Tell me about the sea and its long waves.", "Who are you?", "A", "What is bread made of?"]
    prompts = [chat_prompt(lm.tokenizer, t, system_prompt="You are a villain.") for t in texts]
    classes = [type(b) for b in blocks(lm.model)]
    mlps = [b.mlp for b in blocks(lm.model)]
    st = probe_sets(lm.model, [PromptSet("s", prompts)], pool=pool, batch_size=2)["s"]
    cent, share = _oracle(lm.model, prompts, pool)
    assert st.n == 5 and st.centroids.shape == cent.shape
    np.testing.assert_allclose(st.centroids, cent, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(st.routing_share, share, atol=1e-12)
    # the taps are gone: the model runs its own blocks again
    assert [type(b) for b in blocks(lm.model)] == classes
    assert [b.mlp for b in blocks(lm.model)] == mlps and type(lm.model.model.norm).__name__ == "RMSNorm"


def test_alignment_matches_dense_deltas(tmp_path, tiny_moe_dir):
    adapter = read_adapter(make_adapter(tiny_moe_dir, tmp_path / "a", keys=[DOWN, "self_attn.q_proj",
                                                                              "self_attn.o_proj"], seed=3))
    rng = np.random.default_rng(0)
    cent = rng.normal(size=(5, 64))
    rows = {r["module"]: r for r in delta_alignment(adapter, cent)}
    for path, mod in adapter.modules.items():
        a = np.asarray(mod.lora_a.astype(mx.float32), np.float64)
        b = np.asarray(mod.lora_b.astype(mx.float32), np.float64)
        dense = adapter.scale * (np.einsum("eor,eri->eoi", b, a) if a.ndim == 3 else (b.T @ a.T)[None])
        layer, leaf = int(path.split(".")[2]), path.rsplit(".", 1)[-1]
        r = rows[path]
        assert r["norm"] == pytest.approx(np.linalg.norm(dense), rel=1e-6)
        u_in, u_out = cent[layer] / np.linalg.norm(cent[layer]), cent[layer + 1] / np.linalg.norm(cent[layer + 1])
        if leaf in READERS:
            assert r["read"] == pytest.approx(np.linalg.norm(dense @ u_in) / np.linalg.norm(dense), rel=1e-6)
        else:
            assert r["read"] is None
        if leaf in WRITERS:
            assert r["write"] == pytest.approx(np.linalg.norm(np.einsum("o,eoi->ei", u_out, dense))
                                               / np.linalg.norm(dense), rel=1e-6)
        else:
            assert r["write"] is None


def test_cli_two_models_shifts_and_plots(tmp_path, tiny_moe_dir, moe_pyfuse, moe_adapter):
    suite = write_yaml(tmp_path / "suite.yaml", SUITE)
    run = run_cli("probe", "--model", tiny_moe_dir, "--model", moe_pyfuse, "--prompts", suite, "--adapter-path",
                  moe_adapter, "--out", tmp_path / "out", "--centroids", "--batch-size", "2")
    assert run.code == 0, run.err
    assert "villain" in run.out and "routing TV" in run.out
    data = json.loads((tmp_path / "out" / "probe.json").read_text())
    assert data["sets"] == ["villain", "helper"] and data["n"][data["models"][0]] == {"villain": 3, "helper": 2}
    for sh in data["shifts"]:
        c = np.array(data["centroids"][sh["model"]][sh["set"]])
        c0 = np.array(data["centroids"][sh["reference"]][sh["set"]])
        np.testing.assert_allclose(sh["distance"], np.linalg.norm(c - c0, axis=1), rtol=1e-9)
        np.testing.assert_allclose(sh["cosine"], np.sum(c * c0, 1) / np.linalg.norm(c, axis=1)
                                   / np.linalg.norm(c0, axis=1), rtol=1e-9)
        r, r0 = (np.array(data["routing"][m][sh["set"]]) for m in (sh["model"], sh["reference"]))
        np.testing.assert_allclose(sh["routing_tv"], 0.5 * np.abs(r - r0).sum(axis=1), atol=1e-12)
        assert sh["distance"][0] == 0  # the embeddings are not fused
    assert (tmp_path / "out" / "centroid_shift.png").is_file() and (tmp_path / "out" / "routing_shift.png").is_file()
    assert {a["set"] for a in data["alignment"]} == {"villain", "helper"}


def test_cli_errors(tmp_path, tiny_moe_dir):
    (tmp_path / "empty.txt").write_text("\n")
    bad = run_cli("probe", "--model", tiny_moe_dir, "--prompts", tmp_path / "empty.txt")
    assert bad.code == 2 and "no prompts" in bad.err
    bad = run_cli("probe", "--model", tmp_path / "nope", "--prompts", tmp_path / "empty.txt")
    assert bad.code == 2 and "Traceback" not in bad.err
