"""Describe a config without allocating it: parameter count, FLOPs per token, state bytes.

The command is ``python -m btlm_jax.describe`` / ``btlm-describe`` (:mod:`btlm_jax.cli.describe`).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np


def describe(cfg) -> dict:
    from btlm_jax import optim
    from btlm_jax.config import parse_phases, validate
    from btlm_jax.train.flops import train_flops_per_token
    from btlm_jax.models.btlm import BTLM
    from btlm_jax.models.padding import logical_num_params

    validate(cfg)
    model = BTLM(cfg.model)
    dummy = jnp.zeros((1, 8), jnp.int32)
    params = jax.eval_shape(lambda r: nn.unbox(model.init(r, dummy)["params"]),
                            jax.random.PRNGKey(0))
    leaves = jax.tree_util.tree_leaves(params)
    # the logical model's count (model.pad_multiple's zero rows and units excluded); the byte
    # counts below are of the arrays as allocated (padded)
    num_params = logical_num_params(params, cfg.model)
    param_bytes = sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in leaves)
    phases = parse_phases(cfg)
    tx, _ = optim.build(cfg, sum(p[2] for p in phases))
    opt = jax.eval_shape(tx.init, params)
    opt_bytes = sum(int(np.prod(x.shape)) * x.dtype.itemsize
                    for x in jax.tree_util.tree_leaves(opt) if hasattr(x, "dtype"))
    from btlm_jax.models.quant import DEFAULT_GROUP_SIZE, bytes_by_format

    weight_bytes = bytes_by_format(params, DEFAULT_GROUP_SIZE)
    seq_len = max(p[0] for p in phases)
    embed = cfg.model.vocab_size * cfg.model.d_model
    return {
        "num_params": num_params,
        "num_non_embedding_params": num_params - embed,
        "num_params_allocated": sum(int(np.prod(x.shape)) for x in leaves),
        "flops_per_token": train_flops_per_token(cfg.model, seq_len),
        "flops_per_token_seq_len": seq_len,
        "flops_per_token_by_phase": {str(p[0]): train_flops_per_token(cfg.model, p[0])
                                     for p in phases},
        "param_bytes": param_bytes,
        "optimizer_state_bytes": opt_bytes,
        # inference weight bytes per storage format (int8: per-channel scales; int4: groups of
        # DEFAULT_GROUP_SIZE inputs per float32 scale; norms/biases/position tables stay float32)
        "weight_bytes_by_format": weight_bytes,
        "int4_group_size": DEFAULT_GROUP_SIZE,
        "tokens_per_step_by_phase": {str(p[0]): p[0] * p[1] for p in phases},
    }




if __name__ == "__main__":
    from btlm_jax.cli.describe import run

    run()
