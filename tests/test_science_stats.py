"""The reproductions' statistics against independent references: scipy's one-sample t-test
interval and linregress, numpy's polyfit, a brute-force search for a crossing point."""

import math

import numpy as np
import pytest
from scipy import stats as sps

from btlm_jax.experiments import stats


def test_t_interval_and_paired_differences_match_scipy():
    rng = np.random.default_rng(0)
    a, b = rng.normal(3.0, 0.1, 5), rng.normal(2.9, 0.1, 5)
    ref = sps.ttest_1samp(a - b, 0.0).confidence_interval(0.95)
    got = stats.paired_interval(a, b)
    assert got["lo"] == pytest.approx(ref.low, rel=1e-10)
    assert got["hi"] == pytest.approx(ref.high, rel=1e-10)
    assert got["se"] == pytest.approx(sps.sem(a - b), rel=1e-12)
    assert math.isnan(stats.t_interval([1.0])["lo"])


def test_slope_interval_matches_linregress_and_polyfit():
    x = np.log([2, 2, 2, 8, 8, 8, 32, 32, 32])
    y = 0.01 * x + np.random.default_rng(1).normal(0, 0.003, x.size)
    got = stats.slope_interval(x, y, 0.9)
    lr = sps.linregress(x, y)
    t = sps.t.ppf(0.95, x.size - 2)
    assert got["slope"] == pytest.approx(np.polyfit(x, y, 1)[0], rel=1e-10)
    assert got["se"] == pytest.approx(lr.stderr, rel=1e-10)
    assert (got["lo"], got["hi"]) == pytest.approx((lr.slope - t * lr.stderr,
                                                    lr.slope + t * lr.stderr), rel=1e-10)


def test_verdict_reads_the_interval():
    assert stats.verdict(0.1, 0.3) == "holds"
    assert stats.verdict(-0.3, -0.1) == "does not hold"
    assert stats.verdict(-0.1, 0.3) == "inconclusive"
    assert stats.verdict(-0.3, -0.1, positive=False) == "holds"
    assert stats.verdict(math.nan, 1.0) == "inconclusive"


def test_parabola_vertex_matches_polyfit_and_its_covariance():
    rng = np.random.default_rng(2)
    x = np.linspace(-3, 2, 7)
    y = 0.3 * (x + 0.7) ** 2 + 2.0 + rng.normal(0, 0.01, x.size)
    got = stats.parabola_vertex(x, y)
    p, cov_unscaled = np.polyfit(x, y, 2, cov="unscaled")
    assert got["vertex"] == pytest.approx(-p[1] / (2 * p[0]), rel=1e-9)
    # delta method on numpy's unscaled covariance times the residual variance (n - 3 dof)
    resid = y - np.polyval(p, x)
    cov = cov_unscaled * (resid ** 2).sum() / (x.size - 3)
    g = np.array([p[1] / (2 * p[0] ** 2), -1 / (2 * p[0]), 0.0])
    assert got["se"] == pytest.approx(math.sqrt(g @ cov @ g), rel=1e-6)
    assert resid.std() < 0.02
    assert not stats.parabola_vertex([0, 1, 2], [0, 1, 0])["convex"]


def test_curve_optimum_flags_edges_and_fits_interior_minima():
    lrs = [1e-3 * 2 ** k for k in range(6)]
    loss = [(math.log2(lr) - math.log2(5e-3)) ** 2 for lr in lrs]
    got = stats.curve_optimum(lrs, loss)
    assert got["at_edge"] is None and got["fit"] == pytest.approx(5e-3, rel=1e-6)
    assert stats.curve_optimum(lrs, [-x for x in range(6)])["at_edge"] == "high"
    assert stats.curve_optimum(lrs, list(range(6)))["at_edge"] == "low"


def test_crossing_in_log_x_matches_brute_force():
    x = [2.0, 8.0, 32.0]
    y = [3.2, 3.0, 2.95]
    for target in (3.1, 3.0, 2.97):
        got = stats.crossing_log_x(x, y, target)["x"]
        grid = np.exp(np.linspace(np.log(2), np.log(32), 200001))
        curve = np.interp(np.log(grid), np.log(x), y)
        ref = grid[np.argmin(np.abs(curve - target))]
        assert got == pytest.approx(ref, rel=1e-4)
    out = stats.crossing_log_x(x, y, 2.90)
    assert out["extrapolated"] and out["x"] == pytest.approx(32 * 4 ** 1.0, rel=1e-9)


def test_bootstrap_percentiles_over_units():
    vals = np.array([1.0, 2.0, 3.0, 4.0])
    b = stats.bootstrap(4, lambda idx: vals[idx].mean(), reps=4000, seed=3, conf=0.9)
    rng = np.random.default_rng(3)
    ref = [vals[rng.integers(0, 4, 4)].mean() for _ in range(4000)]
    assert (b["lo"], b["hi"]) == pytest.approx(tuple(np.quantile(ref, [0.05, 0.95])))
