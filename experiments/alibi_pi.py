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

Retrieval (where ALiBi is expected to fail and PI to help): passkey documents (a key of digit
words hidden in filler text, asked for at the end; ``btlm_jax/experiments/passkey.py``) are half
of the training rows (``--passkey-frac``); at each length 64 examples put the key more than
L_train tokens before the question, scored by exact greedy answers with the slopes divided by
(L/L_train)^alpha for alpha 0 (off) to 1 (PI). PI "does not hold" for retrieval where its gain's
upper bound (the t-interval over seeds, widened by the exact binomial bounds of the pooled
examples) is below 0.1. The LM loss beyond L_train reads only rows inside one held-out
document (``make_eval_batches(contiguous=True)``; ``prepare`` re-splits the text so held-out
documents are at least 8 x the longest length in characters). Seeds 0, 1, 2; t-intervals over
seeds. Default (scale 1; the 6 runs took 21 minutes with 2 workers on a 2-core CPU): two models
(width 64 x 2 layers and width 96 x 3 layers, vocabulary 2048) trained at length 128 for 1000
steps of 16 sequences, evaluated at 128, 256, 512 and 1024 on the same 32k held-out tokens at
every length. ``--scale S`` multiplies the widths, the layer counts, the steps and the training
length (rounded to a power of two); ``--train-len N`` sets the training length directly.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Sequence

from btlm_jax.experiments import recipes, runner, stats

ALPHAS = (0.0, 0.25, 0.5, 0.75, 1.0)
LEARNED = 0.5  # retrieval accuracy at L_train below which the retrieval claim is not testable
# the smallest retrieval gain worth the name: PI "does not hold" when the interval rules this out
MIN_RETRIEVAL_GAIN = 0.1


def prepare(args, out, data, *, train_len, longest, passkey_frac, vocab, passkey_docs) -> dict:
    """Runner hook (before any run): the text re-split into long documents (held-out ones of at
    least ``8 * longest`` characters, so a row of the longest evaluation length fits inside one)
    and ``passkey_docs`` passkey documents of 0.5-1x the training length, mixed into training at
    ``passkey_frac`` of the rows. Returns the data axis and info."""
    import numpy as np

    from btlm_jax.data.tokenizer import Tokenizer
    from btlm_jax.experiments import data as exp_data, passkey

    out = Path(out)
    chunk = 8 * int(longest)
    # the user's own documents (``--data``), not the runner's 4000-character split of them: a
    # held-out row of the longest length must lie inside one unbroken text
    docs = (exp_data.read_documents(args.data) if args.data else
            exp_data.read_documents(data["train"]) + exp_data.read_documents(data["eval"]))
    pieces = [p for _, text in docs for p in exp_data._chunks(text, chunk)]
    long_ix = [i for i, p in enumerate(pieces) if len(p) >= chunk]
    held = set(long_ix[5::10]) or set(long_ix[-1:])
    if not held:
        raise exp_data.ExperimentError(
            f"--data={args.data or 'embedded corpus'}: no document of {chunk} characters to hold "
            f"out for evaluating at length {longest}; give longer texts")
    ddir = out / "long_context"
    rec = [{"text": p, "meta": {"redpajama_set_name": "text"}} for p in pieces]
    exp_data.write_jsonl(ddir / "train.jsonl", [r for i, r in enumerate(rec) if i not in held])
    exp_data.write_jsonl(ddir / "eval.jsonl", [r for i, r in enumerate(rec) if i in held])
    tok = Tokenizer.from_file(exp_data.tokenizer_for(data["train"], vocab))
    sample = "".join(pieces[i] for i in sorted(held))[:20000]
    cpt = max(1.0, len(sample) / max(1, len(tok.encode(sample))))
    filler_cpt = len(passkey.FILLER) / max(1, len(tok.encode(passkey.FILLER)))
    rng = np.random.default_rng(1234)
    pk = [{"text": passkey.training_text(rng, int(rng.uniform(0.5, 1.0) * train_len
                                                    * filler_cpt))}
          for _ in range(int(passkey_docs))]
    exp_data.write_jsonl(ddir / "passkey.jsonl", pk)
    train = f"text={ddir / 'train.jsonl'}"
    ov = {"data.train": train, "data.eval": str(ddir / "eval.jsonl"), "data.mixture": ""}
    label = "lm"
    if passkey_frac > 0:
        ov["data.train"] = f"{train},passkey={ddir / 'passkey.jsonl'}"
        ov["data.mixture"] = f"text={1 - passkey_frac:g},passkey={passkey_frac:g}"
        label = "lm+passkey"
    return {"axes": {"data": {label: ov}},
            "info": {"held_out_docs": len(held), "held_out_chars": sum(len(pieces[i]) for i in held),
                     "chars_per_token": cpt, "passkey_docs": int(passkey_docs)}}


class _ContiguousEvaluator:
    """An :class:`~btlm_jax.eval.perplexity.Evaluator` reading only rows inside one document."""

    def __new__(cls, *a, **k):
        from btlm_jax.eval.perplexity import Evaluator

        class Contiguous(Evaluator):
            def batches(self, length: int):
                return self.pipeline.make_eval_batches(
                    self.cfg, self.run.tokenizer, seq_len=length, batch_size=self.batch_size,
                    num_batches=self.num_batches, contiguous=True)

        return Contiguous(*a, **k)


def retrieval(run, lengths, train_len: int, n: int, alphas=ALPHAS, seed: int = 0) -> list[dict]:
    """Passkey accuracy at each length (the key more than ``train_len`` tokens before the
    question where the length allows) with the slopes divided by (L / L_train) ** alpha."""
    import numpy as np

    from btlm_jax.api import LoadedModel
    from btlm_jax.experiments import passkey

    model = LoadedModel(run.cfg, run.model, run.params, run.tokenizer, run.step,
                        getattr(run, "mesh", None), str(run.path),
                        getattr(run.program, "rules", None))
    out = []
    for length in lengths:
        rng = np.random.default_rng([seed, length])
        beyond = train_len if length > train_len else 0
        ex = [passkey.example_ids(run.tokenizer.encode, rng, length, beyond=beyond)
              for _ in range(int(n))]
        for alpha in alphas:
            scale = float((length / train_len) ** alpha) if length > train_len else 1.0
            acc = passkey.accuracy(model.logits, ex, scale, batch=4)
            out.append({"length": int(length), "alpha": float(alpha), "pi_scale": scale,
                        "accuracy": acc, "n": len(ex), "key_beyond_train_len": bool(beyond)})
    return out


def evaluate_lengths(workdir, cfg, train_result, *, lengths, eval_tokens, max_batch=8,
                     buckets=16, alphas=ALPHAS, passkey_examples=0) -> dict:
    """Post-training hook (runs in the task's process): loss at each length, PI off and on, on
    rows that lie inside one held-out document; partial interpolation at the longest length;
    passkey retrieval accuracy at every length and interpolation strength.

    Every length sees about the same number of tokens (``eval_tokens // L`` rows) of the same
    held-out documents; PI on and off are compared on exactly the same tokens."""
    from btlm_jax.eval.perplexity import train_length
    from btlm_jax.eval.session import load_run

    run = load_run(workdir)
    keep = ("length", "position_interpolation", "pi_scale", "train_length", "loss", "perplexity",
            "tokens", "position_buckets", "position_loss")
    evaluators = {}
    evals = []
    for length in (int(x) for x in lengths):
        n_seq = max(1, int(eval_tokens) // length)
        batch = min(n_seq, int(max_batch))
        ev = evaluators[length] = _ContiguousEvaluator(run, batch_size=batch,
                                                       num_batches=-(-n_seq // batch))
        for r in ev.results([length], [False, True], num_buckets=buckets):
            evals.append({k: r[k] for k in keep})
    # partial interpolation at the longest length, slopes / (L / L_train) ** alpha
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
    acc = retrieval(run, [int(x) for x in lengths], lt, passkey_examples, alphas,
                    seed=int(cfg.seed)) if passkey_examples else []
    return {"evals": evals, "strength": strength, "retrieval": acc}


# ----------------------------------------------------------------------------------------------
# Analysis (also used by notebooks/repro_alibi_pi.ipynb).


def table(result: dict) -> dict[int, dict[str, float]]:
    """{length: {"off": loss, "on": loss}} of one run."""
    t: dict[int, dict[str, float]] = {}
    for e in result["post"]["evals"]:
        t.setdefault(e["length"], {})["on" if e["position_interpolation"] else "off"] = e["loss"]
    return dict(sorted(t.items()))


def _combine(verdicts: Sequence[str]) -> str:
    if not verdicts:
        return "inconclusive"
    if "does not hold" in verdicts:
        return "does not hold"
    return "holds" if all(v == "holds" for v in verdicts) else "inconclusive"


def _model_summary(runs: Sequence[dict], conf: float) -> dict:
    lt = runs[0]["meta"]["train_len"]
    tabs = [table(r) for r in runs]
    lengths = sorted(set.intersection(*(set(t) for t in tabs)))
    loss = {}
    for L in lengths:
        off, on = [t[L]["off"] for t in tabs], [t[L]["on"] for t in tabs]
        gain = stats.paired_interval(off, on, conf)  # positive: PI lower
        loss[str(L)] = {"off": stats.mean_se(off), "on": stats.mean_se(on), "gain": gain,
                        "pi_lower": stats.verdict(gain["lo"], gain["hi"]) if L > lt else None}
    strength = {}
    for r in runs:
        for e in r["post"].get("strength", []):
            strength.setdefault(e["alpha"], []).append(e["loss"])
    acc: dict = {}
    hits: dict = {}  # (length, alpha) -> [correct examples, examples], pooled over seeds
    for r in runs:
        for e in r["post"].get("retrieval", []):
            acc.setdefault(e["length"], {}).setdefault(e["alpha"], []).append(e["accuracy"])
            h = hits.setdefault((e["length"], e["alpha"]), [0, 0])
            h[0] += int(round(e["accuracy"] * e["n"]))
            h[1] += int(e["n"])
    retrieval = {}
    for L, by_alpha in sorted(acc.items()):
        entry = {"accuracy": {str(a): stats.mean_se(v) for a, v in sorted(by_alpha.items())}}
        if L > lt and 0.0 in by_alpha and 1.0 in by_alpha:
            g = stats.paired_interval(by_alpha[1.0], by_alpha[0.0], conf)
            # seeds alone understate the noise when every seed scores the same (e.g. 0 of 64 both
            # ways: a t-interval of width 0); the exact binomial bounds of the pooled examples
            # bound the gain from above as well, and the wider of the two is used
            on_hi = stats.clopper_pearson(*hits[(L, 1.0)], conf)[1]
            off_lo = stats.clopper_pearson(*hits[(L, 0.0)], conf)[0]
            hi = max(g["hi"], on_hi - off_lo) if math.isfinite(g["hi"]) else on_hi - off_lo
            entry["pi_gain"] = {**g, "hi_binomial": on_hi - off_lo}
            entry["pi_higher"] = ("holds" if g["lo"] > 0 else "does not hold"
                                  if hi < MIN_RETRIEVAL_GAIN else "inconclusive")
        retrieval[str(L)] = entry
    out = {"model": runs[0]["meta"].get("model", runs[0]["name"]), "d_model": runs[0]["meta"]["d_model"],
           "n_layers": runs[0]["meta"]["n_layers"], "train_len": lt,
           "seeds": [r["meta"].get("seed", 0) for r in runs], "loss": loss,
           "strength": {str(a): stats.mean_se(v) for a, v in sorted(strength.items())},
           "pi_lower_loss_beyond": _combine([v["pi_lower"] for v in loss.values()
                                             if v["pi_lower"] is not None]),
           "retrieval": retrieval}
    if retrieval:
        at_lt = retrieval.get(str(lt), {}).get("accuracy", {}).get("0.0", {}).get("mean", 0.0)
        out["retrieval_learned_at_train_len"] = at_lt
        if at_lt < LEARNED:
            out["pi_higher_retrieval_beyond"] = "inconclusive"
            out["retrieval_note"] = (f"retrieval not learned at L_train (accuracy {at_lt:.2f} < "
                                     f"{LEARNED}): nothing to extrapolate")
        else:
            out["pi_higher_retrieval_beyond"] = _combine(
                [e["pi_higher"] for e in retrieval.values() if "pi_higher" in e])
    return out


def summarize(results: Sequence[dict], conf: float = stats.CONF) -> dict:
    """Per model (seeds pooled): LM loss per length, PI off/on, mean +- s.e. and the PI gain's
    t-interval over seeds; the partial-interpolation curve; passkey accuracy per length and
    interpolation strength, and PI's accuracy gain beyond L_train with its interval. Verdicts:
    "PI lowers the loss beyond L_train" and "PI raises retrieval accuracy beyond L_train"."""
    ok = [r for r in results if r.get("status") == "ok" and "post" in r]
    models: dict = {}
    for r in ok:
        models.setdefault(r["meta"].get("model", r["name"]), []).append(r)
    summ = [_model_summary(rs, conf) for _, rs in sorted(models.items())]
    lm = _combine([m["pi_lower_loss_beyond"] for m in summ])
    ret = [m["pi_higher_retrieval_beyond"] for m in summ if "pi_higher_retrieval_beyond" in m]
    return {"conf": conf, "models": summ, "lm_claim": lm,
            "retrieval_claim": _combine(ret) if ret else None,
            "claim_held": lm == "holds"}


def plot(results: Sequence[dict], summary: dict, fig_dir: Path, prefix: str = "alibi") -> list[str]:
    import numpy as np

    plt = recipes.pyplot()
    models = summary["models"]
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for i, m in enumerate(models):
        L = [int(x) for x in m["loss"]]
        for key, fmt in (("off", "o--"), ("on", "s-")):
            y = [m["loss"][str(x)][key]["mean"] for x in L]
            e = [np.nan_to_num(m["loss"][str(x)][key]["se"]) for x in L]
            ax.errorbar(L, y, yerr=e, fmt=fmt, color=f"C{i}", capsize=3,
                        label=f"{m['model']}, {'PI' if key == 'on' else 'no PI'}")
    if models:
        ax.axvline(models[0]["train_len"], color="k", lw=0.8, ls=":")
    ax.set_xscale("log", base=2)
    recipes.finish_axes(ax, "evaluation length (tokens)", "validation loss (mean +- s.e.)",
                        "ALiBi: LM loss vs length (dotted: training length)")
    paths = [recipes.save_figure(fig, fig_dir, f"{prefix}_loss_vs_length.png")]

    with_ret = [m for m in models if m["retrieval"]]
    if with_ret:
        fig, axes = plt.subplots(1, len(with_ret), figsize=(5.5 * len(with_ret), 4),
                                 squeeze=False)
        for ax, m in zip(axes[0], with_ret):
            L = [int(x) for x in m["retrieval"]]
            alphas = sorted({a for e in m["retrieval"].values() for a in e["accuracy"]}, key=float)
            for j, a in enumerate(alphas):
                y = [m["retrieval"][str(x)]["accuracy"][a]["mean"] for x in L]
                e = [np.nan_to_num(m["retrieval"][str(x)]["accuracy"][a]["se"]) for x in L]
                lab = {"0.0": "no PI", "1.0": "PI"}.get(a, f"partial, alpha {float(a):g}")
                ax.errorbar(np.array(L) * (1 + 0.03 * (j - 2)), y, yerr=e, fmt="o-", capsize=3,
                            label=lab, color=plt.cm.viridis(j / max(1, len(alphas) - 1)))
            ax.axvline(m["train_len"], color="k", lw=0.8, ls=":")
            ax.set_xscale("log", base=2)
            ax.set_ylim(-0.05, 1.05)
            recipes.finish_axes(ax, "evaluation length (key beyond L_train past 1x)",
                                "passkey accuracy (mean +- s.e.)",
                                f"{m['model']}: retrieval, slopes / (L/L_train)^alpha")
        paths.append(recipes.save_figure(fig, fig_dir, f"{prefix}_retrieval.png"))

    ok = [r for r in results if r.get("status") == "ok" and "post" in r
          and r["meta"].get("seed", 0) == min(m["seeds"][0] for m in models)] if models else []
    fig, axes = plt.subplots(1, max(1, len(ok)), figsize=(5.5 * max(1, len(ok)), 4), squeeze=False)
    for ax, r in zip(axes[0], ok):
        lt = r["meta"]["train_len"]
        longest = max(e["length"] for e in r["post"]["evals"])
        w = 1
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
                            f"{r['meta'].get('model', '')} seed {r['meta'].get('seed', 0)} at "
                            f"length {longest} (trained at {lt})")
    paths.append(recipes.save_figure(fig, fig_dir, f"{prefix}_per_position.png"))
    return paths


def report(summary: dict) -> str:
    pc = f"{100 * summary['conf']:.0f}%"
    lines = []
    for m in summary["models"]:
        lines.append(f"{m['model']} (trained at {m['train_len']}, seeds {m['seeds']}):")
        for L, v in m["loss"].items():
            g = v["gain"]
            lines.append(f"  L={L:>5}  loss no PI {v['off']['mean']:.4f} +- {v['off']['se']:.4f}  "
                         f"PI {v['on']['mean']:.4f} +- {v['on']['se']:.4f}  PI gain "
                         f"{g['mean']:+.4f} {pc} CI [{g['lo']:+.4f}, {g['hi']:+.4f}]"
                         + (f" -> PI lower: {v['pi_lower']}" if v["pi_lower"] else ""))
        if m["strength"]:
            lines.append("  loss at the longest length, slopes / (L/L_train)^alpha: " + ", ".join(
                f"alpha {float(a):g}: {v['mean']:.4f}" for a, v in m["strength"].items()))
        for L, e in m["retrieval"].items():
            accs = ", ".join(f"alpha {float(a):g}: {v['mean']:.2f}" for a, v in
                             e["accuracy"].items())
            extra = ""
            if "pi_gain" in e:
                g = e["pi_gain"]
                extra = (f"; PI - no PI {g['mean']:+.2f} {pc} CI [{g['lo']:+.2f}, {g['hi']:+.2f}]"
                         f" (binomial upper bound {g.get('hi_binomial', float('nan')):+.2f})"
                         f" -> PI higher: {e['pi_higher']}")
            lines.append(f"  passkey L={L:>5}: {accs}{extra}")
        lines.append(f"  PI lowers the LM loss at every length beyond training: "
                     f"{m['pi_lower_loss_beyond']}")
        if "pi_higher_retrieval_beyond" in m:
            lines.append(f"  PI raises passkey accuracy at every length beyond training: "
                         f"{m['pi_higher_retrieval_beyond']}"
                         + (f" ({m['retrieval_note']})" if m.get("retrieval_note") else ""))
    if summary.get("retrieval_claim"):
        lines.append(f"retrieval claim (PI raises accuracy beyond L_train, every model; 'does not "
                     f"hold': a gain of {MIN_RETRIEVAL_GAIN:g} or more is ruled out): "
                     f"{summary['retrieval_claim']}")
    return recipes.verdict(lines, "LM-loss claim (PI lowers the loss beyond L_train, every model)",
                           summary["lm_claim"])


def analyze(results: Sequence[dict], info: dict, out: Path) -> tuple[dict, list[str], str]:
    """The runner's analysis step: summary, figures, report."""
    summary = summarize(results)
    return summary, plot(results, summary, Path(out) / "figures"), report(summary)


def main(argv: Sequence[str] | None = None) -> int:
    return runner.main("alibi_pi", argv)


if __name__ == "__main__":
    sys.exit(main())
