"""Straight to Zero: linear decay-to-zero vs other LR schedules, over a peak-LR grid, at two
dataset sizes (tokens per parameter).

    python -m experiments.d2z [--out DIR] [--data GLOB] [--scale S] [--workers N] [--slurm]

Claim (Bergsma et al., "Straight to Zero"): at each schedule's best peak LR, linear D2Z reaches
the lowest validation loss, and its margin (over 10x linear decay) grows with tokens per
parameter. The model and grid are ``configs/experiments/d2z.py``. Writes ``OUT/results.jsonl``
(one line per run), ``OUT/ct_curves.jsonl`` (the EMA
coefficients c_{T,i} of each schedule at its best LR), ``OUT/summary.json`` and
``OUT/figures/d2z_loss_vs_lr.png``, ``OUT/figures/d2z_ct_curves.png``.

Default (scale 1, about 25 minutes on an idle 2-core CPU): a 166k-parameter model (width 64, 2
layers, vocabulary 1024, muP), sequences of 128, batch 16, 2 and 8 tokens per parameter (163 and
649 steps), 5 schedules x 4 peak LRs, AdamW weight decay 1.0.

Why weight decay 1.0 and not the paper's 0.1: in the paper's reading of AdamW as an EMA of updates
the regime is set by the timescale tau_iter = 1/(eta lambda) relative to the run length T. The
paper's runs (tens of thousands of steps at lambda 0.1) have tau_iter / T well below 1; a 649-step
CPU run at lambda 0.1 has tau_iter / T ~ 2.6 at the best peak LR, where the final weights are still
~80% the initialisation and the schedule barely matters (measured: experiments/results/d2z_wd0.1).
lambda 1.0 puts tau_iter / T at 0.26 (8 TPP) and 0.51 (2 TPP) at the measured best peak LRs, the
paper's range. ``--wd`` sets it: for ``--scale`` runs of tens of thousands of steps, pass the
paper's ``--wd 0.1``. ``--scale S`` widens the model (width 64 S, 2 S layers,
vocabulary 1024 min(S, 8), batch 16 S) and raises the dataset sizes to 2 S and 8 S tokens per
parameter (at most 20 and 80, the paper's); ``--tpp`` and ``--lrs`` set them directly.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Sequence

from btlm_jax.experiments import recipes, runner
from btlm_jax.experiments.data import write_jsonl
from btlm_jax.experiments.overrides import load_config

SCHEDULES = ("d2z", "linear_10x", "cosine_10x", "wsd", "constant")
COLORS = {"d2z": "C3", "linear_10x": "C0", "cosine_10x": "C2", "wsd": "C1", "constant": "C7"}


# ----------------------------------------------------------------------------------------------
# Analysis (also used by notebooks/repro_d2z.ipynb).


def _loss(r: dict) -> float:
    if r.get("status") != "ok":
        return math.inf
    v = r.get("final", {}).get("eval_loss")
    return float(v) if v is not None and math.isfinite(v) else math.inf


def summarize(results: Sequence[dict]) -> dict:
    """Best LR and loss per (tpp, schedule); D2Z's rank and margins per tpp; whether the claim
    held (D2Z lowest at every size and its margin over linear_10x growing with tpp)."""
    tpps = sorted({r["meta"]["tpp"] for r in results})
    per = {}
    for tpp in tpps:
        best = {}
        for r in results:
            m = r["meta"]
            if m["tpp"] != tpp:
                continue
            cur = best.get(m["schedule"])
            if cur is None or _loss(r) < cur["eval_loss"]:
                best[m["schedule"]] = {"peak_lr": m["peak_lr"], "eval_loss": _loss(r),
                                       "steps": m["steps"]}
        ranking = sorted(best, key=lambda s: best[s]["eval_loss"])
        entry = {"best": best, "ranking": ranking}
        if "d2z" in best:
            others = [best[s]["eval_loss"] for s in best if s != "d2z"]
            d = best["d2z"]["eval_loss"]
            if others:
                entry["margin_vs_best_other"] = min(others) - d
                entry["margin_vs_best_other_pct"] = 100 * (min(others) - d) / min(others)
            if "linear_10x" in best:
                l10 = best["linear_10x"]["eval_loss"]
                entry["margin_vs_linear_10x"] = l10 - d
                entry["margin_vs_linear_10x_pct"] = 100 * (l10 - d) / l10
        per[str(tpp)] = entry
    d2z_lowest = all(e["ranking"][:1] == ["d2z"] for e in per.values()) and bool(per)
    margins = [per[str(t)].get("margin_vs_linear_10x") for t in tpps]
    grows = (len(margins) >= 2 and None not in margins
             and all(b > a for a, b in zip(margins, margins[1:])))
    return {"tpp": tpps, "per_tpp": per, "d2z_lowest_at_every_size": d2z_lowest,
            "margin_vs_linear_10x_grows": grows, "claim_held": bool(d2z_lowest and grows)}


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
                 and r["meta"]["peak_lr"] == b["peak_lr"])
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
    plt = recipes.pyplot()

    tpps = summary["tpp"]
    fig, axes = plt.subplots(1, len(tpps), figsize=(4.6 * len(tpps), 3.8), squeeze=False,
                             sharey=False)
    for ax, tpp in zip(axes[0], tpps):
        for sched in SCHEDULES:
            pts = sorted((r["meta"]["peak_lr"], _loss(r)) for r in results
                         if r["meta"]["tpp"] == tpp and r["meta"]["schedule"] == sched)
            pts = [(x, y) for x, y in pts if math.isfinite(y)]
            if pts:
                ax.plot(*zip(*pts), "o-", color=COLORS[sched], label=sched, ms=4,
                        lw=2.2 if sched == "d2z" else 1.3)
        ax.set_xscale("log")
        grid = sorted({r["meta"]["peak_lr"] for r in results if r["meta"]["tpp"] == tpp})
        ax.set_xticks(grid, [f"{x:g}" for x in grid])
        ax.minorticks_off()
        recipes.finish_axes(ax, "peak learning rate", title=f"{tpp:g} tokens / parameter",
                            legend=False)
    axes[0][0].set_ylabel("validation loss")
    axes[0][-1].legend(fontsize=8)
    fig.suptitle("Validation loss vs peak LR, one line per schedule")
    paths = [recipes.save_figure(fig, fig_dir, f"{prefix}_loss_vs_lr.png")]

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


def report(summary: dict) -> str:
    lines = []
    for tpp in summary["tpp"]:
        e = summary["per_tpp"][str(tpp)]
        lines.append(f"{tpp:g} tokens/parameter (ranking at each schedule's best LR):")
        for s in e["ranking"]:
            b = e["best"][s]
            lines.append(f"  {s:<11} best peak LR {b['peak_lr']:<8.3g} val loss {b['eval_loss']:.4f}")
        if "margin_vs_linear_10x_pct" in e:
            lines.append(f"  D2Z margin over linear_10x: {e['margin_vs_linear_10x']:+.4f} "
                         f"({e['margin_vs_linear_10x_pct']:+.2f}%); over the best other: "
                         f"{e.get('margin_vs_best_other', float('nan')):+.4f}")
    return recipes.verdict(lines, f"D2Z lowest at every size: "
                           f"{summary['d2z_lowest_at_every_size']}; margin over linear_10x grows "
                           f"with TPP: {summary['margin_vs_linear_10x_grows']}; claim held",
                           summary["claim_held"])


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
