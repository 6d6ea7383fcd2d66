"""The run directory: resolved config, pinned tokenizer, checkpoints, metrics, preemption.

A run directory is self-contained::

    RUN/config.json      the resolved config the run trains with
    RUN/tokenizer/       the tokenizer the run trained with (copied in at start)
    RUN/checkpoints/     Orbax checkpoints
    RUN/metrics.jsonl    one JSON object per logged step and per rollback (plus TensorBoard / W&B)
    RUN/rollbacks.json   the rollback log of the run's current trajectory (also in each
                         checkpoint's data state; see btlm_jax.data.positions and train.guard)

:meth:`RunDir.for_training` is the only writer. :meth:`RunDir.open` reads a run (evaluate,
generate, export, describe): it never writes to the directory, never builds a corpus and never
trains a tokenizer; the tokenizer always comes from ``RUN/tokenizer/``, whatever ``data.*`` says.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
from pathlib import Path

import jax
import ml_collections

from btlm_jax.config import ConfigError, default_config, validate

# Keys whose change makes an existing checkpoint unusable (shapes or the meaning of the state).
_STATE_DEFINING = ("model", "optim.name")
# model keys that choose how the same state is computed, not what it is: a resumed run may change
# them (e.g. model.attention=pallas on a GPU, or the default's move from xla to auto)
_COMPUTE_ONLY = ("model.attention", "model.attention_block_q", "model.attention_block_k",
                 "model.remat", "model.loss_chunk_size")


class RunError(FileNotFoundError):
    """The directory is not a usable run directory; the message says what is missing."""


def log(msg: str) -> None:
    if jax.process_index() == 0:
        print(f"[btlm_jax] {msg}", flush=True)


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _merge(dst: ml_collections.ConfigDict, src: dict, prefix: str = "") -> None:
    for k, v in src.items():
        if k not in dst:
            raise ConfigError(
                f"config.json key {prefix}{k} is not a known config key; the run was written by "
                "a different version of btlm_jax")
        if isinstance(v, dict) and isinstance(dst[k], ml_collections.ConfigDict):
            _merge(dst[k], v, f"{prefix}{k}.")
        else:
            if isinstance(dst[k], tuple) and isinstance(v, list):
                v = tuple(v)
            dst[k] = v


# Keys added after runs were written, with the value that reproduces those runs (a run directory
# whose config.json lacks the key was made before it existed). model.pad_multiple: unpadded.
_ADDED_KEYS = {("model", "pad_multiple"): 1}


def _upgrade(written: dict) -> dict:
    """``written`` (a parsed config.json) with the keys it predates set to their old meaning."""
    for (section, key), old in _ADDED_KEYS.items():
        if isinstance(written.get(section), dict) and key not in written[section]:
            written[section][key] = old
    return written


def load_config_json(path: Path) -> ml_collections.ConfigDict:
    """A config written as JSON (``RUN/config.json``) over the defaults (keys the file predates
    keep their old meaning: see ``_ADDED_KEYS``)."""
    cfg = default_config()
    try:
        _merge(cfg, _upgrade(json.loads(path.read_text())))
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path} is not valid JSON ({e}); restore it from the run's "
                          "config.<timestamp>.json backups") from None
    return cfg


def resolve_data(cfg: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Fills data.train / data.eval with the embedded sample corpus when unset (training only)."""
    from btlm_jax.data.sample import build_sample_corpus

    from btlm_jax.data.sample import default_cache_dir

    cfg = ml_collections.ConfigDict(cfg.to_dict())
    # the run records where its data indexes live, so reading it later needs no $HOME
    cfg.data.cache_dir = str(Path(default_cache_dir(cfg.data.cache_dir or None)).absolute())
    if not cfg.data.train:
        paths = build_sample_corpus(cfg.data.cache_dir or None)
        cfg.data.train = paths["train"]
        if not cfg.data.eval:
            cfg.data.eval = paths["eval"]
        log(f"data.train unset: using the embedded sample corpus at {paths['train']}")
    return cfg


class RunDir:
    """A run directory (see the module docstring)."""

    def __init__(self, path: str | os.PathLike, cfg: ml_collections.ConfigDict, tokenizer,
                 writable: bool):
        self.path = Path(path).absolute()
        self.cfg, self.tokenizer, self.writable = cfg, tokenizer, writable

    @property
    def checkpoint_dir(self) -> Path:
        return self.path / "checkpoints"

    @property
    def tokenizer_dir(self) -> Path:
        return self.path / "tokenizer"

    # ----- reading ---------------------------------------------------------------------------
    @classmethod
    def open(cls, path: str | os.PathLike) -> "RunDir":
        """An existing run, read-only: its resolved config and its pinned tokenizer."""
        from btlm_jax.data.tokenizer import load_tokenizer

        p = Path(path)
        if not (p / "config.json").exists():
            raise RunError(
                f"{p / 'config.json'} does not exist: --workdir must be a run directory written "
                "by `python -m btlm_jax.main` or `python -m btlm_jax.convert import`")
        cfg = validate(load_config_json(p / "config.json"))
        if (p / "tokenizer").is_dir():
            tok = load_tokenizer(p / "tokenizer")
        elif cfg.data.tokenizer:
            tok = load_tokenizer(cfg.data.tokenizer)
        else:
            raise RunError(
                f"{p} has no pinned tokenizer ({p / 'tokenizer'}): it was written by an older "
                "btlm_jax. Rerun its training command once (it pins the tokenizer and resumes) or "
                "set data.tokenizer in its config.json")
        return cls(p, cfg, tok, writable=False)

    def checkpointer(self):
        from btlm_jax.train.checkpoint import Checkpointer

        c = self.cfg.checkpoint
        return Checkpointer(str(self.checkpoint_dir), keep=c.keep, async_save=c.async_save,
                            read_only=not self.writable)

    # ----- training --------------------------------------------------------------------------
    @classmethod
    def for_training(cls, path: str | os.PathLike, cfg: ml_collections.ConfigDict) -> "RunDir":
        """Creates or resumes a run: resolves the data, writes ``config.json`` (refusing a
        different model), and pins the tokenizer (kept on resume whatever ``data.*`` says)."""
        _check_dir(path)
        cfg = validate(resolve_data(cfg))
        return cls.create(path, cfg, None)

    @classmethod
    def create(cls, path: str | os.PathLike, cfg: ml_collections.ConfigDict,
               tokenizer=None) -> "RunDir":
        """Writes ``config.json`` and pins ``tokenizer`` (default: the run's own copy if it has
        one, else ``data.tokenizer`` or a sentencepiece model trained on ``data.train``)."""
        p = _check_dir(path)
        cfg = validate(cfg)
        p.mkdir(parents=True, exist_ok=True)
        _write_config(cfg, p)
        tok = _pin_tokenizer(cfg, p / "tokenizer", tokenizer)
        if tok.vocab_size > cfg.model.vocab_size:
            raise ConfigError(
                f"model.vocab_size={cfg.model.vocab_size} is smaller than the tokenizer's "
                f"vocabulary ({tok.vocab_size}); raise model.vocab_size")
        return cls(p, cfg, tok, writable=True)


def _check_dir(path) -> Path:
    p = Path(path).absolute()
    if p.exists() and not p.is_dir():
        raise RunError(f"--workdir={path} is a file, not a directory; choose another path")
    return p


def _pin_tokenizer(cfg, tok_dir: Path, tok=None):
    from btlm_jax.data.tokenizer import copy_tokenizer_files, load_or_train, load_tokenizer

    if tok is None and tok_dir.is_dir() and any(tok_dir.iterdir()):
        tok = load_tokenizer(tok_dir)
        log(f"tokenizer: the run's own copy in {tok_dir} (data.tokenizer / data.train do not "
            "change it on resume)")
        return tok
    if tok is None:
        tok = load_or_train(cfg, cfg.data.train)
    if jax.process_index() == 0:
        tmp = tok_dir.with_name(".tokenizer.tmp")
        copy_tokenizer_files(tok, tmp)
        if tok_dir.exists():
            shutil.rmtree(tok_dir)
        os.replace(tmp, tok_dir)
    return tok


def _write_config(cfg: ml_collections.ConfigDict, workdir: Path) -> None:
    """Writes the resolved config; refuses a workdir trained with a different model."""
    path = workdir / "config.json"
    new = json.loads(cfg.to_json_best_effort())
    if path.exists():
        old = json.loads(path.read_text())
        fo, fn = _flatten(_upgrade(json.loads(path.read_text()))), _flatten(new)
        diff = sorted(k for k in set(fo) | set(fn) if fo.get(k) != fn.get(k))
        fatal = [k for k in diff if any(k == p or k.startswith(p + ".") for p in _STATE_DEFINING)
                 and k not in _COMPUTE_ONLY]
        if fatal and (workdir / "checkpoints").exists():
            hint = ""
            if "model.pad_multiple" in fatal:
                hint = (f" (its checkpoints hold arrays padded to model.pad_multiple="
                        f"{fo.get('model.pad_multiple')}: resume with --config.model.pad_multiple="
                        f"{fo.get('model.pad_multiple')})")
            raise ConfigError(
                f"{workdir} holds a run with a different model: "
                + ", ".join(f"{k} was {fo.get(k)!r}, now {fn.get(k)!r}" for k in fatal)
                + hint + ". Use a new --workdir, or rerun with the workdir's config.json.")
        if diff:
            stamp = time.strftime("%Y%m%d-%H%M%S")
            (workdir / f"config.{stamp}.json").write_text(json.dumps(old, indent=2))
            log("config changed since the last run in this workdir: "
                + ", ".join(f"{k}: {fo.get(k)!r} -> {fn.get(k)!r}" for k in diff)
                + f" (previous config kept as config.{stamp}.json)")
    if jax.process_index() == 0:
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(new, indent=2))
        os.replace(tmp, path)


ROLLBACKS = "rollbacks.json"


def write_rollbacks(run_path: Path, rollbacks) -> None:
    """Writes the rollback log to ``RUN/rollbacks.json`` (process 0; whole or not at all)."""
    if jax.process_index() != 0:
        return
    path = Path(run_path) / ROLLBACKS
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({"rollbacks": [r.to_json() for r in rollbacks]}, indent=1) + "\n")
    os.replace(tmp, path)


def read_rollbacks(run_path: Path) -> list | None:
    """The log in ``RUN/rollbacks.json`` (None when there is none)."""
    from btlm_jax.data.positions import parse_rollbacks

    path = Path(run_path) / ROLLBACKS
    if not path.exists():
        return None
    try:
        return parse_rollbacks(json.loads(path.read_text())["rollbacks"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise RunError(f"{path} is not a rollback log ({e}); restore it or delete it (then the "
                       "newest checkpoint's log is used)") from None


def resumed_rollbacks(run_path: Path, step: int, saved) -> list:
    """The rollback log a run resumed at checkpoint ``step`` continues with: the checkpoint's
    own (``saved``), plus the rollbacks ``RUN/rollbacks.json`` logged after it that restored this
    very checkpoint (a run that rolled back to it and stopped before its next checkpoint goes on
    exactly as it did)."""
    from btlm_jax.data.positions import parse_rollbacks

    saved = parse_rollbacks(saved)
    logged = read_rollbacks(run_path) or []
    if logged[:len(saved)] != saved:
        return saved
    extra = logged[len(saved):]
    return saved + extra if all(r.restored == step for r in extra) else saved


class Preemption:
    """Turns SIGTERM (and Ctrl-C) into a flag the loop checks after each step."""

    def __init__(self):
        self.requested = False
        self.signum = None
        self._old = {}

    def __enter__(self):
        for s in (signal.SIGTERM, signal.SIGINT):
            try:
                self._old[s] = signal.signal(s, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def _handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested, self.signum = True, signum

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum else "preemption"

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)
