"""Straight to Zero: linear decay-to-zero vs other LR schedules, over a peak-LR grid, at three
dataset sizes (tokens per parameter).

    python -m experiments.d2z [--out DIR] [--data GLOB] [--scale S] [--workers N] [--slurm]

Claim (Bergsma et al., "Straight to Zero"): at each schedule's best peak LR, linear D2Z reaches
the lowest validation loss, and its margin (over 10x linear decay) grows with tokens per
parameter. The model and grid are ``configs/experiments/d2z.py``. Writes ``OUT/results.jsonl``
(one line per run), ``OUT/ct_curves.jsonl`` (the EMA
coefficients c_{T,i} of each schedule at its best LR), ``OUT/summary.json`` and
``OUT/figures/d2z_loss_vs_lr.png``, ``OUT/figures/d2z_margin_vs_tpp.png``,
``OUT/figures/d2z_ct_curves.png``.

Default (scale 1; 144 runs plus 30 from extending edge optima took 71 minutes with 2 workers on
a 2-core CPU): a 58k-parameter model (width 32, 2 layers, vocabulary 1024, muP), sequences of
128, batch 16, 2, 8 and 32 tokens per parameter (57, 226 and 905 steps), 4 schedules x 4 peak LRs
a factor 2 apart (one more LR where a schedule's seed-mean optimum is on the grid's edge, up to 3
rounds), seeds 0, 1, 2, AdamW weight decay 1.0. Statistics: best-LR loss mean +- s.e. over seeds,
D2Z's margin as a t-interval of per-seed paired differences, the margin's slope against ln TPP
with its interval, and the TPP at which linear_10x reaches D2Z's loss (``summarize``).

Why weight decay 1.0 and not the paper's 0.1: in the paper's reading of AdamW as an EMA of updates
the regime is set by the timescale tau_iter = 1/(eta lambda) relative to the run length T. The
paper's runs (tens of thousands of steps at lambda 0.1) have tau_iter / T well below 1; a 649-step
CPU run at lambda 0.1 has tau_iter / T ~ 2.6 at the best peak LR, where the final weights are still
~80% the initialisation and the schedule barely matters (measured on the width-64 model of an
earlier default: experiments/results/d2z_wd0.1). lambda 1.0 puts tau_iter / T at 0.37 (2 TPP),
0.18 (8 TPP) and 0.09 (32 TPP) at the measured best peak LRs of the default, the paper's range. ``--wd`` sets it: for ``--scale`` runs of tens of thousands of steps, pass the
paper's ``--wd 0.1``. ``--scale S`` widens the model (width 32 S, 2 S layers,
vocabulary 1024 min(S, 8), batch 16 S) and raises the dataset sizes to 2 S, 8 S and 32 S tokens
per parameter (at most 20, 80 and 320); ``--tpp`` and ``--lrs`` set them directly.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Sequence

from btlm_jax.experiments import recipes, runner, stats
from btlm_jax.experiments.data import write_jsonl
from btlm_jax.cli.overrides import load_config

SCHEDULES = ("d2z", "linear_10x", "cosine_10x", "wsd", "constant")
COLORS = {"d2z": "C3", "linear_10x": "C0", "cosine_10x": "C2", "wsd": "C1", "constant": "C7"}


# ----------------------------------------------------------------------------------------------
# Analysis (also used by notebooks/repro_d2z.ipynb).


def _loss(r: dict) -> float:
    if r.get("status") != "ok":
        return math.inf
    v = r.get("final", {}).get("eval_loss")
    return float(v) if v is not None and math.isfinite(v) else math.inf


def loss_table(results: Sequence[dict]) -> dict:
    """{tpp: {schedule: {peak_lr: {seed: loss}}}} (a diverged run: inf)."""
    return recipes.loss_table(results, "tpp", "schedule", _loss)


def best_of(curve: dict) -> dict:
    """A schedule's best peak LR at one TPP: the argmin of the seed-mean loss over the LRs run
    with every seed; the per-seed losses there, their mean +- standard error, and whether the
    optimum is on the grid's edge."""
    seeds = sorted(set.intersection(*(set(v) for v in curve.values())))
    lrs = sorted(curve)
    mean = {lr: sum(curve[lr][s] for s in seeds) / len(seeds) for lr in lrs}
    lr = min(lrs, key=lambda x: mean[x])
    per_seed = {s: curve[lr][s] for s in seeds}
    return {"peak_lr": lr, "seeds": seeds, "per_seed": per_seed,
            **stats.mean_se(list(per_seed.values())),
            "at_edge": "low" if lr == lrs[0] else "high" if lr == lrs[-1] else None,
            "curve": {str(x): mean[x] for x in lrs}}


def _paired(best: dict, other: str, ref: str = "d2z", conf: float = stats.CONF) -> dict:
    """Per-seed ``other - ref`` at each one's best LR (positive: ``ref`` lower), t-interval."""
    seeds = sorted(set(best[other]["per_seed"]) & set(best[ref]["per_seed"]))
    a = [best[other]["per_seed"][s] for s in seeds]
    b = [best[ref]["per_seed"][s] for s in seeds]
    out = stats.paired_interval(a, b, conf)
    base = best[other]["mean"]
    return {**out, "pct": 100 * out["mean"] / base, "lo_pct": 100 * out["lo"] / base,
            "hi_pct": 100 * out["hi"] / base, "per_seed": dict(zip(map(str, seeds),
                                                                    (x - y for x, y in zip(a, b))))}


def summarize(results: Sequence[dict], conf: float = stats.CONF) -> dict:
    """Per TPP: each schedule's best-LR loss (mean +- s.e. over seeds), D2Z's margin over every
    other schedule (t-interval of per-seed paired differences) and the verdict "D2Z lowest";
    across TPP: the slope of the margin over linear_10x against ln(TPP) with its interval, and
    the TPP at which linear_10x reaches D2Z's loss (interpolated in log TPP)."""
    table = loss_table(results)
    tpps = sorted(table)
    per = {}
    for tpp in tpps:
        best = {s: best_of(c) for s, c in table[tpp].items()}
        ranking = sorted(best, key=lambda s: best[s]["mean"])
        entry = {"best": best, "ranking": ranking, "margins": {}}
        if "d2z" in best:
            entry["margins"] = {o: _paired(best, o, conf=conf) for o in best if o != "d2z"}
            vs = [stats.verdict(m["lo"], m["hi"]) for m in entry["margins"].values()]
            entry["d2z_lowest"] = ("does not hold" if "does not hold" in vs else "holds"
                                   if vs and all(v == "holds" for v in vs) else "inconclusive")
        per[str(tpp)] = entry
    out = {"tpp": tpps, "conf": conf, "per_tpp": per}
    xs, ys = [], []
    for tpp in tpps:
        m = per[str(tpp)]["margins"].get("linear_10x")
        if m:
            xs += [math.log(tpp)] * len(m["per_seed"])
            ys += list(m["per_seed"].values())
    slope = stats.slope_interval(xs, ys, conf)
    out["margin_slope_vs_ln_tpp"] = slope
    out["margin_grows"] = stats.verdict(slope["lo"], slope["hi"])
    saved = {}
    lin = [(t, per[str(t)]["best"]["linear_10x"]["mean"]) for t in tpps
           if "linear_10x" in per[str(t)]["best"]]
    for tpp in tpps:
        d = per[str(tpp)]["best"].get("d2z")
        if d and len(lin) >= 2:
            c = stats.crossing_log_x([t for t, _ in lin], [v for _, v in lin], d["mean"])
            saved[str(tpp)] = {**c, "ratio": c["x"] / tpp if c["x"] else None}
    out["compute_saved"] = saved
    verdicts = [per[str(t)].get("d2z_lowest", "inconclusive") for t in tpps]
    out["d2z_lowest_at_every_size"] = ("holds" if verdicts and all(v == "holds" for v in verdicts)
                                       else "does not hold" if "does not hold" in verdicts
                                       else "inconclusive")
    out["claim"] = ("holds" if out["d2z_lowest_at_every_size"] == "holds"
                    and out["margin_grows"] == "holds" else
                    "does not hold" if "does not hold" in (out["d2z_lowest_at_every_size"],
                                                           out["margin_grows"])
                    else "inconclusive")
    out["edge_optima"] = [f"{t:g} TPP {s}: {b['at_edge']}" for t in tpps
                          for s, b in per[str(t)]["best"].items() if b["at_edge"]]
    if out["edge_optima"] and out["claim"] == "holds":  # an edge optimum bounds, not locates
        out["claim"] = "inconclusive"
    out["claim_held"] = out["claim"] == "holds"
    return out


def ct_curves(results: Sequence[dict], summary: dict, max_points: int = 2000) -> list[dict]:
    """c_{T,i} of each schedule at its best peak LR at the largest dataset size."""
    import numpy as np

    from btlm_jax import optim
    from btlm_jax.optim.timescales import lr_sequence

    tpp = summary["tpp"][-1]
    best = summary["per_tpp"][str(tpp)]["best"]
    curves = []
    for sched, b in best.items():
        r = next(r for r in results if r["meta"]["tpp"] == tpp and r["meta"]["schedule"] == sched
                 and r["meta"]["peak_lr"] == b["peak_lr"] and r.get("status") == "ok")
        cfg = load_config(recipes.BASE_CONFIG, {k: v for k, v in r["overrides"].items()
                                                if k.startswith("optim.")})
        steps = int(r["steps"])
        lrs = lr_sequence(optim.build_schedule(cfg, steps), steps)
        wd = float(cfg.optim.weight_decay)
        c = optim.ema_coefficients(lrs, wd)
        idx = np.unique(np.linspace(0, steps, min(steps + 1, max_points)).round().astype(int))
        curves.append({"schedule": sched, "peak_lr": b["peak_lr"], "tpp": tpp, "steps": steps,
                       "weight_decay": wd, "i": idx.tolist(), "c": c[idx].tolist(),
                       "lr": np.concatenate([[0.0], lrs])[idx].tolist(),
                       "c_T0": float(c[0]), "last_10pct_weight": float(c[int(0.9 * steps) + 1:].sum())})
    return curves


def plot(results: Sequence[dict], summary: dict, curves: Sequence[dict], fig_dir: Path,
         prefix: str = "d2z") -> list[str]:
    import numpy as np

    plt = recipes.pyplot()
    table = loss_table(results)
    tpps = summary["tpp"]
    fig, axes = plt.subplots(1, len(tpps), figsize=(4.6 * len(tpps), 3.8), squeeze=False)
    for ax, tpp in zip(axes[0], tpps):
        for sched in SCHEDULES:
            c = table[tpp].get(sched)
            if not c:
                continue
            lrs = sorted(c)
            ms = [stats.mean_se([v for v in c[lr].values() if math.isfinite(v)]) for lr in lrs]
            pts = [(lr, m["mean"], m["se"] if m["n"] > 1 else 0.0)
                   for lr, m in zip(lrs, ms) if m["n"] and math.isfinite(m["mean"])]
            if pts:
                x, y, e = zip(*pts)
                ax.errorbar(x, y, yerr=e, fmt="o-", color=COLORS[sched], label=sched, ms=4,
                            capsize=2, lw=2.2 if sched == "d2z" else 1.3)
        ax.set_xscale("log")
        grid = sorted({lr for c in table[tpp].values() for lr in c})
        ax.set_xticks(grid, [f"{x:g}" for x in grid], rotation=45)
        ax.minorticks_off()
        recipes.finish_axes(ax, "peak learning rate", title=f"{tpp:g} tokens / parameter",
                            legend=False)
    axes[0][0].set_ylabel("validation loss (mean +- s.e. over seeds)")
    axes[0][-1].legend(fontsize=8)
    fig.suptitle("Validation loss vs peak LR, one line per schedule")
    paths = [recipes.save_figure(fig, fig_dir, f"{prefix}_loss_vs_lr.png")]

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    for sched in SCHEDULES:
        pts = [(t, summary["per_tpp"][str(t)]["best"][sched]) for t in tpps
               if sched in summary["per_tpp"][str(t)]["best"]]
        if pts:
            a1.errorbar([t for t, _ in pts], [b["mean"] for _, b in pts],
                        yerr=[b["se"] if b["n"] > 1 else 0.0 for _, b in pts], fmt="o-",
                        color=COLORS[sched], label=sched, capsize=3, ms=4)
    a1.set_xscale("log")
    a1.set_xticks(tpps, [f"{t:g}" for t in tpps])
    a1.minorticks_off()
    recipes.finish_axes(a1, "tokens per parameter", "best-LR validation loss",
                        "each schedule at its best LR (+- s.e.)")
    for i, other in enumerate(("linear_10x", "cosine_10x", "wsd", "constant")):
        pts = [(t, summary["per_tpp"][str(t)]["margins"][other]) for t in tpps
               if other in summary["per_tpp"][str(t)]["margins"]]
        pts = [(t, m) for t, m in pts if math.isfinite(m["lo"])]
        if pts:
            x = np.array([t for t, _ in pts]) * (1 + 0.04 * (i - 1.5))
            y = np.array([m["mean"] for _, m in pts])
            a2.errorbar(x, y, yerr=[y - [m["lo"] for _, m in pts], [m["hi"] for _, m in pts] - y],
                        fmt="o", color=COLORS[other], label=f"{other} - d2z", capsize=3)
    sl = summary["margin_slope_vs_ln_tpp"]
    if math.isfinite(sl["slope"]):
        xx = np.exp(np.linspace(math.log(tpps[0]), math.log(tpps[-1]), 50))
        a2.plot(xx, sl["intercept"] + sl["slope"] * np.log(xx), color=COLORS["linear_10x"],
                lw=1, ls="--", label=f"fit: slope {sl['slope']:+.4f} per ln TPP")
    a2.axhline(0, color="k", lw=0.8)
    a2.set_xscale("log")
    a2.set_xticks(tpps, [f"{t:g}" for t in tpps])
    a2.minorticks_off()
    recipes.finish_axes(a2, "tokens per parameter", "loss(other) - loss(d2z)",
                        f"D2Z margin, {100 * summary['conf']:.0f}% t-intervals over seeds")
    paths.append(recipes.save_figure(fig, fig_dir, f"{prefix}_margin_vs_tpp.png"))

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.8))
    for c in curves:
        x = [i / c["steps"] for i in c["i"]]
        a1.plot(x[1:], c["lr"][1:], color=COLORS.get(c["schedule"]),
                label=f"{c['schedule']} (peak {c['peak_lr']:.3g})")
        a2.plot(x[1:], c["c"][1:], color=COLORS.get(c["schedule"]), label=c["schedule"])
    recipes.finish_axes(a1, "step / T", "learning rate", "schedules at their best peak LR")
    recipes.finish_axes(a2, "update i / T", "$c_{T,i}$ (weight of update i in $\\theta_T$)",
                        legend=False)
    a2.set_yscale("log")
    if curves:
        a2.set_title(f"EMA coefficients, {curves[0]['tpp']:g} TPP, wd {curves[0]['weight_decay']:g}")
    paths.append(recipes.save_figure(fig, fig_dir, f"{prefix}_ct_curves.png"))
    return paths


def _slope_line(summary: dict, pc: str) -> str:
    """The margin-vs-TPP slope, or why there is none (one TPP value; too few points)."""
    sl = summary["margin_slope_vs_ln_tpp"]
    sizes = [t for t in summary["tpp"]
             if "linear_10x" in summary["per_tpp"][str(t)]["margins"]]
    head = "margin over linear_10x vs ln(TPP):"
    tail = f" -> margin grows with TPP: {summary['margin_grows']}"
    if not math.isfinite(sl["slope"]):
        got = ", ".join(f"{t:g}" for t in sizes) or "none"
        return (f"{head} no slope: it needs D2Z and linear_10x at two or more TPP values "
                f"(this grid has {len(sizes)}: {got}; give --tpp with several sizes){tail}")
    if not (math.isfinite(sl["lo"]) and math.isfinite(sl["hi"])):
        return (f"{head} slope {sl['slope']:+.5f} per e-fold from {sl['n']} points, no interval "
                f"(it needs three or more: more seeds or TPP values){tail}")
    return (f"{head} slope {sl['slope']:+.5f} per e-fold, {pc} CI [{sl['lo']:+.5f}, "
            f"{sl['hi']:+.5f}] (n={sl['n']}){tail}")


def report(summary: dict) -> str:
    pc = f"{100 * summary['conf']:.0f}%"
    lines = []
    for tpp in summary["tpp"]:
        e = summary["per_tpp"][str(tpp)]
        lines.append(f"{tpp:g} tokens/parameter (best LR of the seed-mean curve; loss mean +- "
                     "s.e. over seeds):")
        for s in e["ranking"]:
            b = e["best"][s]
            edge = f"  [optimum on the grid's {b['at_edge']} edge]" if b["at_edge"] else ""
            lines.append(f"  {s:<11} peak LR {b['peak_lr']:<8.3g} val loss {b['mean']:.4f} +- "
                         f"{b['se']:.4f} (n={b['n']}){edge}")
        for o, m in e["margins"].items():
            lines.append(f"  D2Z margin over {o:<10}: {m['mean']:+.4f} ({m['pct']:+.2f}%), {pc} CI "
                         f"[{m['lo']:+.4f}, {m['hi']:+.4f}] -> D2Z lower: "
                         f"{stats.verdict(m['lo'], m['hi'])}")
        if "d2z_lowest" in e:
            lines.append(f"  D2Z lowest of all schedules at {tpp:g} TPP: {e['d2z_lowest']}")
    lines.append(_slope_line(summary, pc))
    for tpp, c in summary["compute_saved"].items():
        if c["x"]:
            lines.append(f"  linear_10x reaches D2Z's {float(tpp):g}-TPP loss at {c['x']:.3g} TPP "
                         f"({c['ratio']:.2f}x the data{', extrapolated' if c['extrapolated'] else ''})")
    if summary["edge_optima"]:
        lines.append("optimum still on the LR grid's edge (extend with --lrs or --extend-rounds): "
                     + "; ".join(summary["edge_optima"]))
    lines.append(f"D2Z lowest at every size: {summary['d2z_lowest_at_every_size']}")
    return recipes.verdict(lines, "claim (D2Z lowest at every TPP and its margin grows with TPP)",
                           summary["claim"])


def analyze(results: Sequence[dict], info: dict, out: Path) -> tuple[dict, list[str], str]:
    """The runner's analysis step: summary, ``OUT/ct_curves.jsonl``, figures, report."""
    summary = summarize(results)
    curves = ct_curves(results, summary)
    write_jsonl(Path(out) / "ct_curves.jsonl", curves)
    return summary, plot(results, summary, curves, Path(out) / "figures"), report(summary)


def main(argv: Sequence[str] | None = None) -> int:
    return runner.main("d2z", argv)


if __name__ == "__main__":
    sys.exit(main())
