"""muP hyperparameter transfer: a peak-LR sweep at several widths, muP vs standard
parametrisation (SP).

    python -m experiments.mup [--out DIR] [--data GLOB] [--scale S] [--workers N] [--slurm]

Claim (BTLM; Yang et al., Tensor Programs V): under muP the best LR stays put as the model
widens; under SP it drifts (usually down). muP here is BTLM's: base width = the narrowest width,
hidden-matrix init and LR scaled by 1/width multiplier, embedding x 14.6, logits x 2.22/w,
attention 1/d_head; SP: init std 0.02, one LR, 1/sqrt(d_head). The model and grid are
``configs/experiments/mup.py``. Writes ``OUT/results.jsonl``,
``OUT/summary.json``, ``OUT/figures/mup_lr_transfer.png`` and ``OUT/figures/mup_coord_check.png``.

Default (scale 1; 80 runs plus 16 from extending edge optima took 35 minutes with 2 workers on
a 2-core CPU): widths 32, 64, 128, 256 (an 8x range) with 4 heads at every width (2 layers,
vocabulary 1024), 5 peak LRs a factor 2 apart from 1.25e-3 to 2e-2 (extended past an edge
optimum, up to 2 rounds), seeds 0 and 1, 600 steps of 8 x 64 tokens with 10% warmup, D2Z
schedule. Per width the optimum is the vertex of a parabola in log2 LR with a bootstrap interval
over seeds; the drift is the slope of log2 best LR against log2 width (doublings per width
doubling) with bootstrap and OLS intervals. Beside it, the coordinate check on the same model at
the same widths (``OUT/figures/mup_coord_check.png``, ``OUT/coord_check.json``).
``--scale S`` multiplies the widths and the steps.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Sequence

from btlm_jax.experiments import recipes, runner, stats


# ----------------------------------------------------------------------------------------------
# Analysis (also used by notebooks/repro_mup.ipynb).


def _loss(r: dict) -> float:
    v = r.get("final", {}).get("eval_loss") if r.get("status") == "ok" else None
    return float(v) if v is not None and math.isfinite(v) else math.inf


def best_lr(points: Sequence[tuple[float, float]]) -> dict:
    """Grid argmin and the vertex of a parabola in log2(LR) through it and up to two neighbours
    each side (:func:`btlm_jax.experiments.stats.curve_optimum`)."""
    lrs, losses = zip(*points) if points else ((), ())
    return stats.curve_optimum(lrs, losses)


def loss_table(results: Sequence[dict]) -> dict:
    """{param: {width: {peak_lr: {seed: loss}}}} (diverged: inf)."""
    return recipes.loss_table(results, "param", "width", _loss)


def _optimum(curve: dict, seeds: Sequence) -> dict:
    """Optimum of the mean over ``seeds`` (a list, repeats allowed: a bootstrap resample)."""
    lrs = sorted(curve)
    mean = [sum(curve[lr][s] for s in seeds) / len(seeds) for lr in lrs]
    return stats.curve_optimum(lrs, mean)


def summarize(results: Sequence[dict], conf: float = stats.CONF, reps: int = 1000,
              tol: float = 0.25) -> dict:
    """Per parametrisation and width: the optimum LR (parabola vertex in log2 LR of the seed-mean
    curve) with a bootstrap interval over seeds and the fit's own standard error; the drift
    (slope of log2 best LR against log2 width: doublings of the LR per doubling of the width)
    with a bootstrap interval (the same seed resample at every width) and the OLS t-interval.
    Verdicts: SP drifts (slope interval below 0), muP stays put (interval within +-``tol``),
    muP drifts less than SP (interval of |SP slope| - |muP slope| above 0)."""
    import numpy as np

    table = loss_table(results)
    out: dict = {"conf": conf, "tolerance": tol}
    boot_slopes: dict = {}
    for param in ("mup", "sp"):
        if param not in table:
            continue
        widths = sorted(table[param])
        seeds = sorted(set.intersection(*(set(v) for w in widths
                                          for v in table[param][w].values())))
        best = {}
        for w in widths:
            b = _optimum(table[param][w], seeds)
            bs = stats.bootstrap(len(seeds), lambda idx, w=w: _optimum(
                table[param][w], [seeds[i] for i in idx])["log2_fit"], reps=reps, conf=conf)
            best[str(w)] = {**b, "boot_lo_log2": bs["lo"], "boot_hi_log2": bs["hi"]}
        x = [math.log2(w) for w in widths]
        y = [best[str(w)]["log2_fit"] for w in widths]
        ols = stats.slope_interval(x, y, conf)

        def slope_of(idx, param=param, widths=widths, seeds=seeds):
            ys = [_optimum(table[param][w], [seeds[i] for i in idx])["log2_fit"] for w in widths]
            return stats.slope_interval([math.log2(w) for w in widths], ys)["slope"]

        rng = np.random.default_rng(0)
        idxs = [rng.integers(0, len(seeds), len(seeds)) for _ in range(reps)]
        boot_slopes[param] = np.array([slope_of(i) for i in idxs])
        q = (1 - conf) / 2
        bsl = boot_slopes[param]
        drift = {"slope": ols["slope"], "ols_lo": ols["lo"], "ols_hi": ols["hi"],
                 "boot_lo": float(np.nanquantile(bsl, q)), "boot_hi": float(np.nanquantile(bsl, 1 - q))}
        # the wider of the two intervals: seed noise (bootstrap) and lack of fit (OLS)
        drift["lo"] = float(np.nanmin([drift["boot_lo"], drift["ols_lo"]]))
        drift["hi"] = float(np.nanmax([drift["boot_hi"], drift["ols_hi"]]))
        edges = [w for w in widths if best[str(w)]["at_edge"]]
        out[param] = {"widths": widths, "seeds": seeds, "best": best, "drift": drift,
                      "edge_widths": edges,
                      "drift_log2": y[-1] - y[0] if len(y) > 1 else None,
                      "spread_log2": max(y) - min(y) if y else None}
    if "sp" in out:
        d = out["sp"]["drift"]
        out["sp_drifts"] = stats.verdict(d["lo"], d["hi"], positive=False)
    if "mup" in out:
        d = out["mup"]["drift"]
        out["mup_stable"] = ("holds" if -tol < d["lo"] and d["hi"] < tol else "does not hold"
                             if d["lo"] > tol or d["hi"] < -tol else "inconclusive")
    if "mup" in boot_slopes and "sp" in boot_slopes:
        diff = np.abs(boot_slopes["sp"]) - np.abs(boot_slopes["mup"])
        q = (1 - conf) / 2
        lo, hi = float(np.nanquantile(diff, q)), float(np.nanquantile(diff, 1 - q))
        out["mup_drifts_less"] = {"lo": lo, "hi": hi, "verdict": stats.verdict(lo, hi)}
    for param, key in (("sp", "sp_drifts"), ("mup", "mup_stable")):
        if key in out and out[param]["edge_widths"]:  # an edge optimum bounds, not locates
            out[key] = "inconclusive"
    if "mup_drifts_less" in out and (out["mup"]["edge_widths"] or out["sp"]["edge_widths"]):
        out["mup_drifts_less"]["verdict"] = "inconclusive"
    parts = [out.get("mup_stable"), out.get("mup_drifts_less", {}).get("verdict")]
    out["claim"] = ("holds" if parts == ["holds", "holds"] else "does not hold"
                    if "does not hold" in parts else "inconclusive")
    out["claim_held"] = out["claim"] == "holds"
    return out


def plot(results: Sequence[dict], summary: dict, fig_dir: Path, prefix: str = "mup") -> list[str]:
    import numpy as np

    plt = recipes.pyplot()
    table = loss_table(results)
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.2))
    for ax, param, title in zip(axes, ("sp", "mup"), ("SP", "muP")):
        s = summary.get(param)
        if not s:
            continue
        for i, w in enumerate(s["widths"]):
            c = table[param][w]
            lrs = sorted(c)
            ms = [stats.mean_se([v for v in c[lr].values() if math.isfinite(v)]) for lr in lrs]
            pts = [(lr, m["mean"], m["se"] if m["n"] > 1 else 0.0) for lr, m in zip(lrs, ms)
                   if m["n"] and math.isfinite(m["mean"])]
            if pts:
                x, y, e = zip(*pts)
                ax.errorbar(x, y, yerr=e, fmt="o-", color=f"C{i}", label=f"width {w}", ms=4,
                            capsize=2)
            b = s["best"][str(w)]
            if b["fit"]:
                ax.axvline(b["fit"], color=f"C{i}", ls=":", lw=1)
        ax.set_xscale("log", base=2)
        ax.xaxis.set_minor_formatter(plt.NullFormatter())
        d = s["drift"]
        recipes.finish_axes(ax, "peak learning rate", "validation loss (mean +- s.e.)",
                            f"{title}: best LR drifts {d['slope']:+.2f} doublings\n"
                            f"per width doubling [{d['lo']:+.2f}, {d['hi']:+.2f}]")
    ax = axes[2]
    for k, (param, col) in enumerate((("sp", "C0"), ("mup", "C3"))):
        s = summary.get(param)
        if not s:
            continue
        w = np.array(s["widths"], float) * (1 + 0.03 * (k - 0.5))
        y = np.array([s["best"][str(x)]["log2_fit"] for x in s["widths"]])
        lo = np.array([s["best"][str(x)]["boot_lo_log2"] for x in s["widths"]])
        hi = np.array([s["best"][str(x)]["boot_hi_log2"] for x in s["widths"]])
        err = np.nan_to_num(np.stack([y - lo, hi - y]), nan=0.0).clip(min=0)
        d = s["drift"]
        ax.errorbar(w, y, yerr=err, fmt="o-", color=col, capsize=3,
                    label=f"{param}: {d['slope']:+.2f} [{d['lo']:+.2f}, {d['hi']:+.2f}]")
    ax.set_xscale("log", base=2)
    recipes.finish_axes(ax, "width", "log2 best peak LR (parabola fit)",
                        f"best LR vs width\n({100 * summary['conf']:.0f}% bootstrap over seeds)")
    paths = [recipes.save_figure(fig, fig_dir, f"{prefix}_lr_transfer.png")]
    return paths


def report(summary: dict) -> str:
    pc = f"{100 * summary['conf']:.0f}%"
    lines = []
    for param in ("mup", "sp"):
        s = summary.get(param)
        if not s:
            continue
        lines.append(f"{param} (seeds {s['seeds']}):")
        for w in s["widths"]:
            b = s["best"][str(w)]
            edge = f" [optimum on the grid's {b['at_edge']} edge]" if b["at_edge"] else ""
            lines.append(f"  width {w:>4}: best LR {b['fit']:.3g} (log2 {b['log2_fit']:+.2f}, {pc} "
                         f"bootstrap [{b['boot_lo_log2']:+.2f}, {b['boot_hi_log2']:+.2f}], fit "
                         f"s.e. {b['fit_se_log2']:.2f}; grid {b['grid']:.3g}, loss "
                         f"{b['loss']:.4f}){edge}")
        d = s["drift"]
        lines.append(f"  drift: {d['slope']:+.3f} doublings of the best LR per width doubling, {pc} "
                     f"interval [{d['lo']:+.3f}, {d['hi']:+.3f}] (bootstrap [{d['boot_lo']:+.3f}, "
                     f"{d['boot_hi']:+.3f}], OLS [{d['ols_lo']:+.3f}, {d['ols_hi']:+.3f}])")
    edges = [f"{p} width {w}" for p in ("mup", "sp") for w in summary.get(p, {}).get("edge_widths", [])]
    if edges:
        lines.append("optimum on the LR grid's edge (verdicts involving it: inconclusive; extend "
                     "with --lrs or --extend-rounds): " + ", ".join(edges))
    if "sp_drifts" in summary:
        lines.append(f"SP's best LR falls with width: {summary['sp_drifts']}")
    if "mup_stable" in summary:
        lines.append(f"muP's best LR stays within +-{summary['tolerance']} doublings per width "
                     f"doubling: {summary['mup_stable']}")
    if "mup_drifts_less" in summary:
        m = summary["mup_drifts_less"]
        lines.append(f"muP drifts less than SP (|SP slope| - |muP slope| in [{m['lo']:+.3f}, "
                     f"{m['hi']:+.3f}]): {m['verdict']}")
    return recipes.verdict(lines, "claim (muP's best LR transfers across widths, better than SP's)",
                           summary["claim"])


def coord_check(info: dict, out: Path, summary: dict, steps: int = 8) -> dict | None:
    """The muP coordinate check beside the sweep, on the sweep's own model at its widths: mean
    |activation| per layer against width after ``steps`` AdamW steps at one LR (muP's best LR at
    the base width, else the config's), once under muP and once under SP
    (:mod:`btlm_jax.experiments.coord_check`). Writes ``OUT/coord_check.json`` (reused while the
    widths, LR and steps are unchanged) and ``OUT/figures/mup_coord_check.png``; returns those
    settings with the per-layer slopes of log size against log width at the last step (0: width
    independent) and the figure's path, or None without two widths."""
    import json

    from btlm_jax.cli.overrides import load_config
    from btlm_jax.experiments import coord_check as cc

    widths = [int(w) for w in info.get("widths", [])]
    if len(widths) < 2 or not info.get("config"):
        return None
    base = summary.get("mup", {}).get("best", {}).get(str(widths[0]))
    cfg = load_config(info["config"])
    lr = float(base["fit"]) if base and base.get("fit") else float(cfg.optim.peak_lr)
    cfg.optim.peak_lr = lr
    key = {"widths": widths, "lr": lr, "steps": int(steps), "config": info["config"]}
    path = Path(out) / "coord_check.json"
    saved = json.loads(path.read_text()) if path.exists() else {}
    if {k: saved.get(k) for k in key} == key:
        res = {p: {int(w): v for w, v in by.items()} for p, by in saved["results"].items()}
    else:
        res = cc.coord_check(cfg, widths, steps=int(steps))
        res = {p: {w: [{k: float(v) for k, v in row.items()} for row in rows]
                   for w, rows in by.items()} for p, by in res.items()}
        path.write_text(json.dumps({**key, "results": res}, indent=1))
    fig_dir = Path(out) / "figures"
    fig_dir.mkdir(parents=True, exist_ok=True)
    cc.plot(res, str(fig_dir / "mup_coord_check.png"))
    return {**key, "slopes_last_step": cc.slopes(res),
            "figure": str(fig_dir / "mup_coord_check.png")}


def coord_report(cc_summary: dict | None) -> str:
    from btlm_jax.experiments import coord_check as cc

    if not cc_summary:
        return "coordinate check: not run"
    return "\n".join([f"coordinate check (widths {cc_summary['widths']}, {cc_summary['steps']} "
                      f"steps at LR {cc_summary['lr']:.3g}): slope of log mean|x| against log "
                      f"width at the last step (0 = width independent)",
                      *cc.slope_lines(cc_summary["slopes_last_step"])])


def analyze(results: Sequence[dict], info: dict, out: Path) -> tuple[dict, list[str], str]:
    """The runner's analysis step: summary, figures (the LR transfer and the coordinate check
    at the sweep's widths), report."""
    summary = summarize(results)
    figures = plot(results, summary, Path(out) / "figures")
    summary["coord_check"] = coord_check(info, out, summary, steps=2 if info.get("smoke") else 8)
    if summary["coord_check"]:
        figures.append(summary["coord_check"]["figure"])
    return summary, figures, report(summary) + "\n" + coord_report(summary["coord_check"])


def main(argv: Sequence[str] | None = None) -> int:
    return runner.main("mup", argv)


if __name__ == "__main__":
    sys.exit(main())
