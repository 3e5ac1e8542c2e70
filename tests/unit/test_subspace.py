"""``pyfuse adapters compare`` / pyfuse.analysis.subspace against dense
deltas: scipy.linalg.subspace_angles on the full matrices is the oracle."""

from __future__ import annotations

import json

import mlx.core as mx
import numpy as np
import pytest
from helpers import DOWN, GATE, make_adapter, run_cli, write_adapter_dir
from scipy.linalg import subspace_angles

from pyfuse.analysis.subspace import compare_pair, low_rank
from pyfuse.io.adapter_dir import read_adapter


def _oracle(d1: np.ndarray, d2: np.ndarray) -> tuple[np.ndarray, float]:
    """Principal angles (ascending) of the dense deltas' column spaces and the mean squared cosine."""
    ang = np.sort(subspace_angles(d1, d2))
    return ang, float(np.mean(np.cos(ang) ** 2))


def _dense(a, b, scale):
    return scale * np.asarray(b, np.float64) @ np.asarray(a, np.float64)


@pytest.mark.parametrize("r1,r2", [(4, 4), (2, 6), (8, 3)])
def test_angles_match_scipy_on_dense_deltas(r1, r2):
    rng = np.random.default_rng(r1 * 10 + r2)
    out, inn = 48, 40
    a1, b1 = rng.normal(size=(r1, inn)), rng.normal(size=(out, r1))
    a2 = rng.normal(size=(r2, inn))
    # share two directions so that the angles are neither all 0 nor all ~90 degrees
    b2 = np.concatenate([b1[:, :2] + 0.3 * rng.normal(size=(out, 2)), rng.normal(size=(out, r2 - 2))], 1)[:, :r2]
    st = compare_pair(low_rank(a1, b1, 2.0), low_rank(a2, b2, 0.5))
    d1, d2 = _dense(a1, b1, 2.0), _dense(a2, b2, 0.5)
    ang, ov = _oracle(d1, d2)
    np.testing.assert_allclose(np.radians(st.angles), ang, atol=1e-6)
    assert st.overlap == pytest.approx(ov, abs=1e-9)
    row_ang, row_ov = _oracle(d1.T, d2.T)
    assert st.input_overlap == pytest.approx(row_ov, abs=1e-9)
    assert st.norm_a == pytest.approx(np.linalg.norm(d1), rel=1e-9)
    assert st.norm_b == pytest.approx(np.linalg.norm(d2), rel=1e-9)
    assert st.cosine == pytest.approx(np.sum(d1 * d2) / np.linalg.norm(d1) / np.linalg.norm(d2), abs=1e-9)
    assert st.chance == pytest.approx(max(r1, r2) / out)


def test_chance_is_the_mean_overlap_of_random_subspaces():
    rng = np.random.default_rng(5)
    draws = [compare_pair(low_rank(rng.normal(size=(3, 8)), rng.normal(size=(20, 3)), 1.0),
                          low_rank(rng.normal(size=(5, 8)), rng.normal(size=(20, 5)), 1.0)) for _ in range(400)]
    assert np.mean([d.overlap for d in draws]) == pytest.approx(draws[0].chance, abs=0.02)  # 5 / 20


def test_same_orthogonal_and_rank_deficient():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(4, 32)), rng.normal(size=(32, 4))
    same = compare_pair(low_rank(a, b, 1.0), low_rank(2 * a, b @ rng.normal(size=(4, 4)), 3.0))
    assert same.overlap == pytest.approx(1.0, abs=1e-9)  # the same column space, other factors
    b_top = np.zeros((32, 4))
    b_top[:16] = rng.normal(size=(16, 4))
    b_bottom = np.zeros((32, 4))
    b_bottom[16:] = rng.normal(size=(16, 4))
    orth = compare_pair(low_rank(a, b_top, 1.0), low_rank(a, b_bottom, 1.0))
    assert orth.overlap == pytest.approx(0.0, abs=1e-12)
    assert orth.input_overlap == pytest.approx(1.0, abs=1e-9)
    # rank 2 in a rank-4 factorisation: only its own two directions count
    b_def = np.concatenate([b[:, :2], b[:, :2]], 1)
    lr = low_rank(a, b_def, 1.0)
    assert lr.s.size == np.linalg.matrix_rank(_dense(a, b_def, 1.0)) == 2
    st = compare_pair(lr, low_rank(a, b, 1.0))
    _, ov = _oracle(_dense(a, b_def, 1.0), _dense(a, b, 1.0))
    assert st.overlap == pytest.approx(ov, abs=1e-9) == pytest.approx(1.0, abs=1e-9)
    zero = compare_pair(low_rank(a, np.zeros((32, 4)), 1.0), low_rank(a, b, 1.0))
    assert zero.rank_a == 0 and zero.overlap is None and zero.cosine is None and zero.norm_a == 0


def _mlx_dense(adapter, path) -> np.ndarray:
    """mlx-lm's own delta of one module: LoRALinear ``scale * lora_b.T @ lora_a.T``, LoRASwitchLinear
    per expert ``scale * lora_b[e] @ lora_a[e]``."""
    mod = adapter.modules[path]
    a = np.asarray(mod.lora_a.astype(mx.float32), np.float64)
    b = np.asarray(mod.lora_b.astype(mx.float32), np.float64)
    if a.ndim == 3:
        return adapter.scale * np.einsum("eor,eri->eoi", b, a)
    return adapter.scale * b.T @ a.T


def test_cli_json_matches_dense_oracle_per_module_and_expert(tmp_path, tiny_moe_dir):
    keys = [DOWN, GATE, "self_attn.q_proj"]
    a_dir = make_adapter(tiny_moe_dir, tmp_path / "a", keys=keys, seed=1)
    b_dir = make_adapter(tiny_moe_dir, tmp_path / "b", keys=[DOWN, "self_attn.q_proj", "self_attn.v_proj"],
                         seed=2, rank=2)
    run = run_cli("adapters", "compare", a_dir, b_dir, "--json", "--per-expert")
    assert run.code == 0, run.err
    data = json.loads(run.out)
    ad_a, ad_b = read_adapter(a_dir), read_adapter(b_dir)
    shared = sorted(set(ad_a.modules) & set(ad_b.modules))
    assert sorted(m["path"] for m in data["modules"]) == shared
    assert set(data["only_a"]) == set(ad_a.modules) - set(ad_b.modules) and data["only_a"]
    assert set(data["only_b"]) == set(ad_b.modules) - set(ad_a.modules) and data["only_b"]
    kinds = set()
    for m in data["modules"]:
        d1, d2 = _mlx_dense(ad_a, m["path"]), _mlx_dense(ad_b, m["path"])
        kinds.add(m["kind"])
        assert m["norm_a"] == pytest.approx(np.linalg.norm(d1), rel=1e-5)
        assert m["norm_b"] == pytest.approx(np.linalg.norm(d2), rel=1e-5)
        if d1.ndim == 2:
            ang, ov = _oracle(d1, d2)
            np.testing.assert_allclose(np.radians(m["angles"]), ang, atol=1e-4)
            assert m["overlap"] == pytest.approx(ov, abs=1e-5)
            continue
        per = [_oracle(d1[e], d2[e])[1] for e in range(d1.shape[0])]
        assert [e["overlap"] for e in m["per_expert"]] == pytest.approx(per, abs=1e-5)
        assert m["overlap"] == pytest.approx(np.mean(per), abs=1e-5)
        assert m["overlap_min"] == pytest.approx(min(per), abs=1e-5)
        assert m["experts"] == m["experts_compared"] == d1.shape[0]
    assert kinds == {"linear", "switch"}
    # A against itself: every module the same subspace, cosine 1
    self_run = json.loads(run_cli("adapters", "compare", a_dir, a_dir, "--json").out)
    assert all(m["overlap"] == pytest.approx(1.0, abs=1e-5) and m["cosine"] == pytest.approx(1.0, abs=1e-5)
               for m in self_run["modules"])
    assert "per_expert" not in self_run["modules"][0]


def test_cli_table_and_errors(tmp_path, tiny_moe_dir):
    a_dir = make_adapter(tiny_moe_dir, tmp_path / "a", keys=[DOWN], seed=1)
    zero = make_adapter(tiny_moe_dir, tmp_path / "z", keys=[DOWN], seed=1, b_std=0.0)
    run = run_cli("adapters", "compare", a_dir, zero)
    assert run.code == 0, run.err
    assert "mlp.switch_mlp.down_proj" in run.out and "0/8 experts" in run.out
    q = "model.layers.0.self_attn.q_proj"
    wide = write_adapter_dir(tmp_path / "w", {f"{q}.lora_a": mx.ones((64, 2)), f"{q}.lora_b": mx.ones((2, 64))},
                             keys=None, rank=2, scale=1.0, num_layers=4)
    narrow = write_adapter_dir(tmp_path / "n", {f"{q}.lora_a": mx.ones((32, 2)), f"{q}.lora_b": mx.ones((2, 64))},
                               keys=None, rank=2, scale=1.0, num_layers=4)
    bad = run_cli("adapters", "compare", wide, narrow)
    assert bad.code == 2 and "shapes differ" in bad.err and "Traceback" not in bad.err
    missing = run_cli("adapters", "compare", a_dir, tmp_path / "nope")
    assert missing.code == 2 and "does not exist" in missing.err
    regex = run_cli("adapters", "compare", a_dir, a_dir, "--modules", "(")
    assert regex.code == 2 and "regular expression" in regex.err
