"""Statistics of the reproductions: means with standard errors over seeds, t-intervals of paired
differences, regression slopes with intervals, a crossing point interpolated in log x, and the
optimum of a loss-vs-log-LR curve from a parabola fit (with its uncertainty), plus the LR-grid
extension rule of the sweeps (an optimum on the grid's edge asks for one more LR beyond it).

Every interval is two-sided at ``conf`` (default 0.95). A verdict from an interval is
:func:`verdict`: "holds" when the whole interval is on the claimed side, "does not hold" when it is
wholly on the other side, else "inconclusive".
"""

from __future__ import annotations

import math
from typing import Callable, Mapping, Sequence

import numpy as np

CONF = 0.95


def _t(conf: float, dof: int) -> float:
    from scipy import stats

    return float(stats.t.ppf(0.5 + conf / 2, dof))


def mean_se(values: Sequence[float]) -> dict:
    """Mean, standard error (sample std / sqrt n; NaN for one value) and n."""
    x = np.asarray(values, np.float64)
    n = int(x.size)
    if n == 0:
        return {"mean": math.nan, "se": math.nan, "n": 0}
    se = float(x.std(ddof=1) / math.sqrt(n)) if n > 1 else math.nan
    return {"mean": float(x.mean()), "se": se, "n": n}


def t_interval(values: Sequence[float], conf: float = CONF) -> dict:
    """Mean and its Student-t interval (``lo``, ``hi``; NaN with fewer than two values)."""
    m = mean_se(values)
    if m["n"] < 2:
        return {**m, "lo": math.nan, "hi": math.nan, "conf": conf}
    h = _t(conf, m["n"] - 1) * m["se"]
    return {**m, "lo": m["mean"] - h, "hi": m["mean"] + h, "conf": conf}


def paired_interval(a: Sequence[float], b: Sequence[float], conf: float = CONF) -> dict:
    """t-interval of the per-pair differences ``a - b`` (pairs: the same seed)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape:
        raise ValueError(f"paired_interval: {a.shape} vs {b.shape} values")
    return t_interval(a - b, conf)


def clopper_pearson(k: int, n: int, conf: float = CONF) -> tuple[float, float]:
    """Exact (Clopper-Pearson) interval of a binomial proportion with ``k`` successes of ``n``."""
    from scipy.stats import beta

    if n <= 0:
        return float("nan"), float("nan")
    a = (1 - conf) / 2
    lo = 0.0 if k <= 0 else float(beta.ppf(a, k, n - k + 1))
    hi = 1.0 if k >= n else float(beta.ppf(1 - a, k + 1, n - k))
    return lo, hi


def slope_interval(x: Sequence[float], y: Sequence[float], conf: float = CONF) -> dict:
    """Least-squares slope of ``y`` on ``x`` with its t-interval (n - 2 degrees of freedom)."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    n = int(x.size)
    if n < 2 or np.ptp(x) == 0:
        return {"slope": math.nan, "intercept": math.nan, "se": math.nan, "lo": math.nan,
                "hi": math.nan, "n": n, "conf": conf}
    xm, ym = x.mean(), y.mean()
    sxx = float(((x - xm) ** 2).sum())
    slope = float(((x - xm) * (y - ym)).sum() / sxx)
    icpt = float(ym - slope * xm)
    if n > 2:
        resid = y - (icpt + slope * x)
        se = math.sqrt(float((resid ** 2).sum()) / (n - 2) / sxx)
        h = _t(conf, n - 2) * se
    else:
        se = h = math.nan
    return {"slope": slope, "intercept": icpt, "se": se, "lo": slope - h, "hi": slope + h,
            "n": n, "conf": conf}


def verdict(lo: float, hi: float, positive: bool = True) -> str:
    """"holds" if the interval [lo, hi] lies wholly on the claimed side of 0 (above for
    ``positive``), "does not hold" if wholly on the other side, else "inconclusive"."""
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return "inconclusive"
    if not positive:
        lo, hi = -hi, -lo
    if lo > 0:
        return "holds"
    if hi < 0:
        return "does not hold"
    return "inconclusive"


def crossing_log_x(x: Sequence[float], y: Sequence[float], target: float) -> dict:
    """The ``x`` at which the piecewise-linear curve of ``y`` against log(x) first reaches
    ``target`` (``y`` is expected to fall with x). Beyond the measured range the end segment is
    extended (``extrapolated: True``); None when the curve never gets there (flat end)."""
    order = np.argsort(np.asarray(x, np.float64))
    lx = np.log(np.asarray(x, np.float64)[order])
    yy = np.asarray(y, np.float64)[order]
    if lx.size < 2:
        return {"x": None, "extrapolated": False}
    for i in range(lx.size - 1):
        y0, y1 = yy[i], yy[i + 1]
        if (y0 - target) * (y1 - target) <= 0 and y0 != y1:
            f = (target - y0) / (y1 - y0)
            return {"x": float(math.exp(lx[i] + f * (lx[i + 1] - lx[i]))), "extrapolated": False}
        if y0 == target:
            return {"x": float(math.exp(lx[i])), "extrapolated": False}
    # outside the range: extend the end segment nearer the target
    i = 0 if abs(yy[0] - target) < abs(yy[-1] - target) else lx.size - 2
    y0, y1 = yy[i], yy[i + 1]
    if y1 == y0:
        return {"x": None, "extrapolated": True}
    f = (target - y0) / (y1 - y0)
    return {"x": float(math.exp(lx[i] + f * (lx[i + 1] - lx[i]))), "extrapolated": True}


def parabola_vertex(x: Sequence[float], y: Sequence[float]) -> dict:
    """Least-squares parabola ``y = a x^2 + b x + c``; its vertex ``-b / 2a`` with the
    delta-method standard error from the fit's covariance (NaN with 3 points or a concave fit)."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    n = int(x.size)
    if n < 3:
        return {"vertex": math.nan, "se": math.nan, "a": math.nan, "convex": False}
    A = np.stack([x ** 2, x, np.ones_like(x)], 1)
    coef, *_ = np.linalg.lstsq(A, y, rcond=None)
    a, b, _ = (float(c) for c in coef)
    if a <= 0:
        return {"vertex": math.nan, "se": math.nan, "a": a, "b": b, "convex": False}
    v = -b / (2 * a)
    se = math.nan
    if n > 3:
        resid = y - A @ coef
        cov = np.linalg.inv(A.T @ A) * float((resid ** 2).sum()) / (n - 3)
        g = np.array([b / (2 * a * a), -1 / (2 * a), 0.0])  # d vertex / d (a, b, c)
        se = math.sqrt(max(float(g @ cov @ g), 0.0))
    return {"vertex": float(v), "se": se, "a": a, "b": b, "convex": True}


def curve_optimum(lrs: Sequence[float], losses: Sequence[float], window: int = 2) -> dict:
    """Optimum of a loss-vs-LR curve: the grid argmin, and the vertex of a parabola in log2(LR)
    fitted to it and up to ``window`` neighbours each side (clipped to the fitted range; the
    grid argmin when the fit is not convex or the argmin is on the grid's edge)."""
    pts = sorted((float(a), float(b)) for a, b in zip(lrs, losses) if math.isfinite(b))
    if not pts:
        return {"grid": None, "fit": None, "log2_fit": math.nan, "loss": math.inf,
                "at_edge": None}
    xs = np.log2([p[0] for p in pts])
    ys = np.array([p[1] for p in pts])
    i = int(np.argmin(ys))
    edge = "low" if i == 0 else "high" if i == len(pts) - 1 else None
    lo, hi = max(0, i - window), min(len(pts), i + window + 1)
    fit = parabola_vertex(xs[lo:hi], ys[lo:hi]) if edge is None else {"convex": False}
    if fit.get("convex"):
        v = float(np.clip(fit["vertex"], xs[lo], xs[hi - 1]))
    else:
        v = float(xs[i])
    return {"grid": pts[i][0], "fit": float(2 ** v), "log2_fit": v, "loss": float(ys[i]),
            "at_edge": edge, "fit_se_log2": fit.get("se", math.nan)}


def bootstrap(n_units: int, statistic: Callable[[np.ndarray], float], *, reps: int = 1000,
              seed: int = 0, conf: float = CONF) -> dict:
    """Percentile interval of ``statistic(indices)`` over resamples (with replacement) of
    ``n_units`` units (e.g. seeds); NaN statistics are dropped."""
    rng = np.random.default_rng(seed)
    vals = np.array([statistic(rng.integers(0, n_units, n_units)) for _ in range(reps)],
                    np.float64)
    vals = vals[np.isfinite(vals)]
    if vals.size == 0:
        return {"lo": math.nan, "hi": math.nan, "reps": 0}
    q = (1 - conf) / 2
    return {"lo": float(np.quantile(vals, q)), "hi": float(np.quantile(vals, 1 - q)),
            "reps": int(vals.size), "std": float(vals.std(ddof=1)) if vals.size > 1 else 0.0}


# ----------------------------------------------------------------------------------------------
# LR-grid extension (what the runner asks of an experiment's results).


def edge_extensions(curves: Mapping[tuple, Mapping[float, float]], factor: float = 2.0,
                    limit: tuple[float, float] = (1e-6, 10.0)) -> dict[tuple, list[float]]:
    """For each group's loss-vs-LR curve (``{lr: loss}``, e.g. averaged over seeds), the LRs to
    add: one step of ``factor`` beyond the edge the minimum lies on (within ``limit``). A curve
    whose largest LR diverged (non-finite) is not extended upward. Returns {group: [lr]}."""
    out: dict[tuple, list[float]] = {}
    for group, curve in curves.items():
        pts = sorted(curve.items())
        finite = [(lr, v) for lr, v in pts if math.isfinite(v)]
        if not finite:
            continue
        best = min(finite, key=lambda p: p[1])[0]
        lrs = [lr for lr, _ in pts]
        new = None
        if best == lrs[0]:
            new = lrs[0] / factor
        elif best == lrs[-1] and math.isfinite(pts[-1][1]):
            new = lrs[-1] * factor
        if new is not None and limit[0] <= new <= limit[1]:
            out[group] = [float(f"{new:.6g}")]
    return out
