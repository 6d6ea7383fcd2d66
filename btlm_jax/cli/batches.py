"""Show what a run trains on: ``python -m btlm_jax.cli.batches --workdir=RUN --steps=A:B
[--out=FILE.npz] [--decode] [--rollbacks=K]`` (console script ``btlm-batches``).

Steps are numbered as in ``metrics.jsonl`` and the run's messages: step ``s`` is the ``s``-th
update, the one logged as ``"step": s``. For each step ``s`` in ``[A, B)`` the global batch it
trains on is element ``s - 1`` of the run's Grain chain (:func:`btlm_jax.data.train_dataset`,
the chain the training feed reads), across phases and after the run's rollbacks, from the run's
``config.json``, its pinned tokenizer and its rollback log (``RUN/rollbacks.json``, written at
each rollback; else the newest checkpoint's). Nothing in the run directory is written; the packed
store is built in the run's ``data.cache_dir`` if it is missing.

``--out=FILE.npz`` writes ``tokens_<s>`` (int32 ``[batch, seq_len]``: the inputs step ``s``
trains on), ``sources_<s>`` (int32 ``[batch, seq_len]``: the source of each token, an index into
``source_names``; -1 on padding) and ``source_names``. ``--decode`` prints each row's text.
``--rollbacks=K`` uses only the first ``K`` rollbacks of the log: the batches as the run trained
them before its rollback ``K + 1`` (the batch a diverged step ``N`` saw is ``--steps=N:N+1
--rollbacks=K`` for the ``K+1``-th rollback, as the rollback's log line says).
"""

from __future__ import annotations

from absl import flags

from btlm_jax import errors
from btlm_jax.batches import batches
from btlm_jax.cli.common import run_app, start

_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (config.json + tokenizer/).")
_STEPS = flags.DEFINE_string("steps", None, "A:B: the steps A .. B-1 (numbered as in "
                             "metrics.jsonl: step s is the s-th update); A alone: one step.")
_OUT = flags.DEFINE_string("out", "", "Write tokens_<s> and sources_<s> to this .npz file.")
_DECODE = flags.DEFINE_bool("decode", False, "Print the text of every row.")
_ROLLBACKS = flags.DEFINE_integer("rollbacks", -1, "Use the first K rollbacks of the run's log "
                                  "(-1: all of them).")
errors.define_verbose_flag()


@errors.entry_point  # user errors: one `error: ...` line, exit 2 (--verbose: the traceback)
def main(argv):
    start(argv, distributed=False)
    import numpy as np

    if not _OUT.value and not _DECODE.value:
        raise ValueError("give --out=FILE.npz (the token arrays) and/or --decode (the text)")
    data, got = batches(_WORKDIR.value, _STEPS.value, _ROLLBACKS.value)
    names, tok = data.source_names, data.tokenizer
    print(f"{len(got)} step(s) of {_WORKDIR.value}; rollback log: {len(data.rollbacks)} "
          f"rollback(s) ({data.rollback_source})")
    if _DECODE.value:
        for s, b in got.items():
            for r in range(b["inputs"].shape[0]):
                sid = int(b["source_ids"][r].max())
                keep = b["source_ids"][r] >= 0  # not padding (a transform may mask the loss)
                text = tok.decode([int(t) for t in b["inputs"][r][keep]])
                print(f"--- step {s} row {r} ({names[sid] if sid >= 0 else 'padding'}, "
                      f"{int(keep.sum())} tokens) ---")
                print(text)
    if _OUT.value:
        arrays = {"source_names": np.asarray(names)}
        for s, b in got.items():
            arrays[f"tokens_{s}"] = np.asarray(b["inputs"], np.int32)
            arrays[f"sources_{s}"] = np.asarray(b["source_ids"], np.int32)
        out = _OUT.value if _OUT.value.endswith(".npz") else _OUT.value + ".npz"
        np.savez(out, **arrays)
        print(f"wrote {out}: tokens_<s> and sources_<s> for steps {min(got)} .. {max(got)}")


def run():
    run_app(main, "workdir", "steps", prog="btlm-batches")


if __name__ == "__main__":
    run()
