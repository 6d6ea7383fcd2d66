"""The training data as the loop consumes it: this process's rows of each step's batch, by phase.

Wraps the Grain pipeline of :mod:`btlm_jax.data.pipeline` (one iterator per variable-length
phase), keeps the per-source token counters, and gives the state saved in checkpoints.
"""

from __future__ import annotations

import jax
import numpy as np

from btlm_jax.train.run_dir import log


class TrainFeed:
    def __init__(self, cfg, tokenizer, phases, phase_of):
        from btlm_jax.data import pipeline

        self.cfg, self.tokenizer, self.phases, self.phase_of = cfg, tokenizer, phases, phase_of
        self.pipeline = pipeline
        self.sources = list(pipeline.source_names(cfg))
        self.counters = {s: 0 for s in self.sources}
        self.phase, self.it, self._saved = None, None, None
        self.last_tokens = 0

    def restore(self, saved: dict | None) -> None:
        """Resumes from a checkpoint's data state (iterator position and counters)."""
        if saved:
            self._saved = saved
            self.counters.update(saved.get("tokens_per_source") or {})

    def _open(self, phase: int) -> None:
        seq_len, batch_size, _ = self.phases[phase]
        if self.it is not None:
            log(f"phase {phase}: seq_len {seq_len}, batch {batch_size}")
        self.it = self.pipeline.make_train_iterator(
            self.cfg, self.tokenizer, seq_len=seq_len, batch_size=batch_size, phase=phase,
            process_index=jax.process_index(), process_count=jax.process_count())
        saved, self._saved = self._saved, None
        if saved is not None and saved.get("phase") == phase and saved.get("iterator"):
            self.it.set_state(saved["iterator"])
        self.phase = phase

    def next(self, step: int) -> dict:
        """This process's rows of the batch of step ``step`` (0-based); counts tokens."""
        phase = self.phase_of(step)
        if phase != self.phase:
            self._open(phase)
        local = next(self.it)
        src = np.asarray(local["source_ids"])
        mask = np.asarray(local["loss_mask"]) > 0
        for i, n in enumerate(np.bincount(src[mask], minlength=len(self.sources))):
            self.counters[self.sources[i]] += int(n)
        self.last_tokens = int(mask.sum()) * jax.process_count()
        return local

    @property
    def skipped_documents(self) -> int:
        return int(getattr(self.it, "skipped_documents", 0) or 0)

    def token_metrics(self) -> dict:
        seen = sum(self.counters.values())
        out = {}
        for s, n in self.counters.items():
            out[f"tokens/{s}"] = n
            out[f"token_share/{s}"] = n / max(seen, 1)
        return out

    def state(self) -> dict:
        return {"phase": self.phase, "iterator": self.it.get_state() if self.it else None,
                "tokens_per_source": dict(self.counters)}

    def eval_batches(self, seq_len: int) -> list:
        if not hasattr(self, "_eval_cache"):
            self._eval_cache = {}
        if seq_len not in self._eval_cache:
            self._eval_cache[seq_len] = self.pipeline.make_eval_batches(
                self.cfg, self.tokenizer, seq_len=seq_len, batch_size=self.cfg.eval.batch_size,
                num_batches=self.cfg.eval.num_batches) if self.cfg.data.eval else []
        return self._eval_cache[seq_len]
