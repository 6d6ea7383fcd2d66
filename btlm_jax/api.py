"""``btlm_jax.load_model(path)``: one entry point for notebooks and tools.

``path`` is either a run directory (written by ``python -m btlm_jax.main`` or ``python -m
btlm_jax.convert import``; the latest checkpoint, or ``step=``) or a Hugging Face checkpoint folder
in the BTLM (cerebras/btlm-3b-8k-base) or GPT-2 / Cerebras-GPT layout, read in memory (nothing is
written). The returned :class:`LoadedModel` has

* ``.tokenizer``: ``encode(text) -> list[int]``, ``decode(ids) -> str`` (the run's pinned
  tokenizer, or the folder's ``tokenizer.json`` / ``vocab.json`` + ``merges.txt``);
* ``.logits(ids)``: int [B, T] -> float32 NumPy [B, T, vocab], with the checkpoint's ALiBi
  slopes and ``alibi_scaling`` (fixed, or dynamic for T keys) applied;
* ``.generate(prompts, max_new_tokens, temperature=0.0, ...)``: KV-cache decoding, the dynamic
  ``alibi_scaling`` recomputed at every decode step;
* ``.cfg`` (ConfigDict), ``.model`` (the Flax :class:`~btlm_jax.models.btlm.BTLM`), ``.params``,
  ``.step`` and ``.mesh`` (None for a Hugging Face folder) for tools built on top.

Example::

    import btlm_jax
    lm = btlm_jax.load_model("btlm-3b-8k-base")          # the HF folder as downloaded
    ids = lm.tokenizer.encode("The capital of France is")
    print(lm.generate(["The capital of France is"], max_new_tokens=8)[0])
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

import numpy as np


class LoadError(ValueError):
    """``path`` is neither a run directory nor a Hugging Face checkpoint folder."""


class LoadedModel:
    """A model, its parameters and tokenizer, ready for logits and generation."""

    def __init__(self, cfg, model, params, tokenizer=None, step: int = 0, mesh=None,
                 source: str = "", rules=None, dequantize=None):
        self.cfg, self.model, self.params = cfg, model, params
        self.tokenizer, self.step, self.mesh, self.source = tokenizer, int(step), mesh, source
        self.rules = rules  # logical axis rules of the run's mesh (activation constraints)
        # weight-only quantisation (:meth:`quantized`): stored params -> float tree, in the jit
        self.dequantize = dequantize
        self._logits_fn = None
        self._generator = None

    def quantized(self, fmt: str, group_size: int = 128) -> "LoadedModel":
        """This model with weight-only quantised parameters (``int8`` per output channel,
        ``int4`` in groups of ``group_size`` inputs; :mod:`btlm_jax.models.quant`), dequantised
        inside the compiled logits and decode steps. ``"none"`` returns ``self``."""
        if fmt in (None, "", "none"):
            return self
        import jax

        from btlm_jax.models import quant

        params = jax.jit(lambda p: quant.quantize_params(p, fmt, group_size))(self.params)
        return LoadedModel(self.cfg, self.model, params, self.tokenizer, self.step, self.mesh,
                           self.source, self.rules, dequantize=quant.dequantize_params)

    def __repr__(self):
        m = self.cfg.model
        return (f"LoadedModel({self.source!r}, step={self.step}, d_model={m.d_model}, "
                f"n_layers={m.n_layers}, n_heads={m.n_heads}, vocab={m.vocab_size}, "
                f"tokenizer={self.tokenizer!r})")

    def _context(self):
        """The run's logical axis rules, read by the model's constraints at trace time (as the
        training program runs its steps; the parameters carry the mesh through their shardings),
        and, for a float32 model, full float32 matmuls (GPUs would otherwise use TF32, about
        1e-3 relative error in the logits)."""
        import flax.linen as nn
        import jax

        stack = contextlib.ExitStack()
        if self.rules is not None:
            stack.enter_context(nn.logical_axis_rules(self.rules))
        if self.cfg.model.dtype == "float32":
            stack.enter_context(jax.default_matmul_precision("highest"))
        return stack

    def logits(self, ids, alibi_scale: float = 1.0) -> np.ndarray:
        """Float32 logits [B, T, vocab] for int token ids [B, T] (or one sequence [T]).

        ``alibi_scale`` divides the slopes on top of the checkpoint's own scaling (position
        interpolation by hand; a dynamic ``alibi_scaling`` takes the larger of the two)."""
        import jax
        import jax.numpy as jnp

        arr = np.asarray(ids)
        squeeze = arr.ndim == 1
        if squeeze:
            arr = arr[None]
        if arr.ndim != 2 or arr.shape[1] == 0 or not np.issubdtype(arr.dtype, np.integer):
            raise ValueError(f"ids: expected integer token ids [B, T] with T >= 1, got shape "
                             f"{arr.shape} of {arr.dtype}")
        v = int(self.cfg.model.vocab_size)
        if arr.min() < 0 or arr.max() >= v:
            raise ValueError(f"ids: token ids must lie in [0, {v}) (model.vocab_size); got "
                             f"{int(arr.min())}..{int(arr.max())}")
        m = self.cfg.model
        if m.position == "learned" and arr.shape[1] > m.max_seq_len:
            raise ValueError(f"ids: {arr.shape[1]} tokens exceed model.max_seq_len="
                             f"{m.max_seq_len} (learned positions)")
        if self._logits_fn is None:
            model, deq = self.model, self.dequantize or (lambda p: p)
            self._logits_fn = jax.jit(
                lambda p, t, s: model.apply({"params": deq(p)}, t, alibi_scale=s))
        with self._context():
            out = self._logits_fn(self.params, jnp.asarray(arr, jnp.int32), jnp.float32(alibi_scale))
        out = np.asarray(jax.device_get(out), np.float32)
        return out[0] if squeeze else out

    def generate(self, prompts, max_new_tokens: int = 64, temperature: float = 0.0,
                 top_k: int = 0, top_p: float = 1.0, seed: int = 0, stop_at_eos: bool = True,
                 alibi_scale: float = 1.0):
        """Continuations of ``prompts``: a string or a list of strings (returns strings), or
        token-id lists (returns token-id lists). ``temperature=0`` is greedy decoding.

        Decoding stops at the tokenizer's end-of-text token (``stop_at_eos``) or after
        ``max_new_tokens``. With a dynamic ``alibi_scaling`` prompts of different lengths are
        decoded in separate batches, so each one's key count (and scaling) is its own.
        """
        from btlm_jax.eval.sampling import Generator, SamplingConfig

        single = isinstance(prompts, str)
        if single:
            prompts = [prompts]
        prompts = list(prompts)
        if not prompts:
            raise ValueError("prompts: give at least one prompt")
        as_text = isinstance(prompts[0], str)
        tok = self.tokenizer
        if as_text:
            if tok is None:
                raise ValueError(f"{self.source}: no tokenizer was found with this model; pass "
                                 "token-id lists as prompts")
            ids = [tok.encode(p) or [tok.eos_id] for p in prompts]
        else:
            ids = [[int(i) for i in p] for p in prompts]
        sc = SamplingConfig(max_new_tokens=int(max_new_tokens), temperature=float(temperature),
                            top_k=int(top_k), top_p=float(top_p), seed=int(seed))
        sc.check()
        eos = tok.eos_id if (tok is not None and stop_at_eos) else None
        if self._generator is None:
            self._generator = Generator(self.model, self.params, dequantize=self.dequantize)
        from btlm_jax.models.alibi import dynamic_train_len

        if dynamic_train_len(self.cfg.model):  # one batch per prompt length
            groups: dict[int, list[int]] = {}
            for i, p in enumerate(ids):
                groups.setdefault(len(p), []).append(i)
        else:
            groups = {0: list(range(len(ids)))}
        outs: list[Any] = [None] * len(ids)
        with self._context():
            for idx in groups.values():
                res = self._generator.generate([ids[i] for i in idx], sc, eos_id=eos,
                                               alibi_scale=alibi_scale)
                for i, r in zip(idx, res):
                    outs[i] = r
        if as_text:
            outs = [tok.decode(o) for o in outs]
        return outs[0] if single else outs


def _is_hf_folder(path: Path) -> bool:
    cfg = path / "config.json"
    if not cfg.is_file():
        return False
    try:
        return "model_type" in json.loads(cfg.read_text())
    except ValueError:
        return False


def load_model(path, step: int | None = None, *, dtype: str | None = None) -> LoadedModel:
    """A :class:`LoadedModel` from a run directory or a Hugging Face checkpoint folder.

    ``step`` picks a run directory's checkpoint (default: the latest). ``dtype`` (``float32`` or
    ``bfloat16``) sets the parameter and compute dtype (default: a Hugging Face folder's float32,
    a run's own ``model.param_dtype`` / ``model.dtype``; bfloat16 halves the memory of the
    published 3B model to about 5.3 GB). A run's parameters are restored as trained, then cast.
    """
    p = Path(path)
    if not p.exists():
        raise LoadError(f"{path}: no such directory (give a run directory or a Hugging Face "
                        "checkpoint folder)")
    if _is_hf_folder(p):
        return _load_hf_folder(p, dtype)
    if (p / "config.json").is_file():
        _check_dtype(dtype)
        from btlm_jax.eval.session import load_run

        run = load_run(p, step)
        program = getattr(run, "program", None)
        lm = LoadedModel(run.cfg, run.model, run.params, run.tokenizer, run.step,
                         getattr(run, "mesh", None), str(p), getattr(program, "rules", None))
        return _cast(lm, dtype) if dtype is not None else lm
    raise LoadError(f"{path} has no config.json: give a run directory (python -m btlm_jax.main / "
                    "python -m btlm_jax.convert import) or a Hugging Face checkpoint folder")


def _check_dtype(dtype) -> None:
    if dtype is not None and dtype not in ("float32", "bfloat16"):
        raise LoadError(f"dtype={dtype!r}: must be float32 or bfloat16")


def _cast(lm: LoadedModel, dtype: str) -> LoadedModel:
    """``lm`` with its floating parameters cast to ``dtype`` (kept on their shardings) and the
    model computing in ``dtype``."""
    import jax
    import jax.numpy as jnp
    import ml_collections

    cfg = ml_collections.ConfigDict(lm.cfg.to_dict())
    cfg.model.param_dtype = cfg.model.dtype = dtype
    target = jnp.dtype(dtype)
    params = jax.tree_util.tree_map(
        lambda x: x.astype(target) if jnp.issubdtype(x.dtype, jnp.floating) else x, lm.params)
    return LoadedModel(cfg, lm.model.clone(cfg=cfg.model), params, lm.tokenizer, lm.step,
                       lm.mesh, lm.source, lm.rules)


def _load_hf_folder(p: Path, dtype: str | None) -> LoadedModel:
    from btlm_jax.config import default_config
    from btlm_jax.convert import hf
    from btlm_jax.data.tokenizer import TokenizerError, load_tokenizer
    from btlm_jax.models.btlm import BTLM

    base = default_config()
    _check_dtype(dtype)
    if dtype is not None:
        base.model.param_dtype = base.model.dtype = dtype
    cfg, params, _ = hf.load_hf(p, base)
    try:
        tok = load_tokenizer(p)
    except TokenizerError:
        tok = None  # weights without tokenizer files: token ids only
    if tok is not None and tok.vocab_size > cfg.model.vocab_size:
        raise LoadError(f"{p}: the tokenizer has {tok.vocab_size} tokens but config.json "
                        f"vocab_size={cfg.model.vocab_size}")
    return LoadedModel(cfg, BTLM(cfg.model), params, tok, 0, None, str(p))

