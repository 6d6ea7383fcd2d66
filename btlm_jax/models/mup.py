"""muP (maximal update parametrisation) as BTLM uses it: init scales and forward multipliers.

With base width ``d_base`` and width multiplier ``w = d_model / d_base`` (BTLM-3B: 2560 / 256 = 10):
- init: truncated normal (clipped at 2 sigma) with sigma = ``init_std`` for embeddings,
  ``init_std / sqrt(w)`` for hidden matrices, and additionally ``/ sqrt(2 * n_layers)`` for the
  attention output and FFN output projections;
- forward: embedding output x ``embed_mult``; output logits x ``output_mult / w``; attention
  logits scaled by ``1 / d_head`` instead of ``1 / sqrt(d_head)``;
- optimiser: hidden-matrix LR x ``1 / w`` (FFN output: ``1 / w_ff``, ``w_ff = d_ff / d_ff_base``)
  -- see :mod:`btlm_jax.optim`.

With ``mup.enabled = False`` the same code gives the standard parametrisation: all multipliers 1,
``1/sqrt(d_head)`` attention, sigma = ``init_std`` (outputs still ``/ sqrt(2 * n_layers)``, GPT-2
style).
"""

from __future__ import annotations

import dataclasses
import math


@dataclasses.dataclass(frozen=True)
class MupScales:
    width_mult: float
    ffn_width_mult: float
    embed_mult: float
    output_mult: float  # the full logit multiplier (output_mult / width_mult under muP)
    attn_scale: float
    embed_std: float
    hidden_std: float
    out_proj_std: float


def mup_scales(model_cfg) -> MupScales:
    d_head = model_cfg.d_model // model_cfg.n_heads
    depth = 1.0 / math.sqrt(2.0 * model_cfg.n_layers)
    sigma = float(model_cfg.init_std)
    if model_cfg.mup.enabled:
        w = model_cfg.d_model / model_cfg.mup.base_d_model
        w_ff = model_cfg.d_ff / model_cfg.mup.base_d_ff
        return MupScales(
            width_mult=w,
            ffn_width_mult=w_ff,
            embed_mult=float(model_cfg.mup.embed_mult),
            output_mult=float(model_cfg.mup.output_mult) / w,
            attn_scale=1.0 / d_head,
            embed_std=sigma,
            hidden_std=sigma / math.sqrt(w),
            out_proj_std=sigma / math.sqrt(w) * depth,
        )
    return MupScales(
        width_mult=1.0,
        ffn_width_mult=1.0,
        embed_mult=1.0,
        output_mult=1.0,
        attn_scale=1.0 / math.sqrt(d_head),
        embed_std=sigma,
        hidden_std=sigma,
        out_proj_std=sigma * depth,
    )
