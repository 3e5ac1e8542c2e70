"""pyfuse.stats and `pyfuse stats` against independent oracles: published
figures, scipy's normal/binomial distributions, statsmodels called directly
and simulation."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from scipy import stats as sps
from statsmodels.stats.contingency_tables import mcnemar as sm_mcnemar
from statsmodels.stats.proportion import (confint_proportions_2indep, power_proportions_2indep,
                                          proportion_confint, proportions_ztest)

from pyfuse.cli import main
from pyfuse.errors import UserError
from pyfuse.stats import (diff_confint, mcnemar, min_detectable_effect, power_two_proportions,
                          two_proportion_ztest)

from helpers import result_row, write_jsonl


# --- two-proportion z-test ------------------------------------------------

def test_ztest_reproduces_published_p():
    # The research's A1 vs A0: 128/692 vs 123/692, published p = 0.73.
    r = two_proportion_ztest(128, 692, 123, 692)
    assert round(r.pvalue, 3) == 0.727
    assert round(r.pvalue, 2) == 0.73
    assert (r.k1, r.n1, r.k2, r.n2) == (128, 692, 123, 692)
    assert r.diff == pytest.approx(128 / 692 - 123 / 692)


@pytest.mark.parametrize("k1,n1,k2,n2", [(128, 692, 123, 692), (30, 50, 18, 60), (1, 200, 9, 150)])
@pytest.mark.parametrize("alternative", ["two-sided", "larger", "smaller"])
def test_ztest_matches_textbook_formula(k1, n1, k2, n2, alternative):
    # Pooled-variance z and normal tail probabilities computed from scratch.
    p1, p2, pooled = k1 / n1, k2 / n2, (k1 + k2) / (n1 + n2)
    z = (p1 - p2) / math.sqrt(pooled * (1 - pooled) * (1 / n1 + 1 / n2))
    expected_p = {"two-sided": 2 * sps.norm.sf(abs(z)), "larger": sps.norm.sf(z),
                  "smaller": sps.norm.cdf(z)}[alternative]
    r = two_proportion_ztest(k1, n1, k2, n2, alternative=alternative)
    assert r.statistic == pytest.approx(z, rel=1e-10)
    assert r.pvalue == pytest.approx(expected_p, rel=1e-9)
    assert r.alternative == alternative


@pytest.mark.parametrize("args", [(5, 4, 1, 4), (-1, 4, 1, 4), (1, 0, 1, 4), (1.5, 4, 1, 4),
                                  (0, 10, 0, 12), (10, 10, 12, 12)])
def test_ztest_rejects_bad_counts(args):
    with pytest.raises(UserError):
        two_proportion_ztest(*args)


def test_ztest_rejects_bad_alternative():
    with pytest.raises(UserError, match="alternative"):
        two_proportion_ztest(1, 10, 2, 10, alternative="greater")


# --- McNemar ---------------------------------------------------------------

def _paired(seed: int, n: int, agree: float):
    rng = np.random.default_rng(seed)
    a = rng.random(n) < 0.4
    flip = rng.random(n) > agree
    b = np.where(flip, rng.random(n) < 0.5, a)
    return a, b


@pytest.mark.parametrize("seed,n,agree", [(0, 692, 0.8), (1, 100, 0.5), (2, 40, 0.95), (3, 2000, 0.7)])
def test_mcnemar_matches_statsmodels_exact_and_binomial(seed, n, agree):
    a, b = _paired(seed, n, agree)
    r = mcnemar(a.tolist(), b.tolist())
    # The 2x2 table built independently (numpy histogram of the pair codes).
    table = np.histogram2d((~a).astype(int), (~b).astype(int), bins=2)[0]  # rows/cols: correct, wrong
    ref = sm_mcnemar(table, exact=True)
    assert r.pvalue == pytest.approx(ref.pvalue, rel=1e-12)
    assert r.statistic == ref.statistic
    # The exact McNemar test is a two-sided binomial test on discordant pairs.
    b_, c_ = int(table[0, 1]), int(table[1, 0])
    assert r.pvalue == pytest.approx(sps.binomtest(b_, b_ + c_, 0.5).pvalue, rel=1e-9)
    assert (r.a_only, r.b_only, r.n) == (b_, c_, n)
    assert r.both_correct + r.a_only + r.b_only + r.both_wrong == n
    assert r.acc_a == pytest.approx(a.mean()) and r.acc_b == pytest.approx(b.mean())


def test_mcnemar_no_discordant_pairs_is_p_one():
    r = mcnemar([True, False, True], [True, False, True])
    assert r.pvalue == 1.0 and r.a_only == r.b_only == 0


def test_mcnemar_accepts_zero_one_and_rejects_other_values():
    assert mcnemar([1, 0, 1, 1], [0, 0, 1, 0]).a_only == 2
    with pytest.raises(UserError, match="0/1"):
        mcnemar([1, 2], [0, 1])
    with pytest.raises(UserError, match="length"):
        mcnemar([True, False], [True])
    with pytest.raises(UserError):
        mcnemar([], [])


# --- Newcombe interval -------------------------------------------------------

@pytest.mark.parametrize("k1,n1,k2,n2,low,high", [
    # Newcombe (1998), Stat Med 17:873, Table II, method 10 (hybrid score).
    (56, 70, 48, 80, 0.0524, 0.3339),
    (9, 10, 3, 10, 0.1705, 0.8090),
    (5, 56, 0, 29, -0.0381, 0.1926),
])
def test_newcombe_reproduces_published_intervals(k1, n1, k2, n2, low, high):
    r = diff_confint(k1, n1, k2, n2)
    assert (round(r.low, 4), round(r.high, 4)) == (low, high)


@pytest.mark.parametrize("k1,n1,k2,n2", [(128, 692, 123, 692), (0, 20, 3, 25), (40, 40, 10, 30)])
@pytest.mark.parametrize("alpha", [0.05, 0.1])
def test_newcombe_matches_statsmodels_and_wilson_construction(k1, n1, k2, n2, alpha):
    r = diff_confint(k1, n1, k2, n2, alpha=alpha)
    low, high = confint_proportions_2indep(k1, n1, k2, n2, method="newcomb", alpha=alpha)
    assert (r.low, r.high) == pytest.approx((low, high), rel=1e-12)
    # Newcombe's construction from the two Wilson intervals (l_i, u_i).
    p1, p2 = k1 / n1, k2 / n2
    l1, u1 = proportion_confint(k1, n1, alpha=alpha, method="wilson")
    l2, u2 = proportion_confint(k2, n2, alpha=alpha, method="wilson")
    d = p1 - p2
    assert r.low == pytest.approx(d - math.sqrt((p1 - l1) ** 2 + (u2 - p2) ** 2), abs=1e-12)
    assert r.high == pytest.approx(d + math.sqrt((u1 - p1) ** 2 + (p2 - l2) ** 2), abs=1e-12)
    assert r.alpha == alpha and r.diff == pytest.approx(d)


def test_confint_rejects_bad_alpha():
    with pytest.raises(UserError, match="alpha"):
        diff_confint(1, 10, 2, 10, alpha=1.5)


# --- power ------------------------------------------------------------------

def test_mde_reproduces_published_figure():
    # DESIGN.md: n = 692 per arm, alpha .05, power .8, baseline 17.8 % -> ~6.1 points.
    mde = min_detectable_effect(692, 0.178)
    assert isinstance(mde, float)
    assert round(mde, 3) == 0.061


def test_mde_has_the_requested_power_under_the_ztest_model():
    # A different power model than the one min_detectable_effect uses:
    # statsmodels' power of the pooled two-proportion z-test itself.
    for n, p0, power in [(692, 0.178, 0.8), (200, 0.5, 0.9), (1500, 0.6, 0.8)]:
        mde = min_detectable_effect(n, p0, power=power)
        got = power_proportions_2indep(mde, p0, n, alpha=0.05).power
        assert got == pytest.approx(power, abs=0.01)


def test_mde_power_by_simulation():
    # 20,000 simulated experiments of the pooled z-test at p0 vs p0 + mde.
    n, p0 = 692, 0.178
    mde = min_detectable_effect(n, p0)
    rng = np.random.default_rng(12345)
    sims = 20_000
    k0 = rng.binomial(n, p0, sims)
    k1 = rng.binomial(n, p0 + mde, sims)
    pooled = (k0 + k1) / (2 * n)
    z = (k1 - k0) / n / np.sqrt(pooled * (1 - pooled) * 2 / n)
    rejected = np.mean(2 * sps.norm.sf(np.abs(z)) < 0.05)
    assert rejected == pytest.approx(0.8, abs=0.015)  # ~5 SE of a 20k-draw proportion


def test_five_points_is_underpowered_at_n692():
    # The research's 5-point threshold at n = 692 from 17.8 %.
    pw = power_two_proportions(692, 0.178, 0.05)
    assert pw == pytest.approx(power_proportions_2indep(0.05, 0.178, 692).power, abs=0.01)
    assert pw < 0.8
    # ... and power at the MDE is the target power (the two are inverses).
    assert power_two_proportions(692, 0.178, min_detectable_effect(692, 0.178)) == pytest.approx(0.8)


def test_mde_shrinks_with_n_and_rejects_bad_inputs():
    assert min_detectable_effect(2000, 0.178) < min_detectable_effect(692, 0.178)
    for kwargs in [dict(n=1, p0=0.2), dict(n=100, p0=0.0), dict(n=100, p0=1.2),
                   dict(n=100, p0=0.2, alpha=0), dict(n=100, p0=0.2, power=1.0)]:
        with pytest.raises(UserError):
            min_detectable_effect(**kwargs)


def test_mde_unreachable_is_nan():
    # 3 items per arm from 95 %: no increase up to 100 % reaches 80 % power.
    assert math.isnan(min_detectable_effect(3, 0.95))


# --- CLI ------------------------------------------------------------------------

def _write_results(path, ids, correct):
    write_jsonl(path, [result_row(i, bool(c)) for i, c in zip(ids, correct)])


def test_cli_ztest_table_and_json(capsys):
    assert main(["stats", "ztest", "128", "692", "123", "692"]) == 0
    out = capsys.readouterr().out
    assert "0.727" in out and "18.50 %" in out and "17.77 %" in out
    assert main(["stats", "ztest", "128", "692", "123", "692", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    z, p = proportions_ztest([128, 123], [692, 692])
    assert data["statistic"] == pytest.approx(z) and data["pvalue"] == pytest.approx(p)
    assert (data["k1"], data["n1"], data["k2"], data["n2"]) == (128, 692, 123, 692)


def test_cli_ci_and_mde(capsys):
    assert main(["stats", "ci", "56", "70", "48", "80", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert (round(data["low"], 4), round(data["high"], 4)) == (0.0524, 0.3339)
    assert main(["stats", "mde", "--n", "692", "--p0", "0.178", "--effect", "0.05"]) == 0
    out = capsys.readouterr().out
    assert "+6.10 pp" in out and "under-powered" in out
    assert main(["stats", "mde", "--n", "692", "--p0", "0.178", "--json"]) == 0
    assert round(json.loads(capsys.readouterr().out)["mde"], 3) == 0.061


def test_cli_mcnemar_matches_by_id(tmp_path, capsys):
    a, b = _paired(7, 300, 0.7)
    ids = list(range(300))
    _write_results(tmp_path / "a.jsonl", ids, a)
    # B written in another order: the CLI must pair by id, not by line.
    order = np.random.default_rng(0).permutation(300)
    _write_results(tmp_path / "b.jsonl", [ids[i] for i in order], b[order])
    assert main(["stats", "mcnemar", str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl"), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    table = [[np.sum(a & b), np.sum(a & ~b)], [np.sum(~a & b), np.sum(~a & ~b)]]
    assert data["pvalue"] == pytest.approx(sm_mcnemar(table, exact=True).pvalue, rel=1e-12)
    assert main(["stats", "mcnemar", str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl")]) == 0
    assert "exact McNemar" in capsys.readouterr().out


def test_cli_bad_input_is_one_line_exit_2(tmp_path, capsys):
    assert main(["stats", "ztest", "800", "692", "123", "692"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("pyfuse stats: error:") and err.count("\n") == 1 and "Traceback" not in err
    _write_results(tmp_path / "a.jsonl", [1, 2, 3], [True, False, True])
    _write_results(tmp_path / "b.jsonl", [1, 2, 4], [True, True, True])
    assert main(["stats", "mcnemar", str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "different items" in err


# --- Wilson interval (the report's error bars) -----------------------------------

def test_wilson_matches_statsmodels_and_is_clamped_for_every_count_up_to_300():
    """Every k in 0..n for every n in 1..300: the interval is statsmodels'
    Wilson interval, clamped so that 0 <= low <= k/n <= high <= 1 (so no
    error bar is ever negative: statsmodels gives 2.8e-17 > 0 as the lower
    bound of 0/14). The scalar form (one condition) is the array form's."""
    from pyfuse.stats import wilson_interval

    raw_positive_at_zero = 0
    for n in range(1, 301):
        k = np.arange(n + 1)
        lo_ref, hi_ref = proportion_confint(k, n, alpha=0.05, method="wilson")
        raw_positive_at_zero += lo_ref[0] > 0
        lo, hi = wilson_interval(k, n)
        p = k / n
        assert np.all((0.0 <= lo) & (lo <= p) & (p <= hi) & (hi <= 1.0))
        assert np.all(p - lo >= 0) and np.all(hi - p >= 0)  # the error bars
        np.testing.assert_allclose(lo, np.minimum(np.maximum(lo_ref, 0.0), p), rtol=0, atol=1e-15)
        np.testing.assert_allclose(hi, np.maximum(np.minimum(hi_ref, 1.0), p), rtol=0, atol=1e-15)
        for ki in {0, 1, n // 2, n - 1, n}:
            assert wilson_interval(ki, n) == (lo[ki], hi[ki])
    assert raw_positive_at_zero > 0  # the float artefact this guards against does occur


def test_wilson_rejects_empty_and_bad_counts():
    from pyfuse.stats import wilson_interval

    for k, n in [(0, 0), (3, 2), (-1, 5), (1.5, 4), (True, 4)]:
        with pytest.raises(UserError):
            wilson_interval(k, n)


# --- McNemar power (Connor 1987) against the exact test ------------------------

def _exact_mcnemar_power(n: int, psi: float, ds, alpha: float) -> np.ndarray:
    """The oracle: the power of the exact two-sided McNemar test (the one
    pyfuse.stats.mcnemar runs) by enumeration, for each effect in ``ds``:
    the number of discordant items D ~ Binomial(n, psi); given D, the items
    A gets right B ~ Binomial(D, p10 / psi); reject when the exact binomial
    p < alpha."""
    p10 = (psi + np.atleast_1d(ds)) / 2
    total = np.zeros(p10.size)
    for disc in range(1, n + 1):
        b = np.arange(disc + 1)
        reject = b[2 * sps.binom.cdf(np.minimum(b, disc - b), disc, 0.5) < alpha]
        if reject.size:
            total += sps.binom.pmf(disc, n, psi) * sps.binom.pmf(reject[None, :], disc,
                                                                  p10[:, None] / psi).sum(axis=1)
    return total


def test_exact_power_oracle_agrees_with_simulated_statsmodels_mcnemar():
    # the oracle itself, checked by simulation of statsmodels' exact test on seeded paired data
    n, psi, d = 150, 0.2, 0.08
    rng = np.random.default_rng(2024)
    p10, p01 = (psi + d) / 2, (psi - d) / 2
    sims, rejected = 4000, 0
    for _ in range(sims):
        cells = rng.multinomial(n, [p10, p01, 1 - psi])
        rejected += sm_mcnemar([[0, cells[0]], [cells[1], cells[2]]], exact=True).pvalue < 0.05
    exact = _exact_mcnemar_power(n, psi, d, 0.05)[0]
    assert rejected / sims == pytest.approx(exact, abs=4 * math.sqrt(exact * (1 - exact) / sims))


@pytest.mark.parametrize("n,psi", [(692, 0.1), (692, 0.2), (300, 0.15), (200, 0.3), (400, 0.3), (204, 0.1)])
def test_connor_power_is_close_to_the_exact_tests(n, psi):
    from pyfuse.stats import mcnemar_power

    ds = (0.25 * psi, 0.4 * psi, 0.6 * psi)
    for d, exact in zip(ds, _exact_mcnemar_power(n, psi, ds, 0.05)):
        approx = mcnemar_power(n, psi, d)
        # the normal approximation ignores the exact test's discreteness: it overestimates the power
        # by a few points, less as the expected number of discordant items n * psi grows
        assert exact - 0.005 <= approx <= exact + (0.035 if n * psi >= 100 else 0.08)


def test_mcnemar_mde_and_sample_size_are_inverses_of_the_power():
    from pyfuse.stats import mcnemar_mde, mcnemar_power, mcnemar_sample_size

    for n, psi, power in [(692, 0.1, 0.8), (204, 0.08, 0.8), (1500, 0.3, 0.9)]:
        mde = mcnemar_mde(n, psi, power=power)
        assert mcnemar_power(n, psi, mde) == pytest.approx(power, abs=1e-9)
        needed = mcnemar_sample_size(psi, mde, power=power)
        assert needed in (n, n + 1)  # rounding up
        assert mcnemar_power(needed, psi, mde) >= power - 1e-9 > mcnemar_power(needed - 2, psi, mde)
        # the closed form, written out here
        z = sps.norm.ppf
        root = z(0.975) * math.sqrt(psi) + z(power) * math.sqrt(psi - mde ** 2)
        assert needed == math.ceil(root ** 2 / mde ** 2 - 1e-9)
    # more discordance, the same n: a larger effect is needed; a tiny n cannot reach the target
    assert mcnemar_mde(692, 0.3) > mcnemar_mde(692, 0.1)
    assert math.isnan(mcnemar_mde(10, 0.05))


def test_mcnemar_power_rejects_impossible_inputs():
    from pyfuse.stats import mcnemar_power, mcnemar_sample_size

    for args in [(100, 0.0, 0.01), (100, 1.5, 0.1), (100, 0.1, 0.2), (100, 0.1, 0.0), (1, 0.1, 0.05)]:
        with pytest.raises(UserError):
            mcnemar_power(*args)
    with pytest.raises(UserError):
        mcnemar_sample_size(0.1, 0.05, power=0.01)


def test_two_proportion_sample_size_is_the_inverse_of_the_mde():
    from pyfuse.stats import sample_size_two_proportions

    # the study: a 5-point effect from 17.8 % needs about 1,013 items per condition
    n = sample_size_two_proportions(0.178, 0.05)
    assert 1005 <= n <= 1020
    assert power_proportions_2indep(0.05, 0.178, n).power == pytest.approx(0.8, abs=0.01)
    assert min_detectable_effect(n, 0.178) <= 0.05 < min_detectable_effect(n - 5, 0.178)


# --- Holm, margins, empirical p ---------------------------------------------------

def test_holm_matches_the_step_down_procedure_written_out():
    from pyfuse.stats import holm

    rng = np.random.default_rng(5)
    for m in (1, 2, 4, 7):
        ps = rng.uniform(0, 0.2, m).tolist()
        order = np.argsort(ps)
        expected = np.empty(m)
        running = 0.0
        for rank, i in enumerate(order):  # Holm (1979): max over the smaller ones of (m - rank) p
            running = max(running, min(1.0, (m - rank) * ps[i]))
            expected[i] = running
        assert holm(ps) == pytest.approx(expected.tolist(), rel=1e-12)
    assert holm([0.03]) == [0.03] and holm([]) == []
    with pytest.raises(UserError):
        holm([0.5, 1.2])


def test_margin_test_is_scipys_one_sided_mann_whitney():
    from pyfuse.stats import margin_test

    rng = np.random.default_rng(9)
    flipped, kept = rng.exponential(0.3, 25), rng.exponential(1.0, 200)
    r = margin_test(flipped, kept)
    ref = sps.mannwhitneyu(flipped, kept, alternative="less")
    assert (r.statistic, r.pvalue) == (pytest.approx(ref.statistic), pytest.approx(ref.pvalue, rel=1e-12))
    assert r.pvalue < 0.01 and r.n_flipped == 25 and r.median_flipped == pytest.approx(np.median(flipped))
    # no concentration: same distribution, a large p (one-sided)
    assert margin_test(rng.exponential(1.0, 50), rng.exponential(1.0, 200)).pvalue > 0.01
    assert margin_test([], [0.1, 0.2]) is None


def test_empirical_p_counts_the_draws_at_least_as_large():
    from pyfuse.stats import empirical_p

    null = [0.01, 0.03, 0.03, 0.05]
    assert empirical_p(0.06, null) == pytest.approx(1 / 5)  # above every draw: the smallest value
    assert empirical_p(0.03, null) == pytest.approx(4 / 5)  # ties count as at least as large
    assert empirical_p(0.0, null) == 1.0
    # under the null (observed is one more draw) P(p <= j/(K+1)) = j/(K+1): uniform on the grid
    rng = np.random.default_rng(1)
    ps = [empirical_p(x[0], x[1:]) for x in rng.normal(size=(4000, 11))]
    for j in (1, 3, 5):
        assert np.mean(np.array(ps) <= j / 11 + 1e-12) == pytest.approx(j / 11, abs=0.02)
    with pytest.raises(UserError):
        empirical_p(0.1, [])


def test_cli_paired_power_from_a_discordance_or_a_noise_floor(tmp_path, capsys):
    from pyfuse.stats import mcnemar_mde, mcnemar_power, mcnemar_sample_size

    assert main(["stats", "paired", "--n", "692", "--discordance", "0.1", "--effect", "0.03", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["mde"] == pytest.approx(mcnemar_mde(692, 0.1))
    assert data["power_at_effect"] == pytest.approx(mcnemar_power(692, 0.1, 0.03))
    assert data["n_needed"] == mcnemar_sample_size(0.1, 0.03) and data["underpowered"] is True
    # the discordance from a noise-floor result: the MC answers a zero-delta fuse flips at the model's setting
    (tmp_path / "nf.json").write_text(json.dumps({"rows": [
        {"policy": "stock", "source": "model", "bits": 3, "group_size": 64, "mc_flip": 0.15},
        {"policy": "preserve", "source": "model", "bits": 3, "group_size": 64, "mc_flip": 0.0}]}))
    assert main(["stats", "paired", "--effect", "0.05", "--noise-floor", str(tmp_path / "nf.json")]) == 0
    out = capsys.readouterr().out
    assert "items needed for +5.00 pp" in out and str(mcnemar_sample_size(0.15, 0.05)) in out
    assert main(["stats", "paired", "--effect", "0.05", "--noise-floor", str(tmp_path / "nf.json"),
                 "--policy", "preserve"]) == 2
    assert "no discordance to plan with" in capsys.readouterr().err
    assert main(["stats", "paired", "--discordance", "0.1"]) == 2
    assert "give --n" in capsys.readouterr().err
