"""ALiBi position interpolation: train at a short length, evaluate at 1x, 2x, 4x and 8x that
length with and without interpolation.

    python -m experiments.alibi_pi [--out DIR] [--data GLOB] [--scale S] [--workers N] [--slurm]

Claim (Al-Khateeb et al., "Position Interpolation Improves ALiBi Extrapolation"): dividing the
ALiBi slopes by L / L_train at an evaluation length L > L_train lowers the loss beyond the
training length. The model and grid are ``configs/experiments/alibi_pi.py``. Writes
``OUT/results.jsonl`` (one line per trained model, with the loss per
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

import sys
from pathlib import Path
from typing import Sequence

from btlm_jax.experiments import recipes, runner

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
    import numpy as np

    plt = recipes.pyplot()

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
    recipes.finish_axes(ax, "evaluation length (tokens)", "validation loss",
                        "ALiBi: loss vs evaluation length (dotted: training length)")
    paths = [recipes.save_figure(fig, fig_dir, f"{prefix}_loss_vs_length.png")]

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
        recipes.finish_axes(ax, "position", f"loss (moving average over {w} positions)",
                            f"d{r['meta']['d_model']} x {r['meta']['n_layers']}L at length "
                            f"{longest} (trained at {lt})")
    paths.append(recipes.save_figure(fig, fig_dir, f"{prefix}_per_position.png"))
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
    return recipes.verdict(lines, "PI lowers the loss at every length beyond training, for "
                           "every model", summary["claim_held"])


def analyze(results: Sequence[dict], info: dict, out: Path) -> tuple[dict, list[str], str]:
    """The runner's analysis step: summary, figures, report."""
    summary = summarize(results)
    return summary, plot(results, Path(out) / "figures"), report(summary)


def main(argv: Sequence[str] | None = None) -> int:
    return runner.main("alibi_pi", argv)


if __name__ == "__main__":
    sys.exit(main())
