"""muP hyperparameter transfer: a peak-LR sweep at several widths, muP vs standard
parametrisation (SP).

    python -m experiments.mup [--out DIR] [--data GLOB] [--scale S] [--workers N] [--slurm]

Claim (BTLM; Yang et al., Tensor Programs V): under muP the best LR stays put as the model
widens; under SP it drifts (usually down). muP here is BTLM's: base width = the narrowest width,
hidden-matrix init and LR scaled by 1/width multiplier, embedding x 14.6, logits x 2.22/w,
attention 1/d_head; SP: init std 0.02, one LR, 1/sqrt(d_head). The model and grid are
``configs/experiments/mup.py``. Writes ``OUT/results.jsonl``,
``OUT/summary.json`` and ``OUT/figures/mup_lr_transfer.png``.

Default (scale 1, about 25 minutes on an idle 2-core CPU): widths 64, 128, 256 (2 layers,
vocabulary 1024), 6 peak LRs from 1.25e-3 to 4e-2, 150 steps of 16 x 128 tokens, D2Z schedule.
``--scale S`` multiplies the widths and the steps.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Sequence

from btlm_jax.experiments import recipes, runner


# ----------------------------------------------------------------------------------------------
# Analysis (also used by notebooks/repro_mup.ipynb).


def _loss(r: dict) -> float:
    v = r.get("final", {}).get("eval_loss") if r.get("status") == "ok" else None
    return float(v) if v is not None and math.isfinite(v) else math.inf


def best_lr(points: Sequence[tuple[float, float]]) -> dict:
    """Grid argmin, and the vertex of a parabola in log2(LR) through it and its neighbours
    (clipped to the grid; the grid point itself at an edge or when the fit is not convex)."""
    pts = sorted((lr, l) for lr, l in points)
    finite = [(lr, l) for lr, l in pts if math.isfinite(l)]
    if not finite:
        return {"grid": None, "fit": None, "loss": math.inf, "at_edge": True}
    i = min(range(len(pts)), key=lambda k: pts[k][1])
    lr, loss = pts[i]
    fit = lr
    if 0 < i < len(pts) - 1 and all(math.isfinite(pts[k][1]) for k in (i - 1, i + 1)):
        x = [math.log2(pts[k][0]) for k in (i - 1, i, i + 1)]
        y = [pts[k][1] for k in (i - 1, i, i + 1)]
        den = (x[0] - x[1]) * (x[0] - x[2]) * (x[1] - x[2])
        a = (x[2] * (y[1] - y[0]) + x[1] * (y[0] - y[2]) + x[0] * (y[2] - y[1])) / den
        b = (x[2] ** 2 * (y[0] - y[1]) + x[1] ** 2 * (y[2] - y[0]) + x[0] ** 2 * (y[1] - y[2])) / den
        if a > 0:
            fit = 2 ** min(max(-b / (2 * a), x[0]), x[2])
    return {"grid": lr, "fit": fit, "loss": loss, "at_edge": i in (0, len(pts) - 1)}


def summarize(results: Sequence[dict]) -> dict:
    out = {}
    for param in ("mup", "sp"):
        rs = [r for r in results if r["meta"]["param"] == param]
        widths = sorted({r["meta"]["width"] for r in rs})
        best = {}
        for w in widths:
            best[str(w)] = best_lr([(r["meta"]["peak_lr"], _loss(r)) for r in rs
                                    if r["meta"]["width"] == w])
        drift = None
        if len(widths) >= 2 and all(best[str(w)]["fit"] for w in widths):
            lo, hi = best[str(widths[0])]["fit"], best[str(widths[-1])]["fit"]
            drift = math.log2(hi / lo)  # doublings of the best LR from narrowest to widest
        spread = None
        if widths and all(best[str(w)]["fit"] for w in widths):
            logs = [math.log2(best[str(w)]["fit"]) for w in widths]
            spread = max(logs) - min(logs)
        out[param] = {"widths": widths, "best": best, "drift_log2": drift, "spread_log2": spread}
    m, s = out.get("mup", {}), out.get("sp", {})
    held = (m.get("spread_log2") is not None and s.get("spread_log2") is not None
            and m["spread_log2"] <= 1.0 and s["spread_log2"] > m["spread_log2"])
    out["claim_held"] = bool(held)
    return out


def plot(results: Sequence[dict], summary: dict, fig_dir: Path, prefix: str = "mup") -> list[str]:
    plt = recipes.pyplot()

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.9), sharey=True)
    for ax, param, title in zip(axes, ("sp", "mup"), ("standard parametrisation", "muP")):
        widths = summary.get(param, {}).get("widths", [])
        for i, w in enumerate(widths):
            pts = sorted((r["meta"]["peak_lr"], _loss(r)) for r in results
                         if r["meta"]["param"] == param and r["meta"]["width"] == w)
            pts = [(x, y) for x, y in pts if math.isfinite(y)]
            if pts:
                ax.plot(*zip(*pts), "o-", color=f"C{i}", label=f"width {w}", ms=4)
            b = summary[param]["best"][str(w)]
            if b["fit"]:
                ax.axvline(b["fit"], color=f"C{i}", ls=":", lw=1)
        ax.set_xscale("log")
        d = summary.get(param, {}).get("drift_log2")
        recipes.finish_axes(ax, "peak learning rate", title=f"{title}" + (
            f" (best-LR drift {d:+.2f} doublings)" if d is not None else ""))
    axes[0].set_ylabel("validation loss")
    paths = [recipes.save_figure(fig, fig_dir, f"{prefix}_lr_transfer.png")]
    return paths


def report(summary: dict) -> str:
    lines = []
    for param in ("mup", "sp"):
        s = summary.get(param)
        if not s:
            continue
        lines.append(f"{param}: " + "; ".join(
            f"width {w}: best LR {s['best'][str(w)]['fit']:.3g} (grid {s['best'][str(w)]['grid']:.3g}, "
            f"loss {s['best'][str(w)]['loss']:.4f})" for w in s["widths"]
            if s["best"][str(w)]["fit"]))
        if s["drift_log2"] is not None:
            lines.append(f"  best-LR drift narrowest->widest {s['drift_log2']:+.2f} doublings, "
                         f"spread {s['spread_log2']:.2f}")
    return recipes.verdict(lines, "best LR stable under muP (spread <= 1 doubling) and less "
                           "stable under SP", summary["claim_held"])


def analyze(results: Sequence[dict], info: dict, out: Path) -> tuple[dict, list[str], str]:
    """The runner's analysis step: summary, figures, report."""
    summary = summarize(results)
    return summary, plot(results, summary, Path(out) / "figures"), report(summary)


def main(argv: Sequence[str] | None = None) -> int:
    return runner.main("mup", argv)


if __name__ == "__main__":
    sys.exit(main())
