"""``pyfuse.lm.agreement.next_token_agreement`` against an independent
oracle: per sequence, one plain forward pass of the model as ``mlx_lm.load``
(with ``adapter_path`` for the unfused adapter) builds it, and
``scipy.special.rel_entr`` over the float64 softmax of its logits."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.special import rel_entr, softmax

from pyfuse.errors import UserError
from pyfuse.lm.agreement import next_token_agreement, per_token_kl_top1, token_batches

from helpers import mlx_lm_logits, scipy_kl_top1

TEXTS = ["The quick brown fox jumps over the lazy dog.", "Paris is the capital of France.",
         "Two plus two is four, and four plus four is eight, and eight plus eight is sixteen.",
         "Water boils.", "Mixture of experts models route each token to a few experts of their layers."]


@pytest.fixture(scope="module")
def seqs(tiny_moe_dir):
    from pyfuse.lm.load import load_tokenizer

    tok = load_tokenizer(tiny_moe_dir)
    return [list(tok.encode(t)) for t in TEXTS]


def _check(got, kl, agree):
    assert got.tokens == kl.size and got.sequences == len(TEXTS)
    assert got.kl_mean == pytest.approx(kl.mean(), rel=1e-3)
    assert got.kl_p99 == pytest.approx(np.percentile(kl, 99), rel=1e-3)
    assert got.kl_max == pytest.approx(kl.max(), rel=1e-3)
    assert got.top1_agreement == pytest.approx(agree.mean(), abs=1e-12)


@pytest.fixture(scope="module")
def unfused_oracle(tiny_moe_dir, moe_adapter, seqs):
    return mlx_lm_logits(tiny_moe_dir, seqs, moe_adapter)


def test_fused_against_unfused_adapter_matches_scipy(tiny_moe_dir, moe_adapter, moe_pyfuse, seqs,
                                                     unfused_oracle):
    kl, agree = scipy_kl_top1(unfused_oracle, mlx_lm_logits(moe_pyfuse, seqs))
    assert kl.mean() > 1e-9 and agree.mean() < 1.0  # a 3-bit stock fuse: a measurable difference
    got = next_token_agreement(tiny_moe_dir, moe_pyfuse, seqs, reference_adapter=moe_adapter)
    _check(got, kl, agree)


def test_spilled_and_one_sequence_batches_give_the_same(tiny_moe_dir, moe_adapter, seqs, unfused_oracle,
                                                        tmp_path, monkeypatch):
    """The reference in a temporary file (removed after), every sequence in
    its own forward batch, the KL a few rows at a time, loaded models given
    as objects."""
    import tempfile

    from pyfuse.lm.load import load_for_inference

    import pyfuse.lm.agreement as agreement

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.setattr(agreement, "KL_CHUNK_ELEMENTS", 3000)  # the KL three rows at a time
    base = load_for_inference(tiny_moe_dir)
    got = next_token_agreement(tiny_moe_dir, base, seqs, reference_adapter=moe_adapter, spill_bytes=0, budget=1)
    _check(got, *scipy_kl_top1(unfused_oracle, mlx_lm_logits(tiny_moe_dir, seqs)))
    assert list(tmp_path.iterdir()) == []


def test_a_model_against_itself(tiny_moe_dir, seqs):
    got = next_token_agreement(tiny_moe_dir, tiny_moe_dir, seqs)
    assert (got.kl_mean, got.kl_max, got.top1_agreement) == (0.0, 0.0, 1.0)


def test_per_token_formula_matches_rel_entr():
    """Far apart and nearly equal distributions (where a difference of
    log-softmaxes in float32 is all rounding), large vocabulary offsets."""
    rng = np.random.default_rng(0)
    a = rng.normal(size=(50, 300)).astype(np.float32) * 4 + 30
    for b in (rng.normal(size=a.shape).astype(np.float32) * 4,
              a + rng.normal(size=a.shape).astype(np.float32) * 1e-3):
        kl, agree = per_token_kl_top1(a, b)
        a64, b64 = a.astype(np.float64), b.astype(np.float64)
        want = rel_entr(softmax(a64, -1), softmax(b64, -1)).sum(-1)
        np.testing.assert_allclose(kl, want, rtol=1e-6, atol=1e-15)
        np.testing.assert_array_equal(agree, a.argmax(-1) == b.argmax(-1))


def test_batches_stay_within_budget():
    seqs = [[1] * n for n in (5, 1, 9, 3, 7, 2)]
    batches = token_batches(seqs, vocab=10, budget=200)
    assert sorted(i for b in batches for i in b) == list(range(len(seqs)))
    for b in batches:
        assert len(b) == 1 or len(b) * max(len(seqs[i]) for i in b) * 10 <= 200


def test_bad_inputs_are_one_line_errors(tiny_moe_dir, moe_adapter):
    from pyfuse.lm.load import load_for_inference

    with pytest.raises(UserError, match="no sequences"):
        next_token_agreement(tiny_moe_dir, tiny_moe_dir, [])
    with pytest.raises(UserError, match="no tokens"):
        next_token_agreement(tiny_moe_dir, tiny_moe_dir, [[1, 2], []])
    with pytest.raises(UserError, match="needs a model path"):
        next_token_agreement(load_for_inference(tiny_moe_dir), tiny_moe_dir, [[1, 2]],
                             reference_adapter=moe_adapter)


def test_a_model_that_does_not_run_is_a_user_error():
    def broken(ids):
        raise ValueError("[matmul] Last dimension of first input\nmore")

    with pytest.raises(UserError, match=r"does not run \(ValueError: \[matmul\] Last dimension of first input\)"):
        next_token_agreement(broken, broken, [[1, 2]])


def test_a_failure_leaves_no_temporary_file(tmp_path, monkeypatch):
    import tempfile

    import mlx.core as mx

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    calls = []

    def fails_second_time(ids):
        calls.append(1)
        if len(calls) > 1:
            raise RuntimeError("out of memory")
        return mx.zeros((*ids.shape, 7))

    with pytest.raises(UserError, match="does not run"):
        next_token_agreement(fails_second_time, fails_second_time, [[1, 2, 3]], spill_bytes=0)
    assert list(tmp_path.iterdir()) == []
