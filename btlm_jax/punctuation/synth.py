"""Build the synthetic-speech punctuation dataset: text -> espeak-ng audio -> per-word features.

    python -m btlm_jax.punctuation.synth --out=DIR [--text=FILE] [--config=configs/punctuation.py]

Splits: ``train`` and ``test`` come from disjoint source documents and share the main voice;
``test_voice2`` is the same test text spoken by another voice at another rate.

Each (utterance, voice, rate, pitch) is cached as ``DIR/utts/<key>.npz`` (raw per-word features,
word start samples, audio length); ``DIR/manifest.json`` lists the splits. Re-running only
synthesises what is missing, so growing ``n_train`` or adding a text reuses earlier work.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pathlib
import sys
import time

import numpy as np

from btlm_jax.punctuation import features as feats_mod
from btlm_jax.punctuation import text as text_mod

FEATURE_VERSION = 1  # bump when feature extraction changes: invalidates cached files
SPLITS = ("train", "test", "test_voice2")


@dataclasses.dataclass(frozen=True)
class Voice:
    name: str
    rate: int
    pitch: int


def voices(cfg) -> dict[str, Voice]:
    d = cfg.data
    main = Voice(d.voice, int(d.rate), int(d.pitch))
    return {"train": main, "test": main,
            "test_voice2": Voice(d.test2_voice, int(d.test2_rate), int(d.test2_pitch))}


def cache_key(spoken: str, voice: Voice) -> str:
    s = f"v{FEATURE_VERSION}|{voice.name}|{voice.rate}|{voice.pitch}|{spoken}"
    return hashlib.sha1(s.encode("utf-8")).hexdigest()[:20]


def synthesize_one(spoken: str, voice: Voice) -> dict[str, np.ndarray]:
    """Synthesise one utterance and extract its raw per-word features."""
    from btlm_jax.punctuation import tts

    engine = tts.get_engine()
    engine.set_voice(voice.name, voice.rate, voice.pitch)
    syn = engine.synthesize(spoken)
    raw = feats_mod.word_features(syn.audio, syn.sample_rate, syn.word_starts)
    return {
        "features": raw.astype(np.float32),
        "word_starts": syn.word_starts,
        "n_samples": np.int64(len(syn.audio)),
        "sample_rate": np.int64(syn.sample_rate),
        "n_events": np.int64(syn.n_events),
    }


def _write_npz(path: pathlib.Path, arrays: dict[str, np.ndarray]) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}.npz")
    np.savez(tmp, **arrays)
    os.replace(tmp, path)


def _job(args):
    spoken, voice, path = args
    _write_npz(pathlib.Path(path), synthesize_one(spoken, voice))
    return path


def plan_splits(cfg) -> dict[str, list[text_mod.Utterance]]:
    """Which utterances go into each split (deterministic given the config and the text)."""
    d = cfg.data
    docs = text_mod.file_documents(d.text) if d.text else text_mod.stdlib_documents()
    utts = text_mod.make_utterances(docs, min_words=d.min_words, max_words=d.max_words, seed=d.seed)
    train, test = text_mod.split_by_document(utts, d.test_fraction, d.seed)
    rng = np.random.default_rng(d.seed)
    train = [train[i] for i in rng.permutation(len(train))]
    test = [test[i] for i in rng.permutation(len(test))]
    if d.n_train:
        train = train[: d.n_train]
    if d.n_test:
        test = test[: d.n_test]
    if not train or not test:
        src = d.text or "the Python installation's prose"
        raise ValueError(
            f"{src} gave {len(train)} training and {len(test)} test utterances; need both > 0. "
            "Use a longer text (plain English sentences ending in . or ?), or lower "
            "data.min_words / raise data.test_fraction"
        )
    return {"train": train, "test": test, "test_voice2": test}


def build(cfg, out_dir: str | os.PathLike, *, verbose: bool = True) -> pathlib.Path:
    """Synthesise whatever is missing and write the manifest; returns the manifest path."""
    out = pathlib.Path(out_dir)
    (out / "utts").mkdir(parents=True, exist_ok=True)
    plan = plan_splits(cfg)
    vs = voices(cfg)
    # Fail fast on a missing library or a bad voice, before any work is queued.
    from btlm_jax.punctuation import tts

    engine = tts.get_engine()
    for v in {vs[s] for s in SPLITS}:
        engine.set_voice(v.name, v.rate, v.pitch)

    todo, manifest = [], {"feature_version": FEATURE_VERSION, "feature_names": feats_mod.FEATURE_NAMES,
                          "classes": text_mod.CLASSES, "splits": {}}
    for split in SPLITS:
        v = vs[split]
        entries = []
        for u in plan[split]:
            key = cache_key(u.spoken, v)
            path = out / "utts" / f"{key}.npz"
            entries.append({"key": key, "spoken": u.spoken})
            if not path.exists():
                todo.append((u.spoken, v, str(path)))
        manifest["splits"][split] = {"voice": dataclasses.asdict(v), "utterances": entries}
    seen, unique_todo = set(), []
    for job in todo:
        if job[2] not in seen:
            seen.add(job[2])
            unique_todo.append(job)
    n_total = sum(len(plan[s]) for s in SPLITS)
    if verbose:
        print(f"[synth] {n_total} utterances planned, {n_total - len(unique_todo)} cached, "
              f"{len(unique_todo)} to synthesise", flush=True)
    t0 = time.time()
    if unique_todo:
        if cfg.data.workers > 1:
            import multiprocessing as mp

            with mp.get_context("spawn").Pool(cfg.data.workers) as pool:
                for i, _ in enumerate(pool.imap_unordered(_job, unique_todo, chunksize=8)):
                    _progress(verbose, i + 1, len(unique_todo), t0)
        else:
            for i, job in enumerate(unique_todo):
                _job(job)
                _progress(verbose, i + 1, len(unique_todo), t0)
    stats = {}
    for split in SPLITS:
        labels = [text_mod.words_and_labels(e["spoken"])[1] for e in manifest["splits"][split]["utterances"]]
        counts = np.bincount(np.concatenate([np.array(l) for l in labels]), minlength=len(text_mod.CLASSES))
        stats[split] = {"utterances": len(labels), "words": int(counts.sum()),
                        "label_counts": dict(zip(text_mod.CLASSES, map(int, counts)))}
    manifest["stats"] = stats
    tmp = out / "manifest.json.tmp"
    tmp.write_text(json.dumps(manifest, indent=1))
    os.replace(tmp, out / "manifest.json")
    if verbose:
        print(f"[synth] wrote {out / 'manifest.json'} in {time.time() - t0:.1f}s: "
              + ", ".join(f"{s} {stats[s]['utterances']}" for s in SPLITS), flush=True)
    return out / "manifest.json"


def _progress(verbose, i, n, t0):
    if verbose and (i % 250 == 0 or i == n):
        print(f"[synth] {i}/{n} ({(time.time() - t0) / i * 1000:.0f} ms/utt)", flush=True)


def load_split(data_dir: str | os.PathLike, split: str) -> list[dict]:
    """Utterances of one split: words, labels (class ids), raw features (n_words, 5)."""
    d = pathlib.Path(data_dir)
    mpath = d / "manifest.json"
    if not mpath.is_file():
        raise FileNotFoundError(f"no dataset manifest at {mpath}; build it with "
                                f"`python -m btlm_jax.punctuation.synth --out={d}`")
    manifest = json.loads(mpath.read_text())
    if manifest.get("feature_version") != FEATURE_VERSION:
        raise ValueError(f"{mpath} was built with feature version {manifest.get('feature_version')}, "
                         f"this code uses {FEATURE_VERSION}; re-run the synth command")
    if split not in manifest["splits"]:
        raise KeyError(f"split {split!r} not in {mpath}; have {sorted(manifest['splits'])}")
    out = []
    for e in manifest["splits"][split]["utterances"]:
        path = d / "utts" / f"{e['key']}.npz"
        if not path.is_file():
            raise FileNotFoundError(f"{path} listed in {mpath} is missing; re-run the synth command")
        with np.load(path) as z:
            words, labels = text_mod.words_and_labels(e["spoken"])
            f = z["features"]
            if len(f) != len(words):
                raise ValueError(f"{path}: {len(f)} feature rows for {len(words)} words; delete it and re-run synth")
            out.append({"words": words, "labels": np.array(labels, np.int32), "features": f,
                        "spoken": e["spoken"]})
    return out


def _main(argv):
    from absl import flags

    FLAGS = flags.FLAGS
    from btlm_jax.punctuation import config as cfg_mod

    cfg = cfg_mod.validate(FLAGS.config)
    if FLAGS.text:
        cfg.data.text = FLAGS.text
    out = FLAGS.out or cfg.data.cache_dir
    if not out:
        raise SystemExit("give --out=DIR (where the dataset cache and manifest go)")
    try:
        build(cfg, out)
    except Exception as e:  # user-facing: one clear line, not a traceback
        from btlm_jax.punctuation.tts import EspeakError

        if isinstance(e, (EspeakError, FileNotFoundError, ValueError)):
            raise SystemExit(f"error: {e}") from e
        raise


def default_config_path() -> str:
    p = pathlib.Path(__file__).resolve().parents[2] / "configs" / "punctuation.py"
    return str(p)


def define_config_flag():
    from absl import flags
    from ml_collections import config_flags

    if pathlib.Path(default_config_path()).is_file():
        config_flags.DEFINE_config_file("config", default_config_path(),
                                        "config file (configs/punctuation.py[:preset])", lock_config=True)
    else:  # installed without the configs/ folder
        from btlm_jax.punctuation.config import default_config

        config_flags.DEFINE_config_dict("config", default_config(), "config")
    return flags


if __name__ == "__main__":
    from absl import app

    flags = define_config_flag()
    flags.DEFINE_string("out", "", "dataset directory (cache + manifest.json)")
    flags.DEFINE_string("text", "", "punctuated English text file (default: Python's own prose)")
    app.run(_main)
