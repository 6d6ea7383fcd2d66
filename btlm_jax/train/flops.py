"""FLOP accounting for training (model FLOPs, as used for MFU).

Per token: ``6 * N_matmul`` for the forward and backward passes of every weight matrix (including
the tied output projection ``vocab x d_model``, which is a matmul even though its parameters are
shared with the embedding lookup), plus attention: per layer the forward pass costs
``4 * seq_len * d_model`` (QK^T and AV), x3 for training, halved because causal attention only
needs the lower triangle (as MaxText counts since 2025): ``6 * n_layers * seq_len * d_model``.

All from the logical config (``model.vocab_size``, ``model.d_ff``): the zero rows and units of
``model.pad_multiple`` are work the hardware does but not model FLOPs, so a padded and an unpadded
run of the same model count the same FLOPs per token and their MFU differs only by their speed.
"""

from __future__ import annotations


def matmul_params(model_cfg) -> int:
    d, ff, n_layers = model_cfg.d_model, model_cfg.d_ff, model_cfg.n_layers
    mlp = (3 if model_cfg.activation == "swiglu" else 2) * d * ff
    return n_layers * (4 * d * d + mlp) + model_cfg.vocab_size * d


def attention_flops_per_token(model_cfg, seq_len: int) -> int:
    return 6 * model_cfg.n_layers * seq_len * model_cfg.d_model


def train_flops_per_token(model_cfg, seq_len: int) -> int:
    return 6 * matmul_params(model_cfg) + attention_flops_per_token(model_cfg, seq_len)
