"""ALiBi position interpolation: train at a short length, evaluate at 1x, 2x, 4x and 8x that
length with and without interpolation.

    python -m experiments.alibi_pi [--out DIR] [--data GLOB] [--scale S] [--workers N] [--slurm]

Claim (Al-Khateeb et al., "Position Interpolation Improves ALiBi Extrapolation"): dividing the
ALiBi slopes by L / L_train at an evaluation length L > L_train lowers the loss beyond the
training length. Writes ``OUT/results.jsonl`` (one line per trained model, with the loss per
length and setting, the per-position losses, and a partial-interpolation diagnostic at the
longest length: slopes divided by (L / L_train) ** alpha for alpha from 0 to 1),
``OUT/summary.json`` and ``OUT/figures/alibi_loss_vs_length.png``,
``OUT/figures/alibi_per_position.png``.

Default (scale 1, about 10 minutes on an idle 2-core CPU): two models (width 64 x 2 layers and
width 128 x 4 layers, vocabulary 2048) trained at length 128 for 1000 steps of 16 sequences,
evaluated at 128, 256, 512 and 1024 on the same 32k held-out tokens at every length. ``--scale S``
multiplies the widths, the layer counts, the steps and the training length (rounded to a power of
two); ``--train-len N`` sets the training length directly.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Sequence

from experiments import common
from launch import sweep

FACTORS = (1, 2, 4, 8)


ALPHAS = (0.0, 0.125, 0.25, 0.5, 0.75, 1.0)


def evaluate_lengths(workdir, cfg, train_result, *, lengths, eval_tokens, max_batch=8,
                     buckets=16, alphas=ALPHAS) -> dict:
    """Post-training hook (runs in the task's process): loss at each length, PI off and on.

    Every length sees the same number of tokens (``eval_tokens // L`` sequences), taken from the
    start of the same held-out streams, so the lengths are compared on (nearly) the same text;
    PI on and off are compared on exactly the same tokens."""
    from btlm_jax.eval.perplexity import Evaluator, train_length
    from btlm_jax.eval.session import load_run

    run = load_run(workdir)
    keep = ("length", "position_interpolation", "pi_scale", "train_length", "loss", "perplexity",
            "tokens", "position_buckets", "position_loss")
    evaluators = {}
    evals = []
    for length in (int(x) for x in lengths):
        n_seq = max(1, int(eval_tokens) // length)
        batch = min(n_seq, int(max_batch))
        ev = evaluators[length] = Evaluator(run, batch_size=batch, num_batches=-(-n_seq // batch))
        for r in ev.results([length], [False, True], num_buckets=buckets):
            evals.append({k: r[k] for k in keep})
    # Diagnostic: partial interpolation at the longest length, slopes / (L / L_train) ** alpha
    # (alpha 0 = plain ALiBi, 1 = PI). Where the loss rises monotonically with alpha, any
    # interpolation hurts and there is no degradation for PI to repair. Alpha 0 and 1 repeat the
    # off/on evaluations above through the other code path, as a cross-check (two cheap evals).
    longest = max(evaluators)
    lt = train_length(run.cfg)
    strength = []
    if longest > lt:
        ev = evaluators[longest]
        for alpha in alphas:
            scale = float((longest / lt) ** float(alpha))
            tot = ev.evaluate(longest, scale)
            strength.append({"alpha": float(alpha), "pi_scale": scale, "length": longest,
                             "loss": float(tot["loss_sum"] / max(tot["count"], 1.0))})
    return {"evals": evals, "strength": strength}


def models(scale: float) -> list[dict]:
    s = max(scale, 0.25)
    return [{"d_model": 16 * max(1, round(4 * s)), "n_layers": max(1, round(2 * s))},
            {"d_model": 16 * max(1, round(8 * s)), "n_layers": max(1, round(4 * s))}]


def plan(args) -> tuple[list[sweep.Task], dict]:
    out = Path(args.out)
    s = max(args.scale, 0.25)
    train_len = int(2 ** round(math.log2(128 * max(1.0, s))))
    if getattr(args, "train_len", 0):
        if args.train_len < 8:
            raise common.ExperimentError(f"--train-len={args.train_len}: must be >= 8")
        train_len = int(args.train_len)
    vocab = 2048 * int(min(4, max(1, round(s))))
    steps, batch = int(1000 * s), 16
    eval_batch, eval_batches = 8, 8
    eval_tokens = 32768 * max(1, round(s))  # per evaluation length
    mods = models(args.scale)
    if args.smoke:
        train_len, steps, batch, eval_batch, eval_batches, eval_tokens = 16, 4, 4, 2, 1, 256
        mods = [{"d_model": 32, "n_layers": 1}]
    lengths = [train_len * f for f in FACTORS]
    data = common.prepare_data(args.data, out)
    tok = common.tokenizer_for(data["train"], vocab)
    common.index_eval(data["eval"])
    tasks = []
    for m in mods:
        ov = {**common.model_overrides(m["d_model"], m["n_layers"], vocab, mup=True,
                                       base_d_model=m["d_model"]),
              **common.run_overrides(steps=steps, batch=batch, data=data, tokenizer=tok,
                                     seq_len=train_len, evals=1, eval_batches=eval_batches,
                                     eval_batch=eval_batch, seed=args.seed),
              "optim.peak_lr": 1e-2, "optim.schedule": "d2z",
              "model.max_seq_len": max(lengths)}
        name = sweep.run_name({"d_model": m["d_model"], "n_layers": m["n_layers"],
                               "train_len": train_len})
        tasks.append(sweep.Task(
            name=name, workdir=str(out / "runs" / name), overrides=ov,
            meta={**m, "train_len": train_len, "steps": steps},
            post="experiments.alibi_pi:evaluate_lengths",
            post_args={"lengths": lengths, "eval_tokens": eval_tokens, "max_batch": 8,
                       "buckets": 16},
            cost=float(steps * m["d_model"] ** 2 * m["n_layers"])))
    info = {"experiment": "alibi_pi", "data": data["name"], "scale": args.scale,
            "train_len": train_len, "lengths": lengths, "steps": steps, "batch": batch,
            "vocab": vocab, "smoke": bool(args.smoke)}
    return tasks, info


# ----------------------------------------------------------------------------------------------
# Analysis (also used by notebooks/repro_alibi_pi.ipynb).


def table(result: dict) -> dict[int, dict[str, float]]:
    """{length: {"off": loss, "on": loss}} of one run."""
    t: dict[int, dict[str, float]] = {}
    for e in result["post"]["evals"]:
        t.setdefault(e["length"], {})["on" if e["position_interpolation"] else "off"] = e["loss"]
    return dict(sorted(t.items()))


def summarize(results: Sequence[dict]) -> dict:
    runs = []
    all_better = True
    for r in results:
        if r.get("status") != "ok" or "post" not in r:
            continue
        lt = r["meta"]["train_len"]
        t = table(r)
        beyond = {L: v for L, v in t.items() if L > lt}
        deltas = {str(L): v["off"] - v["on"] for L, v in beyond.items()}
        better = bool(beyond) and all(d > 0 for d in deltas.values())
        all_better &= better
        strength = r["post"].get("strength", [])
        runs.append({"name": r["name"], "d_model": r["meta"]["d_model"],
                     "n_layers": r["meta"]["n_layers"], "train_len": lt,
                     "loss": {str(L): v for L, v in t.items()},
                     "pi_gain": deltas, "pi_lower_at_every_longer_length": better,
                     "strength": strength,
                     "loss_rises_with_strength": bool(strength) and all(
                         b["loss"] >= a["loss"] for a, b in zip(strength, strength[1:]))})
    return {"runs": runs, "claim_held": bool(runs) and all_better}


def plot(results: Sequence[dict], fig_dir: Path, prefix: str = "alibi") -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    ok = [r for r in results if r.get("status") == "ok" and "post" in r]
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for i, r in enumerate(ok):
        t = table(r)
        L = list(t)
        lab = f"d{r['meta']['d_model']} x {r['meta']['n_layers']}L"
        ax.plot(L, [t[x]["off"] for x in L], "o--", color=f"C{i}", label=f"{lab}, no PI")
        ax.plot(L, [t[x]["on"] for x in L], "s-", color=f"C{i}", label=f"{lab}, PI")
    if ok:
        ax.axvline(ok[0]["meta"]["train_len"], color="k", lw=0.8, ls=":")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("evaluation length (tokens)")
    ax.set_ylabel("validation loss")
    ax.set_title("ALiBi: loss vs evaluation length (dotted: training length)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    paths = [common.save_figure(fig, fig_dir, f"{prefix}_loss_vs_length.png")]

    fig, axes = plt.subplots(1, max(1, len(ok)), figsize=(5.5 * max(1, len(ok)), 4), squeeze=False)
    for ax, r in zip(axes[0], ok):
        lt = r["meta"]["train_len"]
        longest = max(e["length"] for e in r["post"]["evals"])
        for e in r["post"]["evals"]:
            if e["length"] != longest:
                continue
            y = np.asarray(e["position_loss"], float)
            w = max(1, len(y) // 64)
            ys = np.convolve(y, np.ones(w) / w, mode="valid")
            ax.plot(np.arange(len(ys)) + w // 2, ys, label=("PI (slopes / %g)" % e["pi_scale"])
                    if e["position_interpolation"] else "no PI",
                    color="C1" if e["position_interpolation"] else "C0")
        ax.axvline(lt, color="k", lw=0.8, ls=":")
        ax.set_xlabel("position")
        ax.set_ylabel(f"loss (moving average over {w} positions)")
        ax.set_title(f"d{r['meta']['d_model']} x {r['meta']['n_layers']}L at length {longest} "
                     f"(trained at {lt})")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    paths.append(common.save_figure(fig, fig_dir, f"{prefix}_per_position.png"))
    return paths


def report(summary: dict) -> str:
    lines = []
    for r in summary["runs"]:
        lines.append(f"{r['name']}:")
        for L, v in r["loss"].items():
            lines.append(f"  L={L:>5}  no PI {v['off']:.4f}  PI {v['on']:.4f}  "
                         f"gain {v['off'] - v['on']:+.4f}")
        if r.get("strength"):
            lines.append(f"  partial interpolation at L={r['strength'][0]['length']}, slopes / "
                         "(L/L_train)^alpha: " + ", ".join(
                             f"alpha {e['alpha']:g}: {e['loss']:.4f}" for e in r["strength"]))
    lines.append(f"PI lowers the loss at every length beyond training, for every model: "
                 f"{summary['claim_held']}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = common.parser(__doc__.split("\n\n")[0], "alibi_pi")
    p.add_argument("--train-len", type=int, default=0,
                   help="training length (default 128 x scale, a power of two); evaluation at 1, 2, "
                   "4 and 8 times it")
    args = p.parse_args(argv)
    out = Path(args.out)
    try:
        tasks, info = plan(args)
    except (common.ExperimentError, sweep.SweepError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    common.log(f"[alibi_pi] {len(tasks)} runs trained at {info['train_len']}, evaluated at "
               f"{info['lengths']}; data: {info['data']}; out: {out}")
    results, complete = sweep.launch(tasks, out, args, job_name="alibi_pi", log=common.log)
    if args.slurm and not complete:
        return 0
    if results:
        summary = summarize(results)
        (out / "summary.json").write_text(json.dumps({**info, **summary}, indent=1))
        figs = plot(results, out / "figures")
        common.log(report(summary))
        common.log("figures: " + ", ".join(figs))
    return common.finish(out, complete, len(results), len(tasks), args.slurm)


if __name__ == "__main__":
    sys.exit(main())
