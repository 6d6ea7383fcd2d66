"""The training data as the loop consumes it: each step's global batch, and the token counters.

The batches are the run's Grain chain (:class:`btlm_jax.data.pipeline.StepData`, the chain
:func:`btlm_jax.data.train_dataset` returns for a run directory): the global batch of step ``i``
is a pure function of the config, ``i`` and the run's rollback log, whatever the number of
processes, and each process reads only the rows its devices hold, through Grain's iterator
(``data.prefetch`` batches read ahead in threads, ``data.num_workers`` worker processes) from the
step the loop asks for. So the only data state a checkpoint carries is the rollback log and the
per-source token counters; the position in the data follows from the step and the log
(:mod:`btlm_jax.data.positions`), and a checkpoint written by N processes resumes on M processes
with the same batches.

The counters are counted inside the jitted train step (``tokens_per_source`` in its metrics: the
loss-masked target tokens of the whole global batch per source), so they are global by
construction; the throughput (``tokens_per_sec``) is computed from the same counts. A rollback
sets them back to the restored checkpoint's: they count the tokens of the trained trajectory only.
"""

from __future__ import annotations

import jax
import numpy as np

from btlm_jax.train.run_dir import log
from btlm_jax.train.step import BATCH_KEYS

KEYS = BATCH_KEYS + ("source_ids",)  # what the counting train step reads


class TrainFeed:
    def __init__(self, cfg, tokenizer, phases, phase_of):
        from btlm_jax.data import pipeline

        self.cfg, self.tokenizer, self.phases, self.phase_of = cfg, tokenizer, phases, phase_of
        self.pipeline = pipeline
        self.data = pipeline.StepData(cfg, tokenizer, jax.process_index(), jax.process_count(),
                                      log=log)
        self.sources = list(self.data.source_names)
        self.counters = {s: 0 for s in self.sources}
        self.phase = None
        self._reader, self._next = None, None  # Grain's iterator and the step it yields next
        self._pending: list = []  # per-step tokens_per_source device arrays not yet added up
        self._window = 0  # tokens added up since the last take_tokens()

    def restore(self, saved: dict | None, rollbacks=None) -> None:
        """Resumes the token counters and the rollback log (``rollbacks``, default: the
        checkpoint's) from a checkpoint's data state (an older checkpoint's iterator state is
        ignored)."""
        saved = saved or {}
        self.counters = {s: 0 for s in self.sources}
        self.counters.update(saved.get("tokens_per_source") or {})
        self._pending, self._window = [], 0
        self._close_reader()  # the batches read ahead belong to the previous trajectory
        self.data.set_rollbacks(saved.get("rollbacks") or [] if rollbacks is None else rollbacks)

    @property
    def rollbacks(self) -> list:
        return self.data.rollbacks

    def next(self, step: int) -> dict:
        """This process's rows ``[p * B / P, (p + 1) * B / P)`` of the batch of step ``step``."""
        phase = self.phase_of(step)
        if phase != self.phase:
            if self.phase is not None:
                seq_len, batch_size, _ = self.phases[phase]
                log(f"phase {phase}: seq_len {seq_len}, batch {batch_size}")
            self.phase = phase
        if self._reader is None or step != self._next:  # the first step, a resume, a rollback
            self._close_reader()
            self._reader = self.data.reader(step)
        self._next = step + 1
        return next(self._reader)

    def _close_reader(self) -> None:
        if self._reader is not None:
            self._reader.close()
        self._reader, self._next = None, None

    def global_batch(self, step: int, sharding) -> dict:
        """The global batch of step ``step`` as arrays on ``sharding``; every device gets exactly
        its rows (this process reads its own block; rows of another process's block, which a mesh
        that does not order processes along the batch would ask for, are read directly)."""
        local = self.next(step)
        lo, hi = self.data.local_range(step)
        b, seq_len = self.data.batch_shape(step)
        other: dict = {}

        def rows(key, index):
            r = index[0]
            start, stop, _ = r.indices(b)
            if lo <= start and stop <= hi:
                v = local[key][start - lo:stop - lo]
            else:
                if (start, stop) not in other:
                    other[(start, stop)] = self.data.rows(step, start, stop)
                v = other[(start, stop)][key]
            return v[(slice(None),) + tuple(index[1:])]

        return {k: jax.make_array_from_callback((b, seq_len), sharding,
                                                lambda i, k=k: rows(k, i)) for k in KEYS}

    def count(self, metrics) -> None:
        """Takes the step's ``tokens_per_source`` (a device array; added up lazily)."""
        self._pending.append(metrics["tokens_per_source"])

    def _flush(self) -> None:
        if self._pending:
            total = np.sum(np.stack(jax.device_get(self._pending)).astype(np.int64), axis=0)
            self._pending = []
            for s, n in zip(self.sources, total):
                self.counters[s] += int(n)
            self._window += int(total.sum())

    def take_tokens(self) -> int:
        """Global tokens trained on since the last call (for tokens/s)."""
        self._flush()
        n, self._window = self._window, 0
        return n

    @property
    def skipped_documents(self) -> int:
        return int(self.data.skipped_records or 0)

    def token_metrics(self) -> dict:
        self._flush()
        seen = sum(self.counters.values())
        out = {}
        for s, n in self.counters.items():
            out[f"tokens/{s}"] = n
            out[f"token_share/{s}"] = n / max(seen, 1)
        return out

    def state(self) -> dict:
        self._flush()
        return {"phase": self.phase, "tokens_per_source": dict(self.counters),
                "rollbacks": [r.to_json() for r in self.rollbacks]}

    def close(self) -> None:
        self._close_reader()

    def eval_batches(self, seq_len: int) -> list:
        if not hasattr(self, "_eval_cache"):
            self._eval_cache = {}
        if seq_len not in self._eval_cache:
            self._eval_cache[seq_len] = self.pipeline.make_eval_batches(
                self.cfg, self.tokenizer, seq_len=seq_len, batch_size=self.cfg.eval.batch_size,
                num_batches=self.cfg.eval.num_batches) if self.cfg.data.eval else []
        return self._eval_cache[seq_len]
