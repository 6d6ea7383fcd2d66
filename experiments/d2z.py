"""Straight to Zero: linear decay-to-zero vs other LR schedules, over a peak-LR grid, at two
dataset sizes (tokens per parameter).

    python -m experiments.d2z [--out DIR] [--data GLOB] [--scale S] [--workers N] [--slurm]

Claim (Bergsma et al., "Straight to Zero"): at each schedule's best peak LR, linear D2Z reaches
the lowest validation loss, and its margin (over 10x linear decay) grows with tokens per
parameter. Writes ``OUT/results.jsonl`` (one line per run), ``OUT/ct_curves.jsonl`` (the EMA
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

import json
import math
import sys
from pathlib import Path
from typing import Sequence

from experiments import common
from launch import sweep

SCHEDULES = ("d2z", "linear_10x", "cosine_10x", "wsd", "constant")
DEFAULT_LRS = (3e-3, 6e-3, 1.2e-2, 2.4e-2)
WEIGHT_DECAY = 1.0  # see the docstring: keeps tau_iter / T below 1 at these short runs
COLORS = {"d2z": "C3", "linear_10x": "C0", "cosine_10x": "C2", "wsd": "C1", "constant": "C7"}


def sizes(scale: float) -> dict:
    s = max(scale, 0.25)
    return {"d_model": 16 * max(1, round(4 * s)), "n_layers": max(2, round(2 * s)),
            "vocab": 1024 * int(min(8, max(1, round(s)))), "batch": 16 * max(1, round(s)),
            "tpp": (min(20.0, 2.0 * s), min(80.0, 8.0 * s))}


def _floats(text: str, name: str) -> list[float]:
    try:
        vals = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise common.ExperimentError(f"--{name}={text!r}: expected comma-separated numbers") from None
    if not vals or min(vals) <= 0:
        raise common.ExperimentError(f"--{name}={text!r}: values must be positive")
    return vals


def plan(args) -> tuple[list[sweep.Task], dict]:
    out = Path(args.out)
    sz = sizes(args.scale)
    schedules = list(SCHEDULES)
    lrs = _floats(args.lrs, "lrs") if args.lrs else list(DEFAULT_LRS)
    tpps = _floats(args.tpp, "tpp") if args.tpp else list(sz["tpp"])
    if args.schedules:
        schedules = [s.strip() for s in args.schedules.split(",") if s.strip()]
        bad = [s for s in schedules if s not in SCHEDULES]
        if bad:
            raise common.ExperimentError(f"--schedules: unknown {bad}; choose from {SCHEDULES}")
    if args.smoke:
        sz.update(d_model=32, n_layers=1, batch=4)
        schedules, lrs, tpps = ["d2z", "constant"], [1e-2], [0.05]
    wd = float(args.wd) if args.wd is not None else WEIGHT_DECAY
    if wd < 0:
        raise common.ExperimentError(f"--wd={wd}: weight decay must be >= 0")
    data = common.prepare_data(args.data, out)
    tok = common.tokenizer_for(data["train"], sz["vocab"])
    common.index_eval(data["eval"])
    model = common.model_overrides(sz["d_model"], sz["n_layers"], sz["vocab"], mup=True,
                                   base_d_model=sz["d_model"])
    n_params = common.count_params(model)
    tokens_per_step = sz["batch"] * common.SEQ_LEN
    tasks = []
    for tpp in tpps:
        steps = common.steps_for_tpp(tpp, n_params, tokens_per_step)
        if args.smoke:
            steps = 6
        run = common.run_overrides(steps=steps, batch=sz["batch"], data=data, tokenizer=tok,
                                   evals=1 if args.smoke else 4,
                                   eval_batches=2 if args.smoke else 16,
                                   eval_batch=4 if args.smoke else 8, seed=args.seed)
        run["optim.weight_decay"] = wd
        for point in sweep.expand_grid({"optim.schedule": schedules, "optim.peak_lr": lrs}):
            meta = {"tpp": tpp, "schedule": point["optim.schedule"],
                    "peak_lr": point["optim.peak_lr"], "steps": steps}
            name = sweep.run_name({"tpp": tpp, **point})
            tasks.append(sweep.Task(name=name, workdir=str(out / "runs" / name),
                                    overrides={**model, **run, **point}, meta=meta,
                                    cost=float(steps)))
    info = {"experiment": "d2z", "data": data["name"], "scale": args.scale, "num_params": n_params,
            "model": {k.split(".", 1)[1]: v for k, v in model.items()},
            "tokens_per_step": tokens_per_step, "tpp": tpps, "lrs": lrs,
            "schedules": schedules, "weight_decay": wd, "smoke": bool(args.smoke)}
    return tasks, info


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
        cfg = sweep.apply_overrides(sweep.load_preset("configs/btlm.py", "tiny"), r["overrides"])
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
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
        ax.set_xlabel("peak learning rate")
        ax.set_title(f"{tpp:g} tokens / parameter")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("validation loss")
    axes[0][-1].legend(fontsize=8)
    fig.suptitle("Validation loss vs peak LR, one line per schedule")
    paths = [common.save_figure(fig, fig_dir, f"{prefix}_loss_vs_lr.png")]

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.8))
    for c in curves:
        x = [i / c["steps"] for i in c["i"]]
        a1.plot(x[1:], c["lr"][1:], color=COLORS.get(c["schedule"]),
                label=f"{c['schedule']} (peak {c['peak_lr']:.3g})")
        a2.plot(x[1:], c["c"][1:], color=COLORS.get(c["schedule"]), label=c["schedule"])
    a1.set_xlabel("step / T")
    a1.set_ylabel("learning rate")
    a1.set_title("schedules at their best peak LR")
    a1.legend(fontsize=8)
    a2.set_xlabel("update i / T")
    a2.set_ylabel("$c_{T,i}$ (weight of update i in $\\theta_T$)")
    a2.set_yscale("log")
    if curves:
        a2.set_title(f"EMA coefficients, {curves[0]['tpp']:g} TPP, wd {curves[0]['weight_decay']:g}")
    for a in (a1, a2):
        a.grid(alpha=0.3)
    paths.append(common.save_figure(fig, fig_dir, f"{prefix}_ct_curves.png"))
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
    lines.append(f"D2Z lowest at every size: {summary['d2z_lowest_at_every_size']}; margin over "
                 f"linear_10x grows with TPP: {summary['margin_vs_linear_10x_grows']}; claim held: "
                 f"{summary['claim_held']}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = common.parser(__doc__.split("\n\n")[0], "d2z")
    p.add_argument("--lrs", default="", help="peak LRs, comma separated (default: %s)" %
                   ",".join(f"{x:g}" for x in DEFAULT_LRS))
    p.add_argument("--tpp", default="", help="tokens per parameter, comma separated")
    p.add_argument("--schedules", default="", help="subset of " + ",".join(SCHEDULES))
    p.add_argument("--wd", type=float, default=None,
                   help=f"AdamW weight decay lambda (default {WEIGHT_DECAY})")
    args = p.parse_args(argv)
    out = Path(args.out)
    try:
        tasks, info = plan(args)
    except (common.ExperimentError, sweep.SweepError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    common.log(f"[d2z] {len(tasks)} runs; {info['num_params']:,} parameters; "
               f"TPP {info['tpp']} -> steps {sorted({t.meta['steps'] for t in tasks})}; data: "
               f"{info['data']}; out: {out}")
    results, complete = sweep.launch(tasks, out, args, job_name="d2z", log=common.log)
    if args.slurm and not complete:
        return 0
    if results:
        summary = summarize(results)
        curves = ct_curves(results, summary)
        common.write_jsonl(out / "ct_curves.jsonl", curves)
        (out / "summary.json").write_text(json.dumps({**info, **summary}, indent=1))
        figs = plot(results, summary, curves, out / "figures")
        common.log(report(summary))
        common.log("figures: " + ", ".join(figs))
    return common.finish(out, complete, len(results), len(tasks), args.slurm)


if __name__ == "__main__":
    sys.exit(main())
