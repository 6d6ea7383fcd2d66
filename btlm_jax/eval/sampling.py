"""Batched sampling with a KV cache (:meth:`btlm_jax.models.btlm.BTLM.decode`).

Prompts of different lengths are left-padded to a common length ``P`` (padding has segment id 0,
so real tokens never attend to it; positions count from 0 at each prompt's first token, so the
ALiBi distances and learned positions are those of the unpadded prompt). The prompt is prefilled
in one call, then each new token is one call of a jitted decode step that writes its key/value at
the next cache slot. Sampling: temperature (0 = greedy), top-k, top-p (nucleus), from a seed.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from btlm_jax.models.btlm import BTLM, init_cache


@dataclass(frozen=True)
class SamplingConfig:
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1: off
    seed: int = 0

    def check(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={self.max_new_tokens}: must be >= 1")
        if self.temperature < 0:
            raise ValueError(f"temperature={self.temperature}: must be >= 0 (0 = greedy)")
        if self.top_k < 0:
            raise ValueError(f"top_k={self.top_k}: must be >= 0 (0 = off)")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p={self.top_p}: must be in (0, 1] (1 = off)")


def filter_logits(logits, top_k: int = 0, top_p: float = 1.0):
    """Sets logits outside the top-k set and outside the top-p nucleus to -inf ([..., V]).

    Top-p keeps the smallest set of most likely tokens whose probability reaches ``top_p`` (the
    token that crosses the threshold is kept). Ties at the cut-off are kept.
    """
    neg = jnp.finfo(logits.dtype).min
    v = logits.shape[-1]
    srt = jnp.sort(logits, axis=-1)[..., ::-1]
    if top_k and top_k < v:
        kth = srt[..., top_k - 1:top_k]
        logits = jnp.where(logits < kth, neg, logits)
        srt = jnp.where(jnp.arange(v) < top_k, srt, neg)
    if top_p < 1.0:
        probs = jax.nn.softmax(srt, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs  # mass of strictly more likely tokens
        keep = before < top_p
        n_keep = jnp.maximum(jnp.sum(keep, axis=-1, keepdims=True), 1)
        cutoff = jnp.take_along_axis(srt, n_keep - 1, axis=-1)
        logits = jnp.where(logits < cutoff, neg, logits)
    return logits


def sample(logits, rng, temperature: float, top_k: int, top_p: float):
    """One token per row from logits [B, V]."""
    if temperature == 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = filter_logits(logits / temperature, top_k, top_p)
    return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


def left_pad(prompts: list[list[int]], pad_id: int = 0):
    """tokens, segment_ids, positions [B, P] for left-padded prompts (each must be non-empty)."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt must have at least one token")
    p_len = max(len(p) for p in prompts)
    b = len(prompts)
    toks = np.full((b, p_len), pad_id, np.int32)
    seg = np.zeros((b, p_len), np.int32)
    pos = np.zeros((b, p_len), np.int32)
    for i, p in enumerate(prompts):
        n = len(p)
        toks[i, p_len - n:] = p
        seg[i, p_len - n:] = 1
        pos[i, p_len - n:] = np.arange(n)
    return toks, seg, pos


class Generator:
    """Compiled prefill and decode steps for one model and parameter tree.

    ``dequantize`` (optional) maps the stored parameters to the float tree inside the jitted
    steps (weight-only quantisation, :mod:`btlm_jax.models.quant`).
    """

    def __init__(self, model: BTLM, params, *, dequantize=None):
        self.model = model
        self.params = params
        deq = dequantize if dequantize is not None else (lambda p: p)

        def prefill(params, cache, tokens, seg, pos, scale):
            logits, cache = model.apply({"params": deq(params)}, tokens, cache, 0, seg, pos, scale,
                                        method=BTLM.decode)
            return logits[:, -1], cache

        def step(params, cache, tokens, pos, index, scale):
            seg = jnp.ones_like(tokens)
            logits, cache = model.apply({"params": deq(params)}, tokens, cache, index, seg, pos,
                                        scale, method=BTLM.decode)
            return logits[:, -1], cache

        self._prefill = jax.jit(prefill, donate_argnums=(1,))
        self._step = jax.jit(step, donate_argnums=(1,))
        self._sample = jax.jit(sample, static_argnums=(2, 3, 4))

    def generate(self, prompts: list[list[int]], sc: SamplingConfig, *, eos_id: int | None = None,
                 alibi_scale: float = 1.0, pad_id: int = 0) -> list[list[int]]:
        """New tokens per prompt (up to ``max_new_tokens``; cut after the first ``eos_id``)."""
        sc.check()
        cfg = self.model.cfg
        toks, seg, pos = left_pad(prompts, pad_id)
        b, p_len = toks.shape
        total = p_len + sc.max_new_tokens
        if cfg.position == "learned" and max(len(p) for p in prompts) + sc.max_new_tokens > cfg.max_seq_len:
            raise ValueError(
                f"prompt + max_new_tokens exceeds model.max_seq_len={cfg.max_seq_len} (learned "
                "positions); shorten the prompt or lower max_new_tokens")
        cache = init_cache(cfg, b, total)
        scale = jnp.float32(alibi_scale)
        last, cache = self._prefill(self.params, cache, jnp.asarray(toks), jnp.asarray(seg),
                                    jnp.asarray(pos), scale)
        rng = jax.random.PRNGKey(sc.seed)
        lens = np.array([len(p) for p in prompts], np.int32)
        out = np.zeros((b, sc.max_new_tokens), np.int32)
        done = np.zeros(b, bool)
        n = 0
        for t in range(sc.max_new_tokens):
            rng, sub = jax.random.split(rng)
            nxt = self._sample(last, sub, float(sc.temperature), int(sc.top_k), float(sc.top_p))
            nxt_np = np.asarray(nxt)
            out[:, t] = nxt_np
            n = t + 1
            if eos_id is not None:
                done |= nxt_np == eos_id
                if done.all():
                    break
            if t + 1 == sc.max_new_tokens:
                break
            last, cache = self._step(self.params, cache, nxt[:, None],
                                     jnp.asarray(lens + t)[:, None], jnp.int32(p_len + t), scale)
        res = []
        for i in range(b):
            row = out[i, :n].tolist()
            if eos_id is not None and eos_id in row:
                row = row[: row.index(eos_id)]
            res.append(row)
        return res
