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
