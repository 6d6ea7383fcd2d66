"""Hugging Face checkpoints <-> btlm_jax parameters (safetensors, or ``.bin`` read without unpickling).

Two layouts, both GPT-2 style (``transformers.pytorch_utils.Conv1D`` weights stored
``[in_features, out_features]``; fused ``c_attn`` = [query | key | value] along the output axis):

**BTLM** (``model_type: "btlm"``, cerebras/btlm-3b-8k-base). Names and shapes follow the public
model: its ``config.json`` (https://huggingface.co/cerebras/btlm-3b-8k-base/blob/main/config.json:
``n_embd`` 2560, ``n_layer`` 32, ``n_head`` 32, ``n_inner`` 6826, ``n_positions`` 8192,
``activation_function: "swiglu"``, ``position_embedding_type: "alibi"``, ``mup_width_scale`` 0.1,
``mup_embeddings_scale`` 14.6, ``mup_output_alpha`` 2.22, ``mup_scale_qk_dot_by_d: true``;
an earlier revision used ``width_scale``, ``embeddings_scale``, ``output_logits_scale`` =
alpha x width_scale and ``scale_qk_dot_by_d``) and its ``modeling_btlm.py`` (GPT-2's module tree
``transformer.{wte, h.N.{ln_1, attn.{c_attn, c_proj}, ln_2, mlp.{c_fc, c_fc2, c_proj}}, ln_f}`` +
``lm_head``; SwiGLU computes ``c_fc(x) * silu(c_fc2(x))``; ALiBi slopes are the buffer-like
parameter ``transformer.relative_pe.slopes`` [n_head, 1] (bf16 in the published checkpoint, so
rounded by up to 0.4%: we check them against the standard slopes at the stored dtype's precision
and carry the stored values as ``model.alibi_slopes``, so logits match); attention logits divided by
``d_head ** 1`` when ``mup_scale_qk_dot_by_d`` else ``** 0.5``; embeddings x
``mup_embeddings_scale``; logits x ``mup_output_alpha * mup_width_scale``; ``alibi_scaling`` is
``{"type": "linear", "factor": f}`` (fixed: ``model.alibi_scaling``) or ``{"type": "linear",
"train_seq_len": L}`` (dynamic: slopes / (keys / L) in every forward with more than L keys,
``model.alibi_scaling_train_seq_len``; see :func:`btlm_jax.models.alibi.scaling_divisor`)).
The published main branch ships one bf16 ``pytorch_model.bin``; it is read with
``torch.load(weights_only=True)`` (tensors only, never an arbitrary unpickle). The same tensor names appear
in the Cerebras Model Zoo converter (``checkpoint_converters/btlm_hf_cs.py``: ``mlp.c_fc2``,
``relative_pe.slopes``) and the text-generation-inference port of BTLM.

**GPT-2 / Cerebras-GPT** (``model_type: "gpt2"``, ``GPT2LMHeadModel``): learned positions
``transformer.wpe``, GELU MLP ``c_fc`` / ``c_proj``, 1/sqrt(d_head) attention, tied ``lm_head``.

Mapping to our tree (per layer ``i``; ``layers/...[i]`` when layers are scanned):
``ln_1.scale/bias <-> ln_1.weight/bias``; ``attn.{query,key,value}.kernel [D, H, Dh]`` ->
``c_attn.weight [D, 3D]``; ``attn.out.kernel [H, Dh, D] <-> c_proj.weight [D, D]``;
``mlp.wi_0`` (SwiGLU gate, the silu branch) ``<-> mlp.c_fc2``; ``mlp.wi_1`` (up) or ``mlp.wi``
(GELU) ``<-> mlp.c_fc``; ``mlp.wo <-> mlp.c_proj``; ``embed.embedding <-> transformer.wte``;
``pos_embed.embedding <-> transformer.wpe``; ``lm_head.kernel [D, V] <-> lm_head.weight [V, D]``
(untied models only).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from btlm_jax.models.alibi import alibi_slopes, model_slopes

LAYOUTS = ("btlm", "gpt2")
_GELU_NAMES = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh",
               "gelu_fast": "gelu_tanh"}
BTLM_AUTO_MAP = {
    "AutoConfig": "cerebras/btlm-3b-8k-base--configuration_btlm.BTLMConfig",
    "AutoModel": "cerebras/btlm-3b-8k-base--modeling_btlm.BTLMModel",
    "AutoModelForCausalLM": "cerebras/btlm-3b-8k-base--modeling_btlm.BTLMLMHeadModel",
}


class ConversionError(ValueError):
    """A checkpoint or config that cannot be converted; the message names the tensor or key."""


# ------------------------------------------------------------------------------ configs
def _close(a: float, b: float) -> bool:
    return math.isclose(float(a), float(b), rel_tol=1e-6, abs_tol=1e-9)


def default_layout(m) -> str:
    """``gpt2`` for a standard-parametrisation GELU model with learned positions, else ``btlm``."""
    if (m.position == "learned" and m.activation in ("gelu", "gelu_tanh") and not m.mup.enabled
            and float(m.alibi_scaling) == 1.0 and not int(m.get("alibi_scaling_train_seq_len", 0))):
        return "gpt2"
    return "btlm"


def hf_config(m, layout: str | None = None, *, eos_token_id: int | None = None) -> dict:
    """The Hugging Face ``config.json`` for model config ``m`` in ``layout``."""
    layout = layout or default_layout(m)
    if layout not in LAYOUTS:
        raise ConversionError(f"layout={layout!r}: must be one of {', '.join(LAYOUTS)}")
    if not m.use_bias:
        raise ConversionError("model.use_bias=False: the GPT-2/BTLM layouts always carry biases")
    act = {"swiglu": "swiglu", "gelu": "gelu", "gelu_tanh": "gelu_new"}[m.activation]
    common = {
        "vocab_size": int(m.vocab_size), "n_positions": int(m.max_seq_len),
        "n_embd": int(m.d_model), "n_layer": int(m.n_layers), "n_head": int(m.n_heads),
        "n_inner": int(m.d_ff), "activation_function": act,
        "layer_norm_epsilon": float(m.layer_norm_eps), "initializer_range": float(m.init_std),
        "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0,
        "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False, "tie_word_embeddings": bool(m.tie_embeddings),
        "use_cache": True,
    }
    if eos_token_id is not None:
        common["bos_token_id"] = common["eos_token_id"] = int(eos_token_id)
    if layout == "gpt2":
        bad = []
        if m.position != "learned":
            bad.append(f"model.position={m.position!r} (GPT-2 has learned positions)")
        if m.activation == "swiglu":
            bad.append("model.activation='swiglu' (GPT-2 has a GELU MLP)")
        if m.mup.enabled:
            bad.append("model.mup.enabled=True (GPT-2 has no muP multipliers)")
        if bad:
            raise ConversionError("cannot export to the GPT-2 layout: " + "; ".join(bad)
                                  + ". Use --layout=btlm.")
        return {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", **common}
    cfg = {"architectures": ["BTLMLMHeadModel"], "model_type": "btlm", "auto_map": BTLM_AUTO_MAP,
           **common, "position_embedding_type": m.position}
    if m.mup.enabled:
        cfg.update(mup_width_scale=float(m.mup.base_d_model) / float(m.d_model),
                   mup_embeddings_scale=float(m.mup.embed_mult),
                   mup_output_alpha=float(m.mup.output_mult), mup_scale_qk_dot_by_d=True)
    else:
        cfg.update(mup_width_scale=1.0, mup_embeddings_scale=1.0, mup_output_alpha=1.0,
                   mup_scale_qk_dot_by_d=False)
    # only what the run asks for: model.train_seq_len (the PI reference length of `evaluate`)
    # is not dynamic scaling and is not written
    dyn = int(m.get("alibi_scaling_train_seq_len", 0) or 0)
    if float(m.alibi_scaling) != 1.0:
        cfg["alibi_scaling"] = {"type": "linear", "factor": float(m.alibi_scaling)}
    elif m.position == "alibi" and dyn > 0:
        cfg["alibi_scaling"] = {"type": "linear", "train_seq_len": dyn}
    else:
        cfg["alibi_scaling"] = None
    return cfg


def model_overrides(hf: dict) -> tuple[str, dict]:
    """(layout, {model.* key: value}) for a Hugging Face config dict; errors name the key."""
    mt = hf.get("model_type")
    if mt not in LAYOUTS:
        raise ConversionError(
            f"config.json model_type={mt!r}: only 'btlm' (cerebras/btlm-3b-8k-base) and 'gpt2' "
            "(GPT-2, Cerebras-GPT) checkpoints can be imported")
    for key in ("vocab_size", "n_embd", "n_layer", "n_head"):
        if key not in hf:
            raise ConversionError(f"config.json has no {key!r}")
    d = int(hf["n_embd"])
    act_name = hf.get("activation_function", "gelu_new")
    if act_name == "swiglu":
        act = "swiglu"
    elif act_name in _GELU_NAMES:
        act = _GELU_NAMES[act_name]
    else:
        raise ConversionError(
            f"config.json activation_function={act_name!r}: supported are swiglu, "
            + ", ".join(sorted(_GELU_NAMES)))
    if not hf.get("scale_attn_weights", True):
        raise ConversionError("config.json scale_attn_weights=false is not supported")
    if hf.get("scale_attn_by_inverse_layer_idx", False):
        raise ConversionError("config.json scale_attn_by_inverse_layer_idx=true is not supported")
    if hf.get("add_cross_attention", False):
        raise ConversionError("config.json add_cross_attention=true is not supported")
    n_pos = int(hf.get("n_positions", 1024))
    ov = {
        "vocab_size": int(hf["vocab_size"]), "d_model": d, "n_layers": int(hf["n_layer"]),
        "n_heads": int(hf["n_head"]),
        "d_ff": int(hf["n_inner"]) if hf.get("n_inner") is not None else 4 * d,
        "activation": act, "max_seq_len": n_pos,
        "layer_norm_eps": float(hf.get("layer_norm_epsilon", 1e-5)),
        "use_bias": True, "tie_embeddings": bool(hf.get("tie_word_embeddings", True)),
        "init_std": float(hf.get("initializer_range", 0.02)),
        "alibi_scaling": 1.0, "alibi_scaling_train_seq_len": 0, "alibi_slopes": (),
        "train_seq_len": 0,
    }
    if mt == "gpt2":
        ov.update({"position": "learned", "mup.enabled": False})
        return "gpt2", ov
    pos = hf.get("position_embedding_type", "learned")
    if pos not in ("alibi", "learned"):
        raise ConversionError(f"config.json position_embedding_type={pos!r}: must be alibi or learned")
    ov["position"] = pos
    ov.update(_mup_overrides(hf, d, ov["d_ff"]))
    ov.update(_alibi_scaling_overrides(hf.get("alibi_scaling")))
    return "btlm", ov


def _mup_overrides(hf: dict, d: int, d_ff: int) -> dict:
    """model.mup.* from a BTLM config's muP keys (either key generation)."""
    ov: dict = {}
    # muP keys; the first public revision of btlm-3b-8k-base used the unprefixed names.
    width = float(hf.get("mup_width_scale", hf.get("width_scale", 1.0)))
    emb = float(hf.get("mup_embeddings_scale", hf.get("embeddings_scale", 1.0)))
    if "mup_output_alpha" in hf:
        alpha = float(hf["mup_output_alpha"])
    elif "output_logits_scale" in hf:
        alpha = float(hf["output_logits_scale"]) / width
    else:
        alpha = 1.0
    by_d = bool(hf.get("mup_scale_qk_dot_by_d", hf.get("scale_qk_dot_by_d", False)))
    if by_d:
        base = _tidy(d * width)
        if base != int(base):
            raise ConversionError(
                f"config.json mup_width_scale={width} with n_embd={d} gives a non-integer muP base "
                f"width {d * width}; model.mup.base_d_model must be an integer")
        ov.update({"mup.enabled": True, "mup.base_d_model": int(base),
                   "mup.base_d_ff": _tidy(d_ff * width), "mup.embed_mult": emb,
                   "mup.output_mult": alpha})
    else:
        if not (_close(width, 1) and _close(emb, 1) and _close(alpha, 1)):
            raise ConversionError(
                f"config.json mup_width_scale={width}, mup_embeddings_scale={emb}, "
                f"mup_output_alpha={alpha} with mup_scale_qk_dot_by_d=false: btlm_jax ties the muP "
                "multipliers to 1/d_head attention, so this mix cannot be represented")
        ov["mup.enabled"] = False
    return ov


def _alibi_scaling_overrides(sc) -> dict:
    """model.alibi_scaling (fixed factor) or model.alibi_scaling_train_seq_len (dynamic)."""
    ov: dict = {}
    if sc is not None:
        if not isinstance(sc, dict) or sc.get("type") != "linear":
            raise ConversionError(f"config.json alibi_scaling={sc!r}: expected "
                                  "{'type': 'linear', 'factor': f} or {'type': 'linear', 'train_seq_len': L}")
        # the reference applies a factor when one is given, else the dynamic train length
        if sc.get("factor") is not None:
            ov["alibi_scaling"] = float(sc["factor"])
            if not ov["alibi_scaling"] > 0:
                raise ConversionError(f"config.json alibi_scaling.factor={sc['factor']!r}: must be > 0")
        elif sc.get("train_seq_len") is not None:
            n = int(sc["train_seq_len"])
            if n <= 0:
                raise ConversionError(
                    f"config.json alibi_scaling.train_seq_len={sc['train_seq_len']!r}: must be > 0")
            ov["alibi_scaling_train_seq_len"] = n
            ov["train_seq_len"] = n  # also the reference length of evaluate's PI
        else:
            raise ConversionError(f"config.json alibi_scaling={sc!r}: give 'factor' or 'train_seq_len'")
    return ov


def _tidy(x: float) -> float:
    """2560 * 0.1 = 256.00000000000003 -> 256.0 (keeps exact integer widths exact)."""
    r = round(x)
    return float(r) if abs(x - r) < 1e-6 * max(1.0, abs(x)) else float(x)


def apply_overrides(cfg: ml_collections.ConfigDict, ov: dict) -> ml_collections.ConfigDict:
    for key, v in ov.items():
        node = cfg.model
        parts = key.split(".")
        for p in parts[:-1]:
            node = node[p]
        node[parts[-1]] = v
    return cfg


# ------------------------------------------------------------------------------ tensors
def _layers(params, m) -> list[dict]:
    if m.scan_layers:
        stacked = params["layers"]
        return [jax.tree_util.tree_map(lambda x, i=i: x[i], stacked) for i in range(m.n_layers)]
    return [params[f"layers_{i}"] for i in range(m.n_layers)]


def to_hf(params, m, layout: str | None = None) -> dict[str, Any]:
    """Our parameter tree -> {Hugging Face tensor name: array} (jnp ops; works under eval_shape).

    Tensors have the logical shapes (``vocab_size``, ``n_inner``): the padding of
    ``model.pad_multiple`` is cut off first (:func:`btlm_jax.models.padding.to_logical`)."""
    from btlm_jax.models.padding import nonzero_padding, to_logical

    layout = layout or default_layout(m)
    # NumPy for concrete arrays (fast, no dispatch), jnp when traced (eval_shape)
    concrete = all(isinstance(x, np.ndarray) for x in jax.tree_util.tree_leaves(params))
    xp = np if concrete else jnp
    bad = nonzero_padding(params, m) if concrete else []
    if bad:
        raise ConversionError(
            f"{', '.join(bad[:4])}: the padding of model.pad_multiple={m.pad_multiple} holds "
            "nonzero values, so these weights are not the logical model; they cannot be exported")
    params = to_logical(params, m)
    d, h = m.d_model, m.n_heads
    out = {"transformer.wte.weight": params["embed"]["embedding"]}
    if m.position == "learned":
        out["transformer.wpe.weight"] = params["pos_embed"]["embedding"]
    elif layout == "btlm":  # the run's own slopes (carried from a checkpoint or standard)
        out["transformer.relative_pe.slopes"] = xp.asarray(model_slopes(m), xp.float32)[:, None]
    for i, lp in enumerate(_layers(params, m)):
        p = f"transformer.h.{i}."
        for ln in ("ln_1", "ln_2"):
            out[p + ln + ".weight"] = lp[ln]["scale"]
            out[p + ln + ".bias"] = lp[ln]["bias"]
        a = lp["attn"]
        out[p + "attn.c_attn.weight"] = xp.concatenate(
            [a[n]["kernel"].reshape(d, d) for n in ("query", "key", "value")], axis=1)
        out[p + "attn.c_attn.bias"] = xp.concatenate(
            [a[n]["bias"].reshape(d) for n in ("query", "key", "value")])
        out[p + "attn.c_proj.weight"] = a["out"]["kernel"].reshape(d, d)
        out[p + "attn.c_proj.bias"] = a["out"]["bias"]
        mp = lp["mlp"]
        if m.activation == "swiglu":
            if layout != "btlm":
                raise ConversionError("SwiGLU models export only to the btlm layout")
            up, gate = mp["wi_1"], mp["wi_0"]
            out[p + "mlp.c_fc2.weight"] = gate["kernel"]
            out[p + "mlp.c_fc2.bias"] = gate["bias"]
        else:
            up = mp["wi"]
        out[p + "mlp.c_fc.weight"] = up["kernel"]
        out[p + "mlp.c_fc.bias"] = up["bias"]
        out[p + "mlp.c_proj.weight"] = mp["wo"]["kernel"]
        out[p + "mlp.c_proj.bias"] = mp["wo"]["bias"]
    out["transformer.ln_f.weight"] = params["ln_f"]["scale"]
    out["transformer.ln_f.bias"] = params["ln_f"]["bias"]
    if not m.tie_embeddings:
        out["lm_head.weight"] = params["lm_head"]["kernel"].T
    return out


def expected_shapes(m, layout: str | None = None) -> dict[str, tuple[int, ...]]:
    """Every Hugging Face tensor name and shape the model config implies (no allocation)."""
    from btlm_jax.models.btlm import BTLM

    import flax.linen as nn

    abstract = jax.eval_shape(
        lambda r: nn.unbox(BTLM(m).init(r, jnp.zeros((1, 8), jnp.int32)))["params"],
        jax.random.PRNGKey(0))
    shapes = jax.eval_shape(lambda p: to_hf(p, m, layout), abstract)
    return {k: tuple(v.shape) for k, v in shapes.items()}


_IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias")  # GPT-2's causal-mask buffers


def _normalise_names(tensors: dict) -> dict:
    names = list(tensors)
    if names and not any(n.startswith("transformer.") for n in names):
        # a bare GPT2Model / BTLMModel checkpoint (no LM head wrapper)
        tensors = {("transformer." + n if not n.startswith("lm_head.") else n): v
                   for n, v in tensors.items()}
    return {n: v for n, v in tensors.items() if not n.endswith(_IGNORED_SUFFIXES)}


def from_hf(tensors: dict, m, layout: str, dtype=None) -> dict:
    """{Hugging Face name: array} -> our parameter tree for model config ``m``.

    Checks every tensor's presence and shape against the config first and raises
    :class:`ConversionError` naming each mismatch. The tree has the physical shapes of ``m``
    (vocabulary and d_ff padded with zeros to ``model.pad_multiple``; :func:`to_hf` cuts them
    off again, so import and export are bit-identical).
    """
    tensors = _normalise_names(tensors)
    want = expected_shapes(m, layout)
    if m.tie_embeddings and "lm_head.weight" in tensors:
        lm = np.asarray(tensors.pop("lm_head.weight"))
        if lm.shape != want["transformer.wte.weight"] or not np.array_equal(
                lm, np.asarray(tensors.get("transformer.wte.weight"))):
            raise ConversionError(
                "lm_head.weight differs from transformer.wte.weight but the config ties them "
                "(tie_word_embeddings true): set tie_word_embeddings=false in config.json")
    missing = sorted(set(want) - set(tensors))
    extra = sorted(set(tensors) - set(want))
    bad = sorted(f"{k}: checkpoint {tuple(tensors[k].shape)}, config expects {want[k]}"
                 for k in set(want) & set(tensors) if tuple(tensors[k].shape) != want[k])
    if missing or extra or bad:
        lines = []
        if bad:
            lines.append("shape mismatches: " + "; ".join(bad[:12]) + (" ..." if len(bad) > 12 else ""))
        if missing:
            lines.append("missing tensors: " + ", ".join(missing[:8]) + (" ..." if len(missing) > 8 else ""))
        if extra:
            lines.append("unexpected tensors: " + ", ".join(extra[:8]) + (" ..." if len(extra) > 8 else ""))
        raise ConversionError(
            f"the checkpoint does not match its config (n_embd={m.d_model}, n_layer={m.n_layers}, "
            f"n_head={m.n_heads}, n_inner={m.d_ff}, vocab_size={m.vocab_size}, "
            f"n_positions={m.max_seq_len}, layout {layout}): " + " | ".join(lines)
            + ". Check that config.json belongs to these weights.")
    checked_slopes(tensors, m.n_heads)
    from btlm_jax.models.btlm import DTYPES

    pdt = np.dtype(dtype or DTYPES[m.param_dtype])
    t = {k: np.asarray(v).astype(pdt) for k, v in tensors.items()}
    d, h, dh = m.d_model, m.n_heads, m.d_model // m.n_heads
    layers = []
    for i in range(m.n_layers):
        p = f"transformer.h.{i}."
        w = t[p + "attn.c_attn.weight"]
        b = t[p + "attn.c_attn.bias"]
        attn = {n: {"kernel": w[:, j * d:(j + 1) * d].reshape(d, h, dh),
                    "bias": b[j * d:(j + 1) * d].reshape(h, dh)}
                for j, n in enumerate(("query", "key", "value"))}
        attn["out"] = {"kernel": t[p + "attn.c_proj.weight"].reshape(h, dh, d),
                       "bias": t[p + "attn.c_proj.bias"]}
        up = {"kernel": t[p + "mlp.c_fc.weight"], "bias": t[p + "mlp.c_fc.bias"]}
        mlp = {"wo": {"kernel": t[p + "mlp.c_proj.weight"], "bias": t[p + "mlp.c_proj.bias"]}}
        if m.activation == "swiglu":
            mlp["wi_1"] = up
            mlp["wi_0"] = {"kernel": t[p + "mlp.c_fc2.weight"], "bias": t[p + "mlp.c_fc2.bias"]}
        else:
            mlp["wi"] = up
        layers.append({
            "ln_1": {"scale": t[p + "ln_1.weight"], "bias": t[p + "ln_1.bias"]},
            "ln_2": {"scale": t[p + "ln_2.weight"], "bias": t[p + "ln_2.bias"]},
            "attn": attn, "mlp": mlp})
    params = {"embed": {"embedding": t["transformer.wte.weight"]},
              "ln_f": {"scale": t["transformer.ln_f.weight"], "bias": t["transformer.ln_f.bias"]}}
    if m.position == "learned":
        params["pos_embed"] = {"embedding": t["transformer.wpe.weight"]}
    if not m.tie_embeddings:
        params["lm_head"] = {"kernel": t["lm_head.weight"].T}
    if m.scan_layers:
        params["layers"] = jax.tree_util.tree_map(lambda *xs: np.stack(xs), *layers)
    else:
        for i, lp in enumerate(layers):
            params[f"layers_{i}"] = lp
    from btlm_jax.models.padding import to_physical

    return jax.tree_util.tree_map(jnp.asarray, to_physical(params, m))


def checked_slopes(tensors: dict, n_heads: int) -> tuple[float, ...]:
    """The stored ALiBi slopes to carry (``model.alibi_slopes``), after checking them.

    ``transformer.relative_pe.slopes`` must be the standard slopes for ``n_heads`` to within one
    unit in the last place of the dtype they are stored in (the published checkpoint stores bf16,
    which moves them by up to 0.4%), or of bf16 / float16 when every value is exactly one (bf16
    slopes exported as float32). Returns their exact values as floats, or ``()`` when absent or
    equal to the standard slopes in float32 (nothing to carry).
    """
    if "transformer.relative_pe.slopes" not in tensors:
        return ()
    raw = np.asarray(tensors["transformer.relative_pe.slopes"])
    got = raw.astype(np.float64).reshape(-1)
    std = alibi_slopes(n_heads)
    try:
        eps = float(np.finfo(raw.dtype).eps)
    except ValueError:
        raise ConversionError(f"transformer.relative_pe.slopes has dtype {raw.dtype}: expected a "
                              "floating-point tensor") from None
    import ml_dtypes

    for narrow in (ml_dtypes.bfloat16, np.float16):  # bf16 values re-exported as float32 keep
        if np.array_equal(got.astype(narrow).astype(np.float64), got):  # bf16 precision
            eps = max(eps, float(ml_dtypes.finfo(narrow).eps))
    if got.shape != std.shape or not np.all(np.abs(got - std) <= eps * std):
        worst = "" if got.shape != std.shape else \
            f" (largest relative difference {np.max(np.abs(got - std) / std):.3g})"
        raise ConversionError(
            "transformer.relative_pe.slopes are not the standard ALiBi slopes for "
            f"n_head={n_heads} at {raw.dtype} precision (relative tolerance {eps:.3g}){worst}: "
            "the checkpoint's head count or slope order does not match config.json")
    if np.array_equal(got.astype(np.float32), std.astype(np.float32)):
        return ()
    return tuple(float(x) for x in got)


# ------------------------------------------------------------------------------ files
def weight_files(hf_dir: str | Path) -> list[Path]:
    """The weight files of a checkpoint directory, safetensors preferred: the shards an index
    (``model.safetensors.index.json`` / ``pytorch_model.bin.index.json``) names, else
    ``model.safetensors`` / ``*.safetensors``, else ``pytorch_model*.bin``."""
    hf_dir = Path(hf_dir)
    if not hf_dir.is_dir():
        raise ConversionError(f"{hf_dir} is not a directory: give a Hugging Face checkpoint folder "
                              "(config.json + weights)")
    for index_name, single, pattern in (
            ("model.safetensors.index.json", "model.safetensors", "*.safetensors"),
            ("pytorch_model.bin.index.json", "pytorch_model.bin", "pytorch_model*.bin")):
        index = hf_dir / index_name
        if index.exists():
            try:
                shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            except (ValueError, KeyError, AttributeError) as e:
                raise ConversionError(f"{index}: not a weight index with a weight_map ({e})") from None
            files = [hf_dir / f for f in shards]
            for f in files:
                if not f.exists():
                    raise ConversionError(f"{f} is listed in {index.name} but does not exist: "
                                          "download every shard")
            return files
        if (hf_dir / single).exists():
            return [hf_dir / single]
        files = sorted(hf_dir.glob(pattern))
        if files:
            return files
    raise ConversionError(
        f"{hf_dir} holds no weights (model.safetensors, *.safetensors, pytorch_model.bin or a "
        "*.index.json with its shards)")


def _torch_to_numpy(v):
    """A CPU torch tensor as a NumPy array of the same dtype (bf16 as ml_dtypes.bfloat16)."""
    import torch

    v = v.detach().contiguous()
    if v.dtype == torch.bfloat16:
        import ml_dtypes

        return v.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return v.numpy()


def _read_bin(path: Path) -> dict[str, Any]:
    try:
        import torch
    except ImportError:
        raise ConversionError(
            f"{path} is a PyTorch .bin checkpoint: reading it safely (torch.load with "
            "weights_only=True, no arbitrary unpickling) needs torch's CPU build: "
            "pip install 'btlm_jax[hf]' (or pip install torch --index-url "
            "https://download.pytorch.org/whl/cpu)") from None
    try:
        try:  # memory-mapped (zip format): tensors are read from the file as they are converted
            sd = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:
            sd = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # weights_only refuses anything but tensors and plain containers
        raise ConversionError(
            f"{path}: cannot be read with torch.load(weights_only=True) ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}); btlm_jax never unpickles arbitrary "
            "objects: convert the checkpoint to safetensors") from None
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict):
        raise ConversionError(f"{path}: holds a {type(sd).__name__}, not a dict of tensors")
    return {k: _torch_to_numpy(v) for k, v in sd.items() if isinstance(v, torch.Tensor)}


def read_tensors(hf_dir: str | Path) -> dict[str, Any]:
    """All tensors of a Hugging Face checkpoint directory as NumPy arrays in their stored dtype
    (bf16 as ``ml_dtypes.bfloat16``): safetensors or PyTorch ``.bin``, single or sharded with an
    index. ``.bin`` files are read only with ``torch.load(weights_only=True)``."""
    out: dict[str, Any] = {}
    for f in weight_files(hf_dir):
        if f.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(f), framework="flax") as fh:
                for k in fh.keys():
                    out[k] = np.asarray(fh.get_tensor(k))
        else:
            out.update(_read_bin(f))
    return out


def read_config(hf_dir: str | Path) -> dict:
    path = Path(hf_dir) / "config.json"
    if not path.exists():
        raise ConversionError(f"{path} does not exist: a Hugging Face checkpoint directory needs it")
    return json.loads(path.read_text())


def load_hf(hf_dir: str | Path, base_cfg: ml_collections.ConfigDict | None = None,
            *, scan_layers: bool | None = None):
    """(config, params, layout) for a Hugging Face checkpoint directory."""
    from btlm_jax.config import default_config

    hf = read_config(hf_dir)
    layout, ov = model_overrides(hf)
    cfg = apply_overrides(base_cfg if base_cfg is not None else default_config(), ov)
    if scan_layers is not None:
        cfg.model.scan_layers = scan_layers
    tensors = read_tensors(hf_dir)
    params = from_hf(tensors, cfg.model, layout)
    # carry the stored slopes (bf16 in the published checkpoint) so logits match the reference
    cfg.model.alibi_slopes = checked_slopes(_normalise_names(tensors), cfg.model.n_heads)
    return cfg, params, layout


def save_hf(params, m, out_dir: str | Path, layout: str | None = None, *, dtype=None,
            eos_token_id: int | None = None, tokenizer=None) -> Path:
    """Writes ``config.json`` and ``model.safetensors`` (Hugging Face naming) into ``out_dir``,
    and the tokenizer's files (``vocab.json`` + ``merges.txt`` or ``tokenizer.json`` ...) when
    ``tokenizer`` (a :class:`btlm_jax.data.tokenizer.Tokenizer` or a path) is given."""
    from safetensors.numpy import save_file

    layout = layout or default_layout(m)
    config = hf_config(m, layout, eos_token_id=eos_token_id)
    host = jax.tree_util.tree_map(np.asarray, jax.device_get(params))
    tensors = to_hf(host, m, layout)
    arrs = {}
    for k, v in tensors.items():
        if dtype is not None and k != "transformer.relative_pe.slopes":
            v = v.astype(jnp.dtype(dtype))
        arrs[k] = np.ascontiguousarray(v)
    config["torch_dtype"] = str(np.dtype(arrs["transformer.wte.weight"].dtype).name)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file(arrs, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    if tokenizer is not None and getattr(tokenizer, "kind", None) != "bytes":
        from btlm_jax.data.tokenizer import copy_tokenizer_files

        copy_tokenizer_files(tokenizer, out)
    return out
