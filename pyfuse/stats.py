"""Statistics for comparing multiple-choice accuracy between conditions.

Thin, checked wrappers over statsmodels (nothing here re-derives what it
already does):

* :func:`two_proportion_ztest`: pooled two-proportion z-test, the test the
  literature reports (independent samples).
* :func:`mcnemar`: exact McNemar test on paired outcomes. When two
  conditions answer the *same* items this is the right test: the z-test
  ignores the pairing and is conservative on such data.
* :func:`diff_confint`: Newcombe's hybrid-score interval for ``p1 - p2``
  (independent samples).
* :func:`min_detectable_effect` / :func:`power_two_proportions`: power
  analysis for the two-proportion comparison.
* :func:`wilson_interval`: Wilson's score interval for one accuracy,
  clamped so that it always contains ``k/n`` inside ``[0, 1]``.

* :func:`mcnemar_power` / :func:`mcnemar_mde` / :func:`mcnemar_sample_size`:
  power analysis for the paired (McNemar) comparison from a discordance
  rate (Connor 1987; statsmodels has none);
* :func:`holm`: Holm's step-down adjustment of a family of p values;
* :func:`margin_test`: Mann-Whitney U on the margins of flipped vs
  unflipped items (scipy);
* :func:`empirical_p`: where an observed value falls in a null
  distribution of K draws.

Bad input raises :class:`pyfuse.errors.UserError`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np

from .errors import UserError

ALTERNATIVES = ("two-sided", "larger", "smaller")


@dataclass(frozen=True)
class ZTestResult:
    """Two-proportion z-test of ``p1 = p2`` (``statistic`` > 0 when p1 > p2)."""

    statistic: float
    pvalue: float
    k1: int
    n1: int
    k2: int
    n2: int
    p1: float
    p2: float
    diff: float  # p1 - p2
    alternative: str

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class McNemarResult:
    """Exact McNemar test of equal accuracy on paired items.

    The inputs are echoed as the 2x2 table of (a, b) outcomes: only the
    discordant cells ``a_only`` and ``b_only`` carry information; the exact
    ``statistic`` is ``min(a_only, b_only)`` (statsmodels' convention)."""

    statistic: float
    pvalue: float
    n: int
    both_correct: int
    a_only: int  # a right, b wrong
    b_only: int  # a wrong, b right
    both_wrong: int
    acc_a: float
    acc_b: float
    diff: float  # acc_a - acc_b

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class DiffConfintResult:
    """Confidence interval for ``p1 - p2`` (Newcombe hybrid score)."""

    low: float
    high: float
    diff: float
    k1: int
    n1: int
    k2: int
    n2: int
    p1: float
    p2: float
    alpha: float
    method: str = "newcomb"

    def to_dict(self) -> dict:
        return asdict(self)


def _check_count(k, n, what: str) -> tuple[int, int]:
    if isinstance(k, bool) or isinstance(n, bool):
        raise UserError(f"{what}: counts must be integers, got {k!r}/{n!r}")
    try:
        k_i, n_i = int(k), int(n)
    except (TypeError, ValueError):
        raise UserError(f"{what}: counts must be integers, got {k!r}/{n!r}") from None
    if k_i != k or n_i != n:
        raise UserError(f"{what}: counts must be integers, got {k!r}/{n!r}")
    if n_i < 1:
        raise UserError(f"{what}: number of items must be >= 1, got {n_i}")
    if not 0 <= k_i <= n_i:
        raise UserError(f"{what}: successes must be in 0..{n_i}, got {k_i}")
    return k_i, n_i


def _check_alpha(alpha: float) -> float:
    if not 0 < alpha < 1:
        raise UserError(f"alpha must be in (0, 1), got {alpha}")
    return float(alpha)


def two_proportion_ztest(k1: int, n1: int, k2: int, n2: int,
                         alternative: str = "two-sided") -> ZTestResult:
    """Pooled two-proportion z-test (``statsmodels...proportions_ztest``).

    ``alternative`` is about ``p1 - p2``: "two-sided", "larger" (p1 > p2) or
    "smaller". With both proportions 0 or both 1 the statistic is undefined
    (zero variance): that raises UserError rather than returning NaN."""
    from statsmodels.stats.proportion import proportions_ztest

    k1, n1 = _check_count(k1, n1, "sample 1")
    k2, n2 = _check_count(k2, n2, "sample 2")
    if alternative not in ALTERNATIVES:
        raise UserError(f"alternative must be one of {', '.join(ALTERNATIVES)}, got {alternative!r}")
    pooled = (k1 + k2) / (n1 + n2)
    if pooled in (0.0, 1.0):
        raise UserError("z-test undefined: every item has the same outcome in both samples")
    stat, pvalue = proportions_ztest([k1, k2], [n1, n2], alternative=alternative)
    p1, p2 = k1 / n1, k2 / n2
    return ZTestResult(statistic=float(stat), pvalue=float(pvalue), k1=k1, n1=n1, k2=k2, n2=n2,
                       p1=p1, p2=p2, diff=p1 - p2, alternative=alternative)


def _as_bool_vector(x, name: str) -> np.ndarray:
    arr = np.asarray(x)
    if arr.ndim != 1:
        raise UserError(f"{name}: expected a 1-D sequence of booleans, got shape {arr.shape}")
    if arr.dtype != bool:
        if arr.size and not np.isin(arr, (0, 1)).all():
            raise UserError(f"{name}: expected booleans (or 0/1), got values other than 0/1")
        arr = arr.astype(bool)
    return arr


def mcnemar(correct_a: Sequence[bool], correct_b: Sequence[bool]) -> McNemarResult:
    """Exact (binomial) McNemar test for two conditions scored on the same
    items, ``correct_a[i]`` and ``correct_b[i]`` being the same item
    (``statsmodels.stats.contingency_tables.mcnemar(table, exact=True)``).

    With no discordant pairs the p-value is 1 (no evidence of a difference)."""
    from statsmodels.stats.contingency_tables import mcnemar as sm_mcnemar

    a = _as_bool_vector(correct_a, "correct_a")
    b = _as_bool_vector(correct_b, "correct_b")
    if a.shape != b.shape:
        raise UserError(f"paired outcomes differ in length: {a.size} vs {b.size}")
    if a.size == 0:
        raise UserError("no paired items")
    both = int(np.sum(a & b))
    a_only = int(np.sum(a & ~b))
    b_only = int(np.sum(~a & b))
    neither = int(np.sum(~a & ~b))
    res = sm_mcnemar([[both, a_only], [b_only, neither]], exact=True)
    n = int(a.size)
    acc_a, acc_b = (both + a_only) / n, (both + b_only) / n
    return McNemarResult(statistic=float(res.statistic), pvalue=float(res.pvalue), n=n,
                         both_correct=both, a_only=a_only, b_only=b_only, both_wrong=neither,
                         acc_a=acc_a, acc_b=acc_b, diff=acc_a - acc_b)


def diff_confint(k1: int, n1: int, k2: int, n2: int, alpha: float = 0.05) -> DiffConfintResult:
    """Newcombe's hybrid-score interval for ``p1 - p2`` at level
    ``1 - alpha`` (``confint_proportions_2indep(..., method="newcomb")``).

    It assumes independent samples; for two conditions on the same items
    it ignores the (usually positive) pairing and is therefore wide."""
    from statsmodels.stats.proportion import confint_proportions_2indep

    k1, n1 = _check_count(k1, n1, "sample 1")
    k2, n2 = _check_count(k2, n2, "sample 2")
    alpha = _check_alpha(alpha)
    low, high = confint_proportions_2indep(k1, n1, k2, n2, method="newcomb", compare="diff",
                                           alpha=alpha)
    p1, p2 = k1 / n1, k2 / n2
    return DiffConfintResult(low=float(low), high=float(high), diff=p1 - p2, k1=k1, n1=n1,
                             k2=k2, n2=n2, p1=p1, p2=p2, alpha=alpha)


def _check_power_inputs(n, p0, alpha) -> tuple[float, float, float]:
    if isinstance(n, bool) or not isinstance(n, (int, float, np.integer, np.floating)) or n < 2:
        raise UserError(f"n (items per condition) must be a number >= 2, got {n!r}")
    if not 0 < p0 < 1:
        raise UserError(f"p0 (baseline accuracy) must be in (0, 1), got {p0}")
    return float(n), float(p0), _check_alpha(alpha)


def _p1_from_h(p0: float, h: float) -> float:
    # Cohen's h = 2 asin(sqrt(p1)) - 2 asin(sqrt(p0)), inverted for p1.
    return math.sin(math.asin(math.sqrt(p0)) + h / 2) ** 2


def min_detectable_effect(n: int, p0: float, alpha: float = 0.05, power: float = 0.8) -> float:
    """Smallest increase ``p1 - p0`` in accuracy that a two-sided
    two-proportion test with ``n`` items per condition detects with
    probability ``power`` at level ``alpha``.

    Method: statsmodels' ``NormalIndPower().solve_power`` on Cohen's
    arcsine effect size ``h`` (equal group sizes, two-sided), converted back
    to the proportion scale from ``p0`` upwards. At n=692, p0=0.178 this is
    ~0.061 (a 5-point effect there is under-powered). Returns ``nan`` if
    even ``p1 = 1`` is not detectable."""
    from statsmodels.stats.power import NormalIndPower

    n, p0, alpha = _check_power_inputs(n, p0, alpha)
    if not 0 < power < 1:
        raise UserError(f"power must be in (0, 1), got {power}")
    if power <= alpha:
        raise UserError(f"power ({power}) must exceed alpha ({alpha})")
    h = float(NormalIndPower().solve_power(effect_size=None, nobs1=n, alpha=alpha, power=power,
                                           ratio=1.0, alternative="two-sided"))
    if math.asin(math.sqrt(p0)) + h / 2 > math.pi / 2:
        return float("nan")  # the required h exceeds the room above p0
    return _p1_from_h(p0, h) - p0


def power_two_proportions(n: int, p0: float, effect: float, alpha: float = 0.05) -> float:
    """Power of the two-sided two-proportion test (n per condition) to
    detect ``p1 = p0 + effect``; the same Cohen's-h / ``NormalIndPower``
    model as :func:`min_detectable_effect`, so the two are inverses."""
    from statsmodels.stats.power import NormalIndPower

    n, p0, alpha = _check_power_inputs(n, p0, alpha)
    p1 = p0 + effect
    if not 0 <= p1 <= 1 or effect == 0:
        raise UserError(f"effect must be non-zero with p0 + effect in [0, 1], got {effect}")
    h = 2 * math.asin(math.sqrt(p1)) - 2 * math.asin(math.sqrt(p0))
    return float(NormalIndPower().power(effect_size=abs(h), nobs1=n, alpha=alpha, ratio=1.0,
                                        alternative="two-sided"))


def wilson_interval(k, n, alpha: float = 0.05):
    """Wilson's score interval for ``k/n`` at level ``1 - alpha``
    (``statsmodels...proportion_confint(method="wilson")``), clamped so
    that ``0 <= low <= k/n <= high <= 1``: statsmodels' float arithmetic
    gives e.g. a lower bound of 2.8e-17 for 0/14, which would put an error
    bar below zero. ``k`` and ``n`` are integers (floats out) or arrays of
    them (arrays out)."""
    from statsmodels.stats.proportion import proportion_confint

    alpha = _check_alpha(alpha)
    k_arr, n_arr = np.asarray(k), np.asarray(n)
    if k_arr.dtype == bool or n_arr.dtype == bool or not (np.issubdtype(k_arr.dtype, np.number)
                                                         and np.issubdtype(n_arr.dtype, np.number)):
        raise UserError(f"wilson interval: counts must be integers, got {k!r}/{n!r}")
    if np.any(k_arr != np.round(k_arr)) or np.any(n_arr != np.round(n_arr)):
        raise UserError(f"wilson interval: counts must be integers, got {k!r}/{n!r}")
    if np.any(n_arr < 1) or np.any(k_arr < 0) or np.any(k_arr > n_arr):
        raise UserError(f"wilson interval: needs 0 <= k <= n and n >= 1, got {k!r}/{n!r}")
    low, high = proportion_confint(k_arr, n_arr, alpha=alpha, method="wilson")
    p = k_arr / n_arr
    low = np.minimum(np.maximum(low, 0.0), p)
    high = np.maximum(np.minimum(high, 1.0), p)
    if low.ndim == 0:
        return float(low), float(high)
    return low, high


# ---------------------------------------------------------------------------
# The paired design: power of the exact McNemar test from a discordance rate
# ---------------------------------------------------------------------------


def _check_discordance(discordance) -> float:
    if isinstance(discordance, bool) or not isinstance(discordance, (int, float, np.floating)) \
            or not 0 < discordance <= 1:
        raise UserError(f"discordance (share of items the two conditions answer differently: right/wrong) "
                        f"must be in (0, 1], got {discordance!r}")
    return float(discordance)


def _check_target_power(power: float, alpha: float) -> float:
    if not 0 < power < 1:
        raise UserError(f"power must be in (0, 1), got {power}")
    if power <= alpha:
        raise UserError(f"power ({power}) must exceed alpha ({alpha})")
    return float(power)


def mcnemar_power(n: int, discordance: float, effect: float, alpha: float = 0.05) -> float:
    """Power of the two-sided McNemar test on ``n`` paired items to detect
    a difference in accuracy ``effect`` (= p10 - p01) when a share
    ``discordance`` (= p10 + p01) of the items is right under one
    condition and wrong under the other.

    Connor's (1987) normal approximation, Biometrics 43:207-211:
    ``power = Phi((sqrt(n) |d| - z_{1-alpha/2} sqrt(psi)) / sqrt(psi - d^2))``.
    The exact (binomial) test that :func:`mcnemar` runs is discrete and a
    little more conservative; the tests compare the two by exact
    enumeration."""
    from scipy.stats import norm

    n, _, alpha = _check_power_inputs(n, 0.5, alpha)
    psi = _check_discordance(discordance)
    d = abs(float(effect))
    if d == 0 or d > psi:
        raise UserError(f"effect must be non-zero and at most the discordance {psi:g} "
                        f"(|p10 - p01| <= p10 + p01), got {effect}")
    z_a = norm.ppf(1 - alpha / 2)
    spread = psi - d * d
    if spread <= 0:
        return 1.0  # every discordant item goes one way: the limit of the formula
    return float(norm.cdf((math.sqrt(n) * d - z_a * math.sqrt(psi)) / math.sqrt(spread)))


def mcnemar_mde(n: int, discordance: float, alpha: float = 0.05, power: float = 0.8) -> float:
    """Smallest ``|p10 - p01|`` that the two-sided McNemar test on ``n``
    paired items with discordance ``psi`` detects with probability
    ``power`` (:func:`mcnemar_power` solved for the effect with scipy's
    ``brentq``). ``nan`` when even ``effect = psi`` (every discordant item
    in one direction) is not detectable."""
    from scipy.optimize import brentq

    n, _, alpha = _check_power_inputs(n, 0.5, alpha)
    psi = _check_discordance(discordance)
    power = _check_target_power(power, alpha)
    if mcnemar_power(n, psi, psi, alpha) < power:
        return float("nan")
    return float(brentq(lambda d: mcnemar_power(n, psi, d, alpha) - power, psi * 1e-9, psi, xtol=1e-12))


def mcnemar_sample_size(discordance: float, effect: float, alpha: float = 0.05, power: float = 0.8) -> int:
    """Paired items needed for the two-sided McNemar test to detect
    ``effect`` at ``discordance`` with ``power`` (Connor 1987:
    ``n = (z_{1-alpha/2} sqrt(psi) + z_{power} sqrt(psi - d^2))^2 / d^2``,
    rounded up)."""
    from scipy.stats import norm

    alpha = _check_alpha(alpha)
    psi = _check_discordance(discordance)
    power = _check_target_power(power, alpha)
    d = abs(float(effect))
    if d == 0 or d > psi:
        raise UserError(f"effect must be non-zero and at most the discordance {psi:g}, got {effect}")
    root = norm.ppf(1 - alpha / 2) * math.sqrt(psi) + norm.ppf(power) * math.sqrt(max(psi - d * d, 0.0))
    return max(2, math.ceil(root * root / (d * d) - 1e-9))


def sample_size_two_proportions(p0: float, effect: float, alpha: float = 0.05, power: float = 0.8) -> int:
    """Items per condition for the two-sided two-proportion test to detect
    ``p1 = p0 + effect`` (statsmodels' ``NormalIndPower`` on Cohen's h,
    the model of :func:`min_detectable_effect`), rounded up."""
    from statsmodels.stats.power import NormalIndPower

    _, p0, alpha = _check_power_inputs(2, p0, alpha)
    power = _check_target_power(power, alpha)
    p1 = p0 + effect
    if not 0 <= p1 <= 1 or effect == 0:
        raise UserError(f"effect must be non-zero with p0 + effect in [0, 1], got {effect}")
    h = abs(2 * math.asin(math.sqrt(p1)) - 2 * math.asin(math.sqrt(p0)))
    n = NormalIndPower().solve_power(effect_size=h, nobs1=None, alpha=alpha, power=power, ratio=1.0,
                                     alternative="two-sided")
    return max(2, math.ceil(float(n) - 1e-9))


# ---------------------------------------------------------------------------
# Families of tests, margins, null distributions
# ---------------------------------------------------------------------------


def holm(pvalues: Sequence[float], alpha: float = 0.05) -> list[float]:
    """Holm's step-down adjusted p values (``statsmodels.stats.multitest.
    multipletests(method="holm")``), in the order given. A family of one
    is returned unchanged."""
    from statsmodels.stats.multitest import multipletests

    ps = [float(p) for p in pvalues]
    if not ps:
        return []
    if any(not 0 <= p <= 1 for p in ps):
        raise UserError(f"p values must be in [0, 1], got {ps}")
    return [float(x) for x in multipletests(ps, alpha=_check_alpha(alpha), method="holm")[1]]


@dataclass(frozen=True)
class MarginTestResult:
    """Mann-Whitney U test that flipped items have smaller margins than
    unflipped ones (``alternative="less"``)."""

    statistic: float
    pvalue: float
    n_flipped: int
    n_unflipped: int
    median_flipped: float
    median_unflipped: float

    def to_dict(self) -> dict:
        return asdict(self)


def margin_test(flipped: Sequence[float], unflipped: Sequence[float]) -> MarginTestResult | None:
    """``scipy.stats.mannwhitneyu(flipped, unflipped, alternative="less")``:
    do the items whose answer flipped sit closer to the decision boundary?
    None when either group is empty (nothing to compare)."""
    from scipy.stats import mannwhitneyu

    f = np.asarray(flipped, dtype=float)
    u = np.asarray(unflipped, dtype=float)
    if not f.size or not u.size:
        return None
    if not (np.isfinite(f).all() and np.isfinite(u).all()):
        raise UserError("margins must be finite numbers")
    res = mannwhitneyu(f, u, alternative="less")
    return MarginTestResult(statistic=float(res.statistic), pvalue=float(res.pvalue), n_flipped=int(f.size),
                            n_unflipped=int(u.size), median_flipped=float(np.median(f)),
                            median_unflipped=float(np.median(u)))


def empirical_p(observed: float, null: Sequence[float]) -> float:
    """One-sided empirical p of ``observed`` against ``K`` draws of a null
    distribution: ``(1 + #{null >= observed}) / (K + 1)`` (the draw-count
    estimate that is never 0; Davison & Hinkley 1997, eq. 4.11). The
    smallest possible value is ``1 / (K + 1)``."""
    xs = [float(x) for x in null]
    if not xs:
        raise UserError("the null distribution is empty")
    return (1 + sum(1 for x in xs if x >= float(observed))) / (len(xs) + 1)
