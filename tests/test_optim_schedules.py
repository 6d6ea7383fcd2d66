"""Schedules against their closed forms (float64 NumPy written here, not the module's code)."""

import math

import numpy as np
import pytest

from btlm_jax.optim import SCHEDULES, schedule, timescales

PEAK, T, W = 3e-3, 1000, 100


def closed_form(name, s, peak=PEAK, total=T, warm=W, ratio=10.0, final=None, cooldown=0.2,
                fractions=(0.5, 0.75), factor=0.1):
    s = float(s)
    if warm and s < warm:
        return peak * s / warm
    p = min(max((s - warm) / (total - warm), 0.0), 1.0)
    if name == "constant":
        return peak
    if name == "d2z":
        return peak * (1 - p)
    if name in ("linear_10x", "linear"):
        end = peak / ratio if final is None else final
        return peak - (peak - end) * p
    if name == "cosine_10x":
        end = peak / ratio
        return end + (peak - end) * (1 + math.cos(math.pi * p)) / 2
    if name == "cosine_d2z":
        return peak * (1 + math.cos(math.pi * p)) / 2
    if name == "step":
        return peak * factor ** sum(s >= f * total for f in fractions)
    if name == "wsd":
        start = total * (1 - cooldown)
        return peak if s < start else peak * max(0.0, (total - s) / (total - start))
    if name == "inv_sqrt":
        return peak * math.sqrt(max(warm, 1) / max(s, warm, 1))
    raise KeyError(name)


def test_all_names_present():
    assert set(SCHEDULES) == {"constant", "d2z", "linear", "linear_10x", "cosine_10x",
                              "cosine_d2z", "step", "wsd", "inv_sqrt"}


@pytest.mark.parametrize("name", sorted(SCHEDULES))
def test_closed_form_at_key_steps(name):
    f = schedule(name, peak_lr=PEAK, total_steps=T, warmup_steps=W)
    mid = (W + T) // 2
    # warmup middle, warmup end, decay midpoint, end, past the end, plus shape-specific points
    steps = [0, W // 2, W, mid, T - 1, T, T + 50, 499, 500, 749, 750, 800, 900, 400]
    got = np.asarray(f(np.asarray(steps)), np.float64)
    want = np.array([closed_form(name, s) for s in steps])
    np.testing.assert_allclose(got, want, rtol=2e-6, atol=1e-12)
    assert float(f(W)) == pytest.approx(PEAK, rel=1e-6)  # warmup ends at the peak
    one_by_one = np.array([float(f(s)) for s in steps])
    np.testing.assert_allclose(one_by_one, got, rtol=1e-6)


def test_key_values_by_hand():
    d2z = schedule("d2z", peak_lr=PEAK, total_steps=T, warmup_steps=W)
    assert float(d2z(T)) == 0.0
    assert float(d2z(550)) == pytest.approx(PEAK / 2, rel=1e-6)
    l10 = schedule("linear_10x", peak_lr=PEAK, total_steps=T, warmup_steps=W)
    assert float(l10(T)) == pytest.approx(PEAK / 10, rel=1e-6)
    c100 = schedule("cosine_10x", peak_lr=PEAK, total_steps=T, warmup_steps=W, decay_ratio=100.0)
    assert float(c100(T)) == pytest.approx(PEAK / 100, rel=1e-5)
    assert float(c100(550)) == pytest.approx((PEAK + PEAK / 100) / 2, rel=1e-6)
    wsd = schedule("wsd", peak_lr=PEAK, total_steps=T, warmup_steps=W, cooldown_fraction=0.1)
    assert float(wsd(899)) == pytest.approx(PEAK, rel=1e-7)
    assert float(wsd(950)) == pytest.approx(PEAK / 2, rel=1e-6)
    st = schedule("step", peak_lr=PEAK, total_steps=T, warmup_steps=W, step_fractions=(0.3,),
                  step_factor=0.5)
    assert float(st(299)) == pytest.approx(PEAK) and float(st(300)) == pytest.approx(PEAK / 2)


def test_btlm_schedule():
    """BTLM-3B-8K: warmup 95 steps to 1.2e-2, linear to 1.0e-4 at step 159,541."""
    total, warm, peak, final = 159_541, 95, 1.2e-2, 1.0e-4
    f = schedule("linear", peak_lr=peak, total_steps=total, warmup_steps=warm, final_lr=final)
    assert float(f(warm)) == pytest.approx(peak, rel=1e-6)
    assert float(f(total)) == pytest.approx(final, rel=1e-5)
    mid = (warm + total) / 2  # 79,818
    assert float(f(mid)) == pytest.approx((peak + final) / 2, rel=1e-5)
    assert float(f(47)) == pytest.approx(peak * 47 / 95, rel=1e-6)
    # phase boundary (step 119,727): one schedule across both phases
    assert float(f(119_727)) == pytest.approx(
        closed_form("linear", 119_727, peak=peak, total=total, warm=warm, final=final), rel=1e-5)


def test_no_warmup_and_lr_sequence():
    f = schedule("d2z", peak_lr=1.0, total_steps=4, warmup_steps=0)
    np.testing.assert_allclose(timescales.lr_sequence(f, 4), [1.0, 0.75, 0.5, 0.25])


@pytest.mark.parametrize("kwargs, needle", [
    (dict(name="nope"), "schedule='nope'"),
    (dict(name="d2z", bogus=1), "bogus"),
    (dict(name="d2z", peak_lr=-1.0), "peak_lr"),
    (dict(name="d2z", warmup_steps=2000), "warmup_steps"),
    (dict(name="wsd", cooldown_fraction=0.95), "cooldown_fraction"),
    (dict(name="step", step_fractions=(0.8, 0.2)), "step_fractions"),
    (dict(name="linear_10x", decay_ratio=0.5), "decay_ratio"),
    (dict(name="linear", final_lr=1.0), "final_lr"),
])
def test_errors_name_the_option(kwargs, needle):
    args = dict(peak_lr=PEAK, total_steps=T, warmup_steps=W)
    args.update(kwargs)
    name = args.pop("name")
    with pytest.raises(ValueError, match=needle):
        schedule(name, **args)
