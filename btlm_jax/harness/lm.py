"""An ``lm_eval`` model (EleutherAI lm-evaluation-harness) over a btlm_jax model handle.

The handle is anything with ``.cfg`` (``cfg.model`` the model config), ``.model`` (a
:class:`btlm_jax.models.btlm.BTLM`), ``.params`` and ``.tokenizer`` (``encode``, ``decode``,
``eos_id``): what :func:`btlm_jax.load_model` returns, a :class:`btlm_jax.eval.session.Run`, or
the training loop's live state.

Scoring (``loglikelihood`` / ``loglikelihood_rolling``):

* the context/continuation token split is lm_eval's own (:class:`lm_eval.api.model.TemplateLM`:
  trailing context spaces move to the continuation, the pair is encoded whole and split at the
  context's length; an empty context is the end-of-text token);
* the input is ``(context + continuation)[-(max_length + 1):][:-1]`` (contexts left-truncated to
  the model's length); the continuation's log-probability is the sum over its tokens and the
  greedy flag says whether every continuation token is the argmax;
* requests are sorted by length, cut into batches of ``batch_size`` rows and right-padded to a
  power-of-two length bucket (padding has segment id 0), so a whole task compiles a handful of
  shapes, never one per request; short batches are filled with dummy rows;
* batches are split over the data axes of the parameters' mesh (``data``, ``fsdp``); the
  parameters stay where they are (sharded like training, or replicated when they come unsharded);
* logits are never materialised whole: the final hidden states are projected to the vocabulary
  in chunks of positions, keeping only each target's log-probability and argmax hit.

Rolling log-likelihood cuts the document into lm_eval's disjoint windows (every token predicted
once, the first conditioned on end-of-text) and sums the windows' scores.

Generation (``generate_until``): prompts are left-padded to a bucketed length, prefilled once and
decoded one token per step with the KV cache (:meth:`BTLM.decode`), greedy unless the task asks
for ``do_sample`` with a temperature; a row stops at end-of-text or once its decoded text contains
one of the ``until`` strings, and the returned text is cut before the first stop string.

Position interpolation is the model's business: the ALiBi slopes come from
:func:`btlm_jax.models.alibi.effective_slopes` inside the model, with the checkpoint's
``alibi_scaling``. A *dynamic* ``alibi_scaling`` (``model.alibi_scaling_train_seq_len = T``)
divides the slopes by ``keys / T`` once a forward has more than ``T`` keys, so padding would change
the result: then sequences longer than ``T`` are batched only with sequences of their own length
and padded to exactly that length (shorter ones stay in buckets capped at ``T``), and generation
batches prompts of one length each, so every score and token equals the unpadded computation.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm import tqdm

from btlm_jax.eval.sampling import sample as sample_logits
from btlm_jax.models.alibi import dynamic_train_len
from btlm_jax.models.btlm import BTLM, init_cache

log = logging.getLogger(__name__)

MIN_BUCKET = 16  # shortest padded length
LOGIT_CHUNK = 512  # positions projected to the vocabulary at a time (longer rows are chunked)
MIN_CHUNK = 128  # exact (unbucketed) lengths without a power-of-two divisor this big: no chunks


class HarnessError(ValueError):
    """A harness setting or request cannot be served; the message names the culprit."""


def bucket_length(n: int, cap: int, minimum: int = MIN_BUCKET) -> int:
    """The padded length for a sequence of ``n`` tokens: the smallest of ``2^k`` and
    ``1.5 * 2^k`` (two buckets per octave, so padding wastes at most a third) that is
    >= ``max(n, minimum)``, capped at ``cap`` (and never below ``n``)."""
    n_ = max(n, minimum, 1)
    p = 1 << max(0, math.ceil(math.log2(n_)))  # next power of two
    b = (3 * p) // 4 if p >= 4 and (3 * p) // 4 >= n_ else p
    return max(n, min(b, cap))


def _placement(params, mesh: Mesh | None):
    """(params, mesh, batch axes): the parameters' own mesh when they are sharded, else a
    one-axis ``data`` mesh over all devices with the parameters replicated on it."""
    if mesh is None:
        for leaf in jax.tree_util.tree_leaves(params):
            sh = getattr(leaf, "sharding", None)
            if isinstance(sh, NamedSharding):
                mesh = sh.mesh
                break
    if mesh is None:
        mesh = Mesh(np.asarray(jax.devices()), ("data",))
        params = jax.device_put(params, NamedSharding(mesh, P()))
    axes = tuple(a for a in ("data", "fsdp") if a in mesh.axis_names and mesh.shape[a] > 1)
    return params, mesh, axes


@register_model("btlm_jax")
class BTLMEvalLM(TemplateLM):
    """``lm_eval`` model over a btlm_jax handle (see the module docstring).

    ``BTLMEvalLM(handle)`` or ``BTLMEvalLM(path=DIR)`` (a run directory or Hugging Face folder,
    through :func:`btlm_jax.load_model`); registered with lm_eval as ``btlm_jax`` once this
    module is imported: ``simple_evaluate(model="btlm_jax", model_args={"path": DIR})``.
    """

    def __init__(self, handle: Any = None, *, path: str | None = None, batch_size: int | str = 8,
                 max_length: int | None = None, max_gen_toks: int = 256, progress: bool = True,
                 mesh: Mesh | None = None, **unused):
        super().__init__()
        if handle is None:
            if not path:
                raise HarnessError("give a model handle or path=DIR (a run directory or a "
                                   "Hugging Face folder)")
            handle = load_handle(path)
        for a in ("cfg", "model", "params", "tokenizer"):
            if not hasattr(handle, a):
                raise HarnessError(f"the model handle has no .{a}; pass what btlm_jax.load_model "
                                   "returns (attributes cfg, model, params, tokenizer)")
        for k in ("device", "max_batch_size"):
            unused.pop(k, None)  # lm_eval passes these to every model; placement is the mesh's
        if unused:
            raise HarnessError(f"unknown model argument(s) {sorted(unused)}: known are path, "
                               "batch_size, max_length, max_gen_toks")
        try:
            bs = int(batch_size if batch_size is not None else 8)
        except (TypeError, ValueError):
            raise HarnessError(f"batch_size={batch_size!r}: give a positive integer "
                               "(automatic batch size search is not supported)") from None
        if bs <= 0:
            raise HarnessError(f"batch_size={bs}: must be a positive integer")
        if handle.tokenizer is None:
            raise HarnessError("the model has no tokenizer (the checkpoint folder has no "
                               "tokenizer files); lm_eval tasks need one")
        self.handle = handle
        self.cfg = handle.cfg
        self.model: BTLM = handle.model
        self.tokenizer = handle.tokenizer
        self.params, self.mesh, self.batch_axes = _placement(handle.params, mesh)
        shards = math.prod(self.mesh.shape[a] for a in self.batch_axes)
        self.batch_size = -(-bs // shards) * shards  # a multiple of the batch shards
        self._max_length = int(max_length or self.cfg.model.max_seq_len)
        if self._max_length < 2:
            raise HarnessError(f"max_length={self._max_length}: must be at least 2")
        if self.cfg.model.position == "learned" and self._max_length > self.cfg.model.max_seq_len:
            raise HarnessError(
                f"max_length={self._max_length} exceeds model.max_seq_len="
                f"{self.cfg.model.max_seq_len} (learned positions)")
        self.max_gen_toks = int(max_gen_toks)
        m = self.cfg.model
        self.dynamic_len = dynamic_train_len(m) if m.position == "alibi" else 0
        self.progress = progress
        self._batch_sharding = NamedSharding(self.mesh, P(self.batch_axes or None))
        self._score_fn = jax.jit(self._score)
        self._prefill_fn = jax.jit(self._prefill, static_argnums=(4,))
        self._step_fn = jax.jit(self._step, donate_argnums=(1,))
        self._select_fn = jax.jit(sample_logits, static_argnums=(2, 3, 4))
        self.compiled_shapes: set[tuple] = set()  # (kind, batch, length) seen; for tests/bench

    # ----- lm_eval plumbing -------------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return int(self.tokenizer.eos_id)

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def tokenizer_name(self) -> str:
        return str(getattr(self.tokenizer, "name", type(self.tokenizer).__name__))

    def tok_encode(self, string: str, add_special_tokens=None, **kwargs) -> list[int]:
        return list(self.tokenizer.encode(string))

    def tok_decode(self, tokens) -> str:
        return self.tokenizer.decode(list(tokens))

    def get_model_info(self) -> dict:
        m = self.cfg.model
        return {"btlm_jax_model": {k: m[k] for k in ("vocab_size", "d_model", "n_layers", "n_heads",
                                                     "position", "max_seq_len")},
                "max_length": self._max_length, "harness_batch_size": self.batch_size}

    def _put(self, x: np.ndarray):
        # every process holds the whole batch: the global shape is the local shape
        return jax.make_array_from_process_local_data(self._batch_sharding, x, x.shape)

    # ----- scoring ----------------------------------------------------------------------------
    def _score(self, params, tokens, targets, segs):
        """Per position: log p(target) and whether target is the argmax ([B, L] each)."""
        model = self.model
        hidden = model.apply({"params": params}, tokens, segment_ids=segs, return_hidden=True)

        def chunk(h, t):
            logits = model.apply({"params": params}, h, method=BTLM.logits_from_hidden)
            lp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
            tl = jnp.take_along_axis(lp, t[..., None], axis=-1)[..., 0]
            return tl, jnp.argmax(logits, axis=-1) == t

        b, length = tokens.shape
        c = min(LOGIT_CHUNK, length & -length)  # largest power of two dividing the length
        if length <= LOGIT_CHUNK or c < MIN_CHUNK:
            return chunk(hidden, targets)
        n = length // c
        hs = hidden.reshape(b, n, c, -1).swapaxes(0, 1)
        ts = targets.reshape(b, n, c).swapaxes(0, 1)
        tl, hit = jax.lax.map(lambda x: chunk(*x), (hs, ts))
        return tl.swapaxes(0, 1).reshape(b, length), hit.swapaxes(0, 1).reshape(b, length)

    def score_pairs(self, pairs: list[tuple[list[int], list[int]]], *, desc: str = "loglikelihood",
                    disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        """(log p(continuation | context), greedy) for token-id pairs (context non-empty)."""
        L = self._max_length
        rows = []
        for ctx, cont in pairs:
            if not ctx:
                raise HarnessError("a scoring request has an empty context (use the end-of-text "
                                   "token as the context)")
            whole = (list(ctx) + list(cont))[-(L + 1):]
            rows.append((whole[:-1], whole[1:], min(len(cont), len(whole) - 1)))
        order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
        out: list[tuple[float, bool] | None] = [None] * len(rows)
        bs = self.batch_size
        bar = tqdm(total=len(rows), desc=desc, disable=disable_tqdm or not self.progress)
        for idx in self._batches(order, [len(r[0]) for r in rows]):
            length = self._pad_length(len(rows[idx[0]][0]))
            tok = np.zeros((bs, length), np.int32)
            tgt = np.zeros((bs, length), np.int32)
            seg = np.zeros((bs, length), np.int32)
            for r, i in enumerate(idx):
                inp, t, _ = rows[i]
                tok[r, :len(inp)], tgt[r, :len(t)], seg[r, :len(inp)] = inp, t, 1
            self.compiled_shapes.add(("score", bs, length))
            tl, hit = jax.device_get(self._score_fn(self.params, self._put(tok), self._put(tgt),
                                                    self._put(seg)))
            for r, i in enumerate(idx):
                n_in, n_c = len(rows[i][0]), rows[i][2]
                sl = slice(n_in - n_c, n_in)
                out[i] = (float(np.sum(tl[r, sl], dtype=np.float64)), bool(np.all(hit[r, sl])))
            bar.update(len(idx))
        bar.close()
        return out  # type: ignore[return-value]

    def _pad_length(self, n: int) -> int:
        """Padded length of a batch whose longest row has ``n`` tokens (see the module doc)."""
        dyn = self.dynamic_len
        if dyn and n > dyn:
            return n
        return bucket_length(n, min(self._max_length, dyn) if dyn else self._max_length)

    def _batches(self, order: list[int], lengths: list[int], exact: bool = False):
        """Consecutive runs of ``order`` (longest first) of at most ``batch_size`` requests; with
        a dynamic alibi_scaling a run never mixes padded lengths (or lengths, when ``exact``)."""
        batch: list[int] = []
        for i in order:
            if batch and (len(batch) == self.batch_size or (self.dynamic_len and (
                    (lengths[i] != lengths[batch[0]]) if exact else
                    (self._pad_length(lengths[i]) != self._pad_length(lengths[batch[0]]))))):
                yield batch
                batch = []
            batch.append(i)
        if batch:
            yield batch

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
        res = self.score_pairs([(c, x) for _, c, x in requests], disable_tqdm=disable_tqdm)
        for (key, _, _), r in zip(requests, res):
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, r)
        return res

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        pairs, owner = [], []
        for i, req in enumerate(requests):
            (text,) = req.args
            for w in get_rolling_token_windows(self.tok_encode(text), self.prefix_token_id,
                                               self._max_length, context_len=1):
                pairs.append(make_disjoint_window(w))
                owner.append(i)
        scores = self.score_pairs(pairs, desc="loglikelihood_rolling", disable_tqdm=disable_tqdm)
        totals = [0.0] * len(requests)
        for i, (s, _) in zip(owner, scores):
            totals[i] += s
        for req, t in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, t)
        return totals

    # ----- generation -------------------------------------------------------------------------
    def _prefill(self, params, tokens, seg, pos, cache_len):
        cache = init_cache(self.cfg.model, tokens.shape[0], cache_len)
        logits, cache = self.model.apply({"params": params}, tokens, cache, 0, seg, pos,
                                         method=BTLM.decode)
        return logits[:, -1], cache

    def _step(self, params, cache, tokens, pos, index):
        seg = jnp.ones_like(tokens)
        logits, cache = self.model.apply({"params": params}, tokens, cache, index, seg, pos,
                                         method=BTLM.decode)
        return logits[:, -1], cache

    def _gen_settings(self, gen_kwargs: dict) -> dict:
        kw = dict(gen_kwargs or {})
        until = kw.pop("until", None)
        until = [until] if isinstance(until, str) else list(until or [])
        max_gen = int(kw.pop("max_gen_toks", self.max_gen_toks))
        do_sample = bool(kw.pop("do_sample", False))
        temperature = float(kw.pop("temperature", 1.0 if do_sample else 0.0) or 0.0)
        top_k = int(kw.pop("top_k", 0) or 0)
        top_p = float(kw.pop("top_p", 1.0) or 1.0)
        seed = int(kw.pop("seed", 0) or 0)
        if kw:
            log.warning("generate_until: ignoring generation arguments %s", sorted(kw))
        if max_gen < 1 or max_gen >= self._max_length:
            raise HarnessError(f"max_gen_toks={max_gen}: must be in [1, {self._max_length - 1}] "
                               f"(the model's length is {self._max_length})")
        return {"until": until, "max_gen": max_gen,
                "temperature": temperature if do_sample else 0.0, "top_k": top_k,
                "top_p": top_p, "seed": seed}

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        groups: dict[str, list[int]] = {}
        for i, req in enumerate(requests):
            groups.setdefault(repr(sorted((req.args[1] or {}).items())), []).append(i)
        out: list[str | None] = [None] * len(requests)
        bar = tqdm(total=len(requests), desc="generate_until",
                   disable=disable_tqdm or not self.progress)
        for members in groups.values():
            st = self._gen_settings(requests[members[0]].args[1])
            keep = self._max_length - st["max_gen"]
            prompts = {}
            for i in members:
                ids = self.tok_encode(requests[i].args[0]) or [self.prefix_token_id]
                prompts[i] = ids[-keep:]
            order = sorted(members, key=lambda i: -len(prompts[i]))
            lengths = {i: len(p) for i, p in prompts.items()}
            for idx in self._batches(order, lengths, exact=True):
                texts = self._generate_batch([prompts[i] for i in idx], st)
                for i, text in zip(idx, texts):
                    out[i] = text
                    self.cache_hook.add_partial("generate_until", requests[i].args, text)
                bar.update(len(idx))
        bar.close()
        return out  # type: ignore[return-value]

    def _generate_batch(self, prompts: list[list[int]], st: dict) -> list[str]:
        bs, max_gen, until = self.batch_size, st["max_gen"], st["until"]
        p_len = max(len(p) for p in prompts)
        if not self.dynamic_len:  # dynamic scaling: one prompt length per batch, unpadded
            p_len = bucket_length(p_len, self._max_length)
        tok = np.zeros((bs, p_len), np.int32)
        seg = np.zeros((bs, p_len), np.int32)
        pos = np.zeros((bs, p_len), np.int32)
        lens = np.ones(bs, np.int32)
        for r in range(bs):
            p = prompts[r] if r < len(prompts) else [self.prefix_token_id]  # dummy rows
            tok[r, p_len - len(p):], seg[r, p_len - len(p):] = p, 1
            pos[r, p_len - len(p):] = np.arange(len(p))
            lens[r] = len(p)
        self.compiled_shapes.add(("generate", bs, p_len, max_gen))
        last, cache = self._prefill_fn(self.params, self._put(tok), self._put(seg),
                                       self._put(pos), p_len + max_gen)
        rng = jax.random.PRNGKey(st["seed"])
        n = len(prompts)
        gen: list[list[int]] = [[] for _ in range(n)]
        done = np.zeros(n, bool)
        eos = self.eot_token_id
        for t in range(max_gen):
            rng, sub = jax.random.split(rng)
            nxt = self._select_fn(last, sub, st["temperature"], st["top_k"], st["top_p"])
            nxt_np = np.asarray(jax.device_get(nxt))
            for r in range(n):
                if done[r]:
                    continue
                if int(nxt_np[r]) == eos:
                    done[r] = True
                    continue
                gen[r].append(int(nxt_np[r]))
                if until:
                    text = self.tok_decode(gen[r])
                    done[r] = any(s in text for s in until)
            if done.all() or t + 1 == max_gen:
                break
            last, cache = self._step_fn(
                self.params, cache, self._put(nxt_np[:, None].astype(np.int32)),
                self._put((lens + t)[:, None].astype(np.int32)), jnp.int32(p_len + t))
        texts = []
        for g in gen:
            text = self.tok_decode(g)
            for s in until:
                if s:
                    text = text.split(s)[0]
            texts.append(text)
        return texts


def load_handle(path: str):
    """A model handle for a run directory or Hugging Face folder: :func:`btlm_jax.load_model`
    where this version has it, else a run directory through :func:`~btlm_jax.eval.session.load_run`."""
    try:
        from btlm_jax.api import load_model
    except ImportError:
        from btlm_jax.eval.session import load_run

        return load_run(path)
    return load_model(path)
