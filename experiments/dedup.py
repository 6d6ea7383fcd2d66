"""Global vs local deduplication (SlimPajama-DC): a multi-source corpus with duplicates inside
and across sources, deduplicated with one MinHash-LSH index over all sources (global) and with
one per source (local); per-source removal rates; the same model trained on each; validation
loss on a common held-out set.

    python -m experiments.dedup [--out DIR] [--data GLOB] [--scale S] [--workers N] [--slurm]

The corpus is built from the training split of the data (the embedded corpus or ``--data``):
each source keeps its documents; 10% of them get a near-copy (1% of the words dropped, a line
added) in the same source and 25% get one in the next source. Local dedup can only remove the
first kind; global removes both, so it removes more from every source (SlimPajama: global dedup
took RedPajama from 1.21T to 627B tokens). Writes ``OUT/corpus/{raw,local,global}/``,
``OUT/dedup_stats.json`` (removal per source), ``OUT/results.jsonl``, ``OUT/summary.json``,
``OUT/figures/dedup_removal.png``, ``OUT/figures/dedup_val_loss.png``.

The model and grid are ``configs/experiments/dedup.py``; :func:`prepare` builds the corpora.

Default (scale 1, about 12 minutes on an idle 2-core CPU): width 64 x 2 layers, vocabulary 1024,
600 steps of 16 x 128 tokens on raw, locally and globally deduplicated data, seeds 0 and 1.
"""

from __future__ import annotations

import json
import math
import random
import shutil
import sys
from pathlib import Path
from typing import Sequence

from btlm_jax.experiments import recipes, runner
from btlm_jax.experiments.data import index_eval, read_documents, write_jsonl

CORPORA = ("raw", "local", "global")
WITHIN_FRACTION = 0.10
CROSS_FRACTION = 0.25
MIN_CHARS = 400  # well above the dedup length filter (200), so removals are duplicates


def near_copy(text: str, rng: random.Random) -> str:
    """A near-duplicate: 1% of the words dropped and a short line appended (Jaccard ~0.9+)."""
    words = text.split(" ")
    keep = [w for w in words if rng.random() >= 0.01] or words
    return " ".join(keep) + f"\n(copy {rng.randrange(10**6)})"


def build_corpus(train_glob: str, out: Path, *, seed: int = 0, max_docs: int = 0) -> dict:
    """Writes ``OUT/corpus/raw/<source>.jsonl``; returns counts of originals and copies."""
    docs = [(s, t) for s, t in read_documents(train_glob) if len(t) >= MIN_CHARS]
    rng = random.Random(seed)
    rng.shuffle(docs)
    if max_docs:
        docs = docs[:max_docs]
    sources = sorted({s for s, _ in docs})
    if len(sources) < 2:  # one source (a single text file): split it into three
        names = ["part_a", "part_b", "part_c"]
        docs = [(names[i % 3], t) for i, (_, t) in enumerate(docs)]
        sources = names
    by_src: dict[str, list[dict]] = {s: [] for s in sources}
    counts = {s: {"original": 0, "within_copies": 0, "cross_copies_received": 0} for s in sources}
    for s, t in docs:
        by_src[s].append({"text": t, "meta": {"redpajama_set_name": s, "kind": "original"}})
        counts[s]["original"] += 1
    for i, s in enumerate(sources):
        nxt = sources[(i + 1) % len(sources)]
        for d in list(by_src[s]):
            if d["meta"]["kind"] != "original":
                continue
            r = rng.random()
            if r < WITHIN_FRACTION:
                by_src[s].append({"text": near_copy(d["text"], rng),
                                  "meta": {"redpajama_set_name": s, "kind": "within_copy"}})
                counts[s]["within_copies"] += 1
            elif r < WITHIN_FRACTION + CROSS_FRACTION:
                by_src[nxt].append({"text": near_copy(d["text"], rng),
                                    "meta": {"redpajama_set_name": nxt, "kind": "cross_copy"}})
                counts[nxt]["cross_copies_received"] += 1
    raw = out / "corpus" / "raw"
    if raw.exists():
        shutil.rmtree(raw)
    for s, recs in by_src.items():
        rng.shuffle(recs)
        write_jsonl(raw / f"{s}.jsonl", recs)
    return counts


def dedup(out: Path, mode: str, workers: int) -> dict:
    from btlm_jax.data.dedup.pipeline import DedupConfig, run_dedup

    dst = out / "corpus" / mode
    if dst.exists():
        shutil.rmtree(dst)
    return run_dedup(DedupConfig(inputs=[str(out / "corpus" / "raw" / "*.jsonl")], output=str(dst),
                                 mode=mode, workers=max(1, workers), progress=False))


def build_and_dedup(args, out: Path, data: dict, max_docs: int) -> dict:
    """Builds the corpus and both deduplicated versions once (kept across reruns)."""
    stats_path = out / "dedup_stats.json"
    if stats_path.exists():
        return json.loads(stats_path.read_text())
    counts = build_corpus(data["train"], out, seed=args.seed, max_docs=max_docs)
    stats = {"built_from": data["name"], "counts": counts, "modes": {}}
    for mode in ("local", "global"):
        st = dedup(out, mode, args.workers)
        stats["modes"][mode] = {"per_source": st["per_source"], "total": st["total"],
                                "duplicates_by_source": st.get("duplicates_by_source", {})}
    stats_path.write_text(json.dumps(stats, indent=1))
    return stats


def removal_rates(stats: dict) -> dict:
    """{mode: {source: {"documents": fraction removed, "bytes": fraction removed}}}."""
    out = {}
    for mode, st in stats["modes"].items():
        rows = {}
        for src, b in list(st["per_source"].items()) + [("all", st["total"])]:
            n_in, by_in = b["input"]["documents"], b["input"]["bytes"]
            rows[src] = {"documents": 1 - b["kept"]["documents"] / max(n_in, 1),
                         "bytes": 1 - b["kept"]["bytes"] / max(by_in, 1),
                         "input_documents": n_in, "kept_documents": b["kept"]["documents"]}
        out[mode] = rows
    return out


def prepare(args, out: Path, data: dict, *, corpora: Sequence[str], max_docs: int) -> dict:
    """The runner's prepare hook: the corpora (built and deduplicated once) as a ``corpus`` axis
    setting ``data.train`` to each corpus' source shards, and the removal rates as info."""
    stats = build_and_dedup(args, Path(out), data, max_docs)
    axis = {}
    for corpus in corpora:
        cdir = Path(out) / "corpus" / corpus
        # the source shards only (the dedup output also holds duplicates.jsonl and stats.json)
        glob = ",".join(str(cdir / f"{src}.jsonl") for src in sorted(stats["counts"]))
        index_eval(glob)  # build the document index once here, not in every run
        axis[corpus] = {"data.train": glob}
    return {"axes": {"corpus": axis},
            "info": {"removal": removal_rates(stats), "counts": stats["counts"]}}


# ----------------------------------------------------------------------------------------------
# Analysis (also used by notebooks/repro_dedup.ipynb).


def summarize(results: Sequence[dict], removal: dict) -> dict:
    losses: dict[str, list[float]] = {}
    for r in results:
        v = r.get("final", {}).get("eval_loss")
        if r.get("status") == "ok" and v is not None and math.isfinite(v):
            losses.setdefault(r["meta"]["corpus"], []).append(float(v))
    mean = {c: sum(v) / len(v) for c, v in losses.items()}
    spread = {c: (max(v) - min(v)) for c, v in losses.items()}
    srcs = [s for s in removal.get("global", {}) if s != "all"]
    global_removes_more = bool(srcs) and "local" in removal and all(
        removal["global"][s]["documents"] >= removal["local"][s]["documents"] for s in srcs)
    out = {"val_loss": losses, "val_loss_mean": mean, "val_loss_seed_spread": spread,
           "global_removes_at_least_local_everywhere": global_removes_more,
           "removal": removal}
    if "global" in mean and "local" in mean:
        out["global_minus_local"] = mean["global"] - mean["local"]
    if "global" in mean and "raw" in mean:
        out["global_minus_raw"] = mean["global"] - mean["raw"]
    return out


def plot(summary: dict, fig_dir: Path, prefix: str = "dedup") -> list[str]:
    import numpy as np

    plt = recipes.pyplot()

    rem = summary["removal"]
    srcs = [s for s in rem.get("global", {}) if s != "all"] + ["all"]
    fig, ax = plt.subplots(figsize=(max(5, 1.4 * len(srcs) + 2), 3.8))
    x = np.arange(len(srcs))
    for k, mode in enumerate(("local", "global")):
        if mode in rem:
            ax.bar(x + (k - 0.5) * 0.38, [100 * rem[mode][s]["documents"] for s in srcs], 0.38,
                   label=f"{mode} dedup", color=f"C{k}")
    ax.set_xticks(x, srcs, rotation=15, fontsize=8)
    recipes.finish_axes(ax, "", "documents removed (%)", "Removal rate per source", grid_axis="y")
    paths = [recipes.save_figure(fig, fig_dir, f"{prefix}_removal.png")]

    fig, ax = plt.subplots(figsize=(4.8, 3.8))
    corp = [c for c in CORPORA if c in summary["val_loss"]]
    for i, c in enumerate(corp):
        v = summary["val_loss"][c]
        ax.scatter([i] * len(v), v, color=f"C{i}", zorder=3)
        ax.bar(i, summary["val_loss_mean"][c], 0.5, color=f"C{i}", alpha=0.35)
    ax.set_xticks(range(len(corp)), corp)
    if corp:
        lo = min(min(v) for v in summary["val_loss"].values())
        hi = max(max(v) for v in summary["val_loss"].values())
        pad = max(0.02, (hi - lo))
        ax.set_ylim(lo - pad, hi + pad)
    recipes.finish_axes(ax, "", "validation loss (common held-out set)",
                        "Same model, same steps, by training corpus", legend=False, grid_axis="y")
    paths.append(recipes.save_figure(fig, fig_dir, f"{prefix}_val_loss.png"))
    return paths


def report(summary: dict) -> str:
    lines = ["documents removed per source (local / global):"]
    rem = summary["removal"]
    for s in rem.get("global", {}):
        lines.append(f"  {s:<20} {100 * rem.get('local', {}).get(s, {}).get('documents', float('nan')):6.2f}% / "
                     f"{100 * rem['global'][s]['documents']:6.2f}%")
    for c, v in summary["val_loss"].items():
        lines.append(f"  trained on {c:<6}: val loss {summary['val_loss_mean'][c]:.4f} "
                     f"(seeds: {', '.join(f'{x:.4f}' for x in v)})")
    return recipes.verdict(lines, "global dedup removes at least as much as local from every "
                           "source", summary["global_removes_at_least_local_everywhere"])


def analyze(results: Sequence[dict], info: dict, out: Path) -> tuple[dict, list[str], str]:
    """The runner's analysis step: summary, figures, report."""
    summary = summarize(results, info["removal"])
    return summary, plot(summary, Path(out) / "figures"), report(summary)


def main(argv: Sequence[str] | None = None) -> int:
    return runner.main("dedup", argv)


if __name__ == "__main__":
    sys.exit(main())
