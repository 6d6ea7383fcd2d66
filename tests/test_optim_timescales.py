"""ema_coefficients and the tau helpers against brute-force float64 recursions."""

import numpy as np
import pytest

from btlm_jax.optim import timescales
from btlm_jax.optim.timescales import ema_coefficients


def brute_force_coefficients(lrs, wd):
    """Unrolls theta_t = (1 - a_t) theta_{t-1} + a_t x_t symbolically: w[i] = weight of x_i."""
    T = len(lrs)
    w = np.zeros(T + 1)
    w[0] = 1.0
    for t in range(1, T + 1):
        a = lrs[t - 1] * wd
        w[:t] *= 1.0 - a
        w[t] = a
    return w


@pytest.mark.parametrize("shape", ["d2z", "constant", "step", "random"])
def test_ema_coefficients_match_unrolling(shape):
    T, peak, wd = 300, 0.02, 0.5
    t = np.arange(T, dtype=np.float64)
    lrs = {
        "d2z": peak * (1 - t / T),
        "constant": np.full(T, peak),
        "step": peak * np.where(t < T / 2, 1.0, 0.1),
        "random": np.random.default_rng(0).uniform(0, 2 * peak, T),
    }[shape]
    c = ema_coefficients(lrs, wd)
    assert c.dtype == np.float64 and c.shape == (T + 1,)
    np.testing.assert_allclose(c, brute_force_coefficients(lrs, wd), rtol=1e-12, atol=1e-300)
    assert c.sum() == pytest.approx(1.0, abs=1e-12)
    # the coefficients really reproduce the EMA of arbitrary targets
    rng = np.random.default_rng(1)
    theta0, xs = rng.normal(), rng.normal(size=T)
    theta = theta0
    for i in range(T):
        a = lrs[i] * wd
        theta = (1 - a) * theta + a * xs[i]
    assert c @ np.concatenate([[theta0], xs]) == pytest.approx(theta, rel=1e-12, abs=1e-15)
    np.testing.assert_allclose(timescales.init_weight(lrs, wd)[-1], c[0], rtol=1e-12)


def test_constant_lr_closed_form():
    a, T = 0.01, 500
    c = ema_coefficients(np.full(T, a / 0.1), 0.1)
    assert c[0] == pytest.approx((1 - a) ** T, rel=1e-12)
    i = np.arange(1, T + 1)
    np.testing.assert_allclose(c[1:], a * (1 - a) ** (T - i), rtol=1e-12)


def test_ema_coefficients_errors():
    with pytest.raises(ValueError, match="alpha_t <= 1"):
        ema_coefficients([0.5, 20.0], 0.1)
    with pytest.raises(ValueError, match="1-D"):
        ema_coefficients(np.ones((2, 2)), 0.1)


def test_tau_helpers():
    assert timescales.tau_iter(1e-3, 0.1) == pytest.approx(1e4)
    assert timescales.tau_iter(0.0, 0.1) == np.inf
    assert timescales.tau_over_T(1e-3, 0.1, 20_000) == pytest.approx(0.5)
    # Power Lines: tau = B / (eta lambda D); 512 sequences, D = 1e6 sequences
    assert timescales.power_lines_tau(512, 1e-3, 0.1, 1e6) == pytest.approx(512 / (1e-4 * 1e6))
    lam = timescales.weight_decay_for_tau(0.2, 1024, 2e-3, 5e6)
    assert timescales.power_lines_tau(1024, 2e-3, lam, 5e6) == pytest.approx(0.2)
    # doubling the batch at fixed tau and eta doubles lambda
    assert timescales.weight_decay_for_tau(0.2, 2048, 2e-3, 5e6) == pytest.approx(2 * lam)
    assert timescales.scale_tau(0.3, 20, 80) == pytest.approx(0.3 * 4 ** -0.53)
