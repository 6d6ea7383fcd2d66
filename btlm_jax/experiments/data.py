"""Experiment data: any text corpus -> train / held-out JSONL, and one tokenizer per experiment.

``prepare_data("", out)`` is the embedded sample corpus' own split; ``prepare_data(globs, out)``
chunks the documents of comma-separated globs (``.txt``/``.jsonl``/``.jsonl.zst``, optionally
``label=glob``) and holds out every tenth chunk, rebuilt only when the input files change.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Sequence


class ExperimentError(ValueError):
    """Bad experiment input (data path, option); the message says what to change."""


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


def write_jsonl(path: Path, recs: Sequence[dict]) -> None:
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
    write_jsonl(ddir / "train.jsonl", train)
    write_jsonl(ddir / "eval.jsonl", held)
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
