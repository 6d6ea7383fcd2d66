"""Loss and perplexity per evaluation length, per source and per position, with ALiBi position
interpolation (Al-Khateeb et al., "Position Interpolation Improves ALiBi Extrapolation").

Position interpolation (PI): when the evaluation length ``L`` exceeds the training length
``L_train`` the ALiBi slopes are divided by ``s = L / L_train`` (``m_h -> m_h / s``), so the
largest distance seen at evaluation gets the bias the largest training distance had. It composes
with the model's fixed ``model.alibi_scaling`` divisor (the BTLM ``alibi_scaling.factor`` used
when fine-tuning at a longer length). ``L_train`` is ``model.train_seq_len`` when set, else the
longest training phase's sequence length.

The loss sums come from :meth:`btlm_jax.train.program.Program.eval_sums`, the same evaluation path
the training loop uses, with the training parameter and batch shardings.
"""

from __future__ import annotations

import math
from typing import Any, Iterable

import jax
import numpy as np

from btlm_jax.config import parse_phases
from btlm_jax.models.alibi import interpolation_scale


def train_length(cfg) -> int:
    """The length the model was trained at (for PI): ``model.train_seq_len`` or the longest phase."""
    if int(cfg.model.train_seq_len) > 0:
        return int(cfg.model.train_seq_len)
    return max(p[0] for p in parse_phases(cfg))


def pi_scale(length: int, train_len: int, enabled: bool) -> float:
    """The slope divisor for one evaluation: ``L / L_train`` if PI is on and ``L > L_train``."""
    return interpolation_scale(length, train_len) if enabled else 1.0


def bucket_edges(length: int, num_buckets: int) -> list[int]:
    """``num_buckets + 1`` integer edges splitting positions ``[0, length)`` into near-equal runs."""
    n = max(1, min(int(num_buckets), int(length)))
    return [round(i * length / n) for i in range(n + 1)]


def bucket_losses(position_loss_sum, position_count, num_buckets: int) -> list[dict]:
    """Mean loss over each bucket of positions (token-weighted)."""
    s = np.asarray(position_loss_sum, np.float64)
    c = np.asarray(position_count, np.float64)
    edges = bucket_edges(len(s), num_buckets)
    out = []
    for a, b in zip(edges[:-1], edges[1:]):
        n = float(c[a:b].sum())
        out.append({"start": int(a), "end": int(b),
                    "loss": float(s[a:b].sum() / n) if n > 0 else None, "tokens": int(n)})
    return out


def _ppl(x: float) -> float:
    return float(math.exp(x)) if x < 700 else float("inf")


class Evaluator:
    """Evaluates one set of parameters at several lengths and PI settings.

    ``run`` is a :class:`btlm_jax.eval.session.Run`; ``data_cfg`` the config whose ``data.eval``
    is read (the run's own, or one with ``--data`` applied); ``quantize`` one of
    :data:`btlm_jax.models.quant.FORMATS`.
    """

    def __init__(self, run, data_cfg=None, *, quantize: str = "none",
                 group_size: int = 128, batch_size: int | None = None,
                 num_batches: int | None = None):
        from btlm_jax.data import pipeline
        from btlm_jax.models import quant

        self.run = run
        self.cfg = data_cfg if data_cfg is not None else run.cfg
        self.pipeline = pipeline
        self.sources = list(pipeline.source_names(self.cfg))
        self.batch_size = int(batch_size or self.cfg.eval.batch_size)
        self.num_batches = int(num_batches or self.cfg.eval.num_batches)
        self.quantize = quantize or "none"
        self.params_fn = None
        if self.quantize == "none":
            self.params = run.params
        else:
            self.params = jax.jit(lambda p: quant.quantize_params(p, self.quantize, group_size))(
                run.params)
            self.params_fn = quant.dequantize_params  # the compiler places the quantised leaves
        self.weight_bytes = quant.weight_bytes(self.params)

    def batches(self, length: int):
        return self.pipeline.make_eval_batches(
            self.cfg, self.run.tokenizer, seq_len=length, batch_size=self.batch_size,
            num_batches=self.num_batches)

    def evaluate(self, length: int, alibi_scale: float) -> dict[str, Any]:
        """Sums over the eval batches at ``length``; returns loss totals and per-position arrays."""
        tot = self.run.program.eval_sums(self.params, self.batches(length), len(self.sources),
                                         alibi_scale, self.params_fn)
        if tot is None:
            raise ValueError(
                "no evaluation data: set data.eval in the run's config or pass --data=GLOB")
        return tot

    def results(self, lengths: Iterable[int], pi_modes: Iterable[bool],
                num_buckets: int = 16) -> list[dict[str, Any]]:
        lt = train_length(self.run.cfg)
        res = []
        for length in lengths:
            for pi in pi_modes:
                alibi = self.run.cfg.model.position == "alibi"
                s = pi_scale(length, lt, pi and alibi)
                tot = self.evaluate(length, s)
                loss = float(tot["loss_sum"] / max(tot["count"], 1.0))
                per_source = {}
                for i, name in enumerate(self.sources):
                    if tot["source_count"][i] > 0:
                        per_source[name] = float(tot["source_loss_sum"][i] / tot["source_count"][i])
                cnt = np.maximum(tot["position_count"], 1.0)
                res.append({
                    "length": int(length),
                    "position_interpolation": bool(pi),
                    "pi_scale": float(s),
                    "alibi_scaling": float(self.run.cfg.model.alibi_scaling),
                    "train_length": lt,
                    "quantize": self.quantize,
                    "step": self.run.step,
                    "loss": loss,
                    "perplexity": _ppl(loss),
                    "tokens": int(tot["count"]),
                    "per_source": per_source,
                    "per_source_perplexity": {k: _ppl(v) for k, v in per_source.items()},
                    "position_buckets": bucket_losses(
                        tot["position_loss_sum"], tot["position_count"], num_buckets),
                    "position_loss": (tot["position_loss_sum"] / cnt).tolist(),
                })
        return res
