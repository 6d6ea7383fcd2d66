"""What the reproduction experiments share: command-line options, data preparation (any text
corpus -> train/held-out JSONL), one tokenizer per experiment, model/run overrides and figures."""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
from pathlib import Path
from typing import Any, Sequence

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # launch/ and configs/ live at the repository root
    sys.path.insert(0, str(REPO))

from launch import sweep  # noqa: E402

SEQ_LEN = 128
SP_INIT_STD = 0.02  # GPT-2 / Cerebras-GPT init for the standard parametrisation


class ExperimentError(ValueError):
    """Bad experiment input (data path, option); the message says what to change."""


def parser(description: str, name: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"python -m experiments.{name}", description=description)
    p.add_argument("--out", default=str(REPO / "runs" / "repro" / name),
                   type=lambda x: str(Path(x).expanduser().absolute()),
                   help="output directory: runs/, results.jsonl, figures/ (default %(default)s)")
    p.add_argument("--scale", type=float, default=1.0,
                   help="model/data scale: 1 = the 2-core CPU default; larger for real hardware")
    p.add_argument("--data", default="",
                   help="training text: comma-separated globs of .txt/.jsonl/.jsonl.zst (optionally "
                   "label=glob); split into train and held-out here. Default: the embedded corpus")
    p.add_argument("--smoke", action="store_true", help="a 2-3 run grid of a few steps (tests)")
    p.add_argument("--seed", type=int, default=0)
    sweep.add_launch_args(p)
    return p


def log(msg: str) -> None:
    print(msg, flush=True)


# ----------------------------------------------------------------------------------------------
# Data.


def _chunks(text: str, chunk_chars: int) -> list[str]:
    """Splits a long text into pieces of about ``chunk_chars`` at paragraph (else line) breaks."""
    if len(text) <= 2 * chunk_chars:
        return [text]
    out, cur, size = [], [], 0
    for para in text.split("\n\n") if text.count("\n\n") > 2 else text.split("\n"):
        cur.append(para)
        size += len(para) + 2
        if size >= chunk_chars:
            out.append("\n\n".join(cur) if text.count("\n\n") > 2 else "\n".join(cur))
            cur, size = [], 0
    if cur:
        tail = "\n\n".join(cur) if text.count("\n\n") > 2 else "\n".join(cur)
        if out and len(tail) < chunk_chars // 4:
            out[-1] += "\n" + tail
        else:
            out.append(tail)
    return [c for c in out if c.strip()]


def _stamp(files: Sequence[tuple[str | None, str]], **params) -> str:
    h = hashlib.sha1(json.dumps(params, sort_keys=True).encode())
    for label, p in files:
        st = os.stat(p)
        h.update(json.dumps([label, os.path.abspath(p), st.st_size, st.st_mtime_ns]).encode())
    return h.hexdigest()


def read_documents(spec: str) -> list[tuple[str, str]]:
    """(source, text) of every document of comma-separated globs (``label=glob`` allowed)."""
    from btlm_jax.data import slimpajama

    try:
        files = slimpajama.expand_globs(spec, "--data")
    except slimpajama.DataError as e:
        raise ExperimentError(str(e)) from None
    docs = []
    for label, path in files:
        docs.extend(slimpajama.read_documents(path, label=label))
    if not docs:
        raise ExperimentError(f"--data={spec!r}: the files hold no text")
    return docs


def split_documents(docs: Sequence[tuple[str, str]], *, chunk_chars: int = 4000,
                    holdout_every: int = 10) -> tuple[list[dict], list[dict]]:
    """Chunks long documents and holds out every ``holdout_every``-th chunk (deterministic)."""
    train, held = [], []
    k = 0
    for source, text in docs:
        for piece in _chunks(text, chunk_chars):
            rec = {"text": piece, "meta": {"redpajama_set_name": source}}
            (held if k % holdout_every == holdout_every // 2 else train).append(rec)
            k += 1
    if not held or not train:
        raise ExperimentError(
            f"the text is too short to split into train and held-out parts ({k} chunk(s) of "
            f"~{chunk_chars} characters); give more text")
    return train, held


def _write_jsonl(path: Path, recs: Sequence[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for r in recs:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def prepare_data(data: str, out: Path) -> dict[str, str]:
    """``{"train": glob, "eval": glob, "name": ...}``: the embedded corpus' own split when
    ``data`` is empty, else ``data`` chunked and split into ``OUT/data/{train,eval}.jsonl``
    (rebuilt only when the input files change)."""
    if not data:
        from btlm_jax.data.sample import build_sample_corpus

        paths = build_sample_corpus()
        return {"train": paths["train"], "eval": paths["eval"], "name": "embedded sample corpus"}
    from btlm_jax.data import slimpajama

    try:
        files = slimpajama.expand_globs(data, "--data")
    except slimpajama.DataError as e:
        raise ExperimentError(str(e)) from None
    ddir = out / "data"
    stamp = _stamp(files, chunk_chars=4000, holdout_every=10)
    manifest = ddir / "manifest.json"
    res = {"train": str(ddir / "train.jsonl"), "eval": str(ddir / "eval.jsonl"), "name": data}
    if manifest.exists() and json.loads(manifest.read_text()).get("stamp") == stamp:
        return res
    train, held = split_documents(read_documents(data))
    _write_jsonl(ddir / "train.jsonl", train)
    _write_jsonl(ddir / "eval.jsonl", held)
    manifest.write_text(json.dumps({"stamp": stamp, "data": data, "train_docs": len(train),
                                    "eval_docs": len(held)}))
    return res


def tokenizer_for(train_glob: str, vocab_size: int) -> str:
    """Trains (once, cached) a sentencepiece tokenizer on the training data; returns its path.

    Every run of an experiment shares it, so losses are comparable across runs."""
    from btlm_jax.config import default_config
    from btlm_jax.data import slimpajama
    from btlm_jax.data.sample import default_cache_dir
    from btlm_jax.data.tokenizer import load_or_train

    cfg = default_config()
    cfg.model.vocab_size = int(vocab_size)
    cfg.data.train = train_glob
    tok = load_or_train(cfg, train_glob)
    # build the document indices once here, not concurrently in every run
    slimpajama.Corpus(train_glob, cache_dir=str(default_cache_dir()))
    return tok.name


def index_eval(eval_glob: str) -> None:
    from btlm_jax.data import slimpajama
    from btlm_jax.data.sample import default_cache_dir

    slimpajama.Corpus(eval_glob, key="data.eval", cache_dir=str(default_cache_dir()))


# ----------------------------------------------------------------------------------------------
# Models and runs.


def model_overrides(d_model: int, n_layers: int, vocab: int, *, mup: bool = True,
                    base_d_model: int = 64, head_dim: int = 16) -> dict[str, Any]:
    """A BTLM-shaped model (ALiBi, SwiGLU 8/3 d, tied embeddings). ``mup``: muP with base width
    ``base_d_model`` (BTLM's multipliers); else standard parametrisation, init std 0.02."""
    o = {
        "model.d_model": int(d_model), "model.n_layers": int(n_layers),
        "model.n_heads": max(1, int(d_model) // head_dim),
        "model.d_ff": int(round(8 * d_model / 3)), "model.vocab_size": int(vocab),
        "model.mup.enabled": bool(mup),
    }
    if mup:
        o["model.mup.base_d_model"] = int(base_d_model)
        o["model.mup.base_d_ff"] = 8 * base_d_model / 3
        o["optim.mup_lr_scaling"] = True
    else:
        o["model.init_std"] = SP_INIT_STD
        o["optim.mup_lr_scaling"] = False
    return o


def run_overrides(*, steps: int, batch: int, data: dict, tokenizer: str, seq_len: int = SEQ_LEN,
                  warmup: int | None = None, evals: int = 1, eval_batches: int = 8,
                  eval_batch: int = 8, seed: int = 0) -> dict[str, Any]:
    """Training-run settings: ``evals`` evaluations spread over the run (the last at the end),
    one checkpoint at the end, no progress bar or TensorBoard (many runs share a terminal)."""
    steps = int(steps)
    return {
        "train.steps": steps, "train.batch_size": int(batch), "train.seq_len": int(seq_len),
        "optim.warmup_steps": int(warmup if warmup is not None else max(1, steps // 10)),
        "train.log_every_steps": max(1, steps // 25),
        "eval.every_steps": max(1, steps // max(1, evals)),
        "eval.num_batches": int(eval_batches), "eval.batch_size": int(eval_batch),
        "checkpoint.every_steps": steps, "checkpoint.keep": 1,
        "logging.tensorboard": False, "logging.progress_bar": False,
        "data.train": data["train"], "data.eval": data["eval"], "data.tokenizer": tokenizer,
        "seed": int(seed),
    }


def count_params(overrides: dict[str, Any]) -> int:
    """Exact parameter count of the model the overrides describe (nothing allocated)."""
    from btlm_jax.describe import describe

    cfg = sweep.apply_overrides(sweep.load_preset("configs/btlm.py", "tiny"), overrides)
    return int(describe(cfg)["num_params"])


def steps_for_tpp(tpp: float, num_params: int, tokens_per_step: int) -> int:
    return max(1, int(math.ceil(tpp * num_params / tokens_per_step)))


def save_figure(fig, fig_dir: Path, name: str) -> str:
    path = Path(fig_dir) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return str(path)


def write_jsonl(path: Path, records: Sequence[dict]) -> None:
    _write_jsonl(path, records)


def finish(out: Path, complete: bool, n_results: int, n_tasks: int, slurm: bool) -> int:
    if slurm and not complete:
        return 0
    if not complete:
        log(f"{n_tasks - n_results} of {n_tasks} runs failed or are missing (see the messages "
            f"above); rerun the same command to retry them. Partial results are in {out}")
        return 1
    return 0
