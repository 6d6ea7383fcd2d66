"""muP hyperparameter transfer: a peak-LR sweep at several widths, muP vs standard
parametrisation (SP).

    python -m experiments.mup [--out DIR] [--data GLOB] [--scale S] [--workers N] [--slurm]

Claim (BTLM; Yang et al., Tensor Programs V): under muP the best LR stays put as the model
widens; under SP it drifts (usually down). muP here is BTLM's: base width = the narrowest width,
hidden-matrix init and LR scaled by 1/width multiplier, embedding x 14.6, logits x 2.22/w,
attention 1/d_head; SP: init std 0.02, one LR, 1/sqrt(d_head). Writes ``OUT/results.jsonl``,
``OUT/summary.json`` and ``OUT/figures/mup_lr_transfer.png``.

Default (scale 1, about 25 minutes on an idle 2-core CPU): widths 64, 128, 256 (2 layers,
vocabulary 1024), 6 peak LRs from 1.25e-3 to 4e-2, 150 steps of 16 x 128 tokens, D2Z schedule.
``--scale S`` multiplies the widths and the steps.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Sequence

from experiments import common
from launch import sweep

DEFAULT_LRS = (1.25e-3, 2.5e-3, 5e-3, 1e-2, 2e-2, 4e-2)


def plan(args) -> tuple[list[sweep.Task], dict]:
    out = Path(args.out)
    s = max(args.scale, 0.25)
    base = 16 * max(1, round(4 * s))
    widths = [base, 2 * base, 4 * base]
    n_layers, vocab, steps, batch = 2, 1024, int(150 * s), 16
    lrs = list(DEFAULT_LRS)
    if args.lrs:
        try:
            lrs = [float(x) for x in args.lrs.split(",") if x.strip()]
        except ValueError:
            raise common.ExperimentError(f"--lrs={args.lrs!r}: expected numbers") from None
    eval_batch, eval_batches = 8, 8
    if args.smoke:
        widths, n_layers, steps, batch, lrs = [32], 1, 4, 4, [1e-2]
        eval_batch, eval_batches = 4, 1
    data = common.prepare_data(args.data, out)
    tok = common.tokenizer_for(data["train"], vocab)
    common.index_eval(data["eval"])
    tasks = []
    for param in ("mup", "sp"):
        for width in widths:
            model = common.model_overrides(width, n_layers, vocab, mup=param == "mup",
                                           base_d_model=widths[0])
            run = common.run_overrides(steps=steps, batch=batch, data=data, tokenizer=tok,
                                       evals=1, eval_batches=eval_batches, eval_batch=eval_batch,
                                       seed=args.seed)
            for lr in lrs:
                meta = {"param": param, "width": width, "peak_lr": lr, "steps": steps}
                name = sweep.run_name(meta)
                tasks.append(sweep.Task(name=name, workdir=str(out / "runs" / name),
                                        overrides={**model, **run, "optim.peak_lr": lr},
                                        meta=meta, cost=float(steps * (width + 64) ** 2)))
    info = {"experiment": "mup", "data": data["name"], "scale": args.scale, "widths": widths,
            "n_layers": n_layers, "vocab": vocab, "steps": steps, "lrs": lrs,
            "smoke": bool(args.smoke)}
    return tasks, info


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
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
        ax.set_xlabel("peak learning rate")
        d = summary.get(param, {}).get("drift_log2")
        ax.set_title(f"{title}" + (f" (best-LR drift {d:+.2f} doublings)" if d is not None else ""))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0].set_ylabel("validation loss")
    paths = [common.save_figure(fig, fig_dir, f"{prefix}_lr_transfer.png")]
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
    lines.append(f"best LR stable under muP (spread <= 1 doubling) and less stable under SP: "
                 f"{summary['claim_held']}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = common.parser(__doc__.split("\n\n")[0], "mup")
    p.add_argument("--lrs", default="", help="peak LRs, comma separated")
    args = p.parse_args(argv)
    out = Path(args.out)
    try:
        tasks, info = plan(args)
    except (common.ExperimentError, sweep.SweepError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    common.log(f"[mup] {len(tasks)} runs: widths {info['widths']} x {len(info['lrs'])} LRs x "
               f"muP/SP; data: {info['data']}; out: {out}")
    results, complete = sweep.launch(tasks, out, args, job_name="mup", log=common.log)
    if args.slurm and not complete:
        return 0
    if results:
        summary = summarize(results)
        (out / "summary.json").write_text(json.dumps({**info, **summary}, indent=1))
        figs = plot(results, summary, out / "figures")
        common.log(report(summary))
        common.log("figures: " + ", ".join(figs))
    return common.finish(out, complete, len(results), len(tasks), args.slurm)


if __name__ == "__main__":
    sys.exit(main())
