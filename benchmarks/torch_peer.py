"""The BTLM architecture in PyTorch, trained with ``torch.optim.AdamW``: the throughput peer.

Same model as :mod:`btlm_jax.models.btlm` (pre-LayerNorm blocks, ALiBi, SwiGLU, biases on QKV /
attention output / FFN, tied embeddings, muP: embedding x embed_mult, logits x output_mult / w,
attention logits / d_head, muP init and per-group learning rates, no weight decay on biases and
norms), global-norm gradient clipping, float32, the same shapes. It is what a researcher would
write instead: eager PyTorch, ``F.scaled_dot_product_attention`` with the ALiBi bias and causal
mask as one additive float mask, ``F.cross_entropy``, the default (foreach) AdamW.

Run by ``benchmarks/train_step.py --vs-torch`` (same shapes, one process tree); on its own:

    python benchmarks/torch_peer.py --d_model=1024 --n_layers=4 --n_heads=8 --d_ff=2730 \
        --vocab_size=16384 --seq_len=512 --batch_size=1 --steps=5 --json

Needs the CPU build of torch (a benchmark dependency only): ``pip install torch==2.13.0``
(on Linux x86-64 add ``--index-url https://download.pytorch.org/whl/cpu`` to avoid CUDA wheels).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn


def alibi_slopes(n_heads: int) -> torch.Tensor:
    def pow2(n):
        return [2.0 ** (-8.0 * h / n) for h in range(1, n + 1)]

    if n_heads & (n_heads - 1) == 0:
        s = pow2(n_heads)
    else:
        p = 2 ** int(math.floor(math.log2(n_heads)))
        s = pow2(p) + pow2(2 * p)[0::2][: n_heads - p]
    return torch.tensor(s, dtype=torch.float32)


def alibi_causal_mask(n_heads: int, seq_len: int) -> torch.Tensor:
    """[1, H, L, L] additive mask: -m_h (i - j) for j <= i, -inf above the diagonal."""
    pos = torch.arange(seq_len)
    dist = (pos[:, None] - pos[None, :]).clamp(min=0).float()
    bias = -alibi_slopes(n_heads)[:, None, None] * dist[None]
    causal = pos[:, None] >= pos[None, :]
    return bias.masked_fill(~causal, float("-inf"))[None]


def trunc_normal_(t: torch.Tensor, std: float) -> torch.Tensor:
    return nn.init.trunc_normal_(t, mean=0.0, std=std, a=-2.0 * std, b=2.0 * std)


class Block(nn.Module):
    def __init__(self, d, n_heads, d_ff, hidden_std, out_std, eps):
        super().__init__()
        self.n_heads, self.d_head = n_heads, d // n_heads
        self.ln_1 = nn.LayerNorm(d, eps=eps)
        self.qkv = nn.Linear(d, 3 * d)
        self.out = nn.Linear(d, d)
        self.ln_2 = nn.LayerNorm(d, eps=eps)
        self.wi = nn.Linear(d, 2 * d_ff)  # gate and up projections side by side
        self.wo = nn.Linear(d_ff, d)
        for lin, std in ((self.qkv, hidden_std), (self.wi, hidden_std), (self.out, out_std),
                         (self.wo, out_std)):
            trunc_normal_(lin.weight, std)
            nn.init.zeros_(lin.bias)

    def forward(self, x, mask):
        b, length, d = x.shape
        q, k, v = self.qkv(self.ln_1(x)).split(d, dim=-1)
        q, k, v = (t.view(b, length, self.n_heads, self.d_head).transpose(1, 2) for t in (q, k, v))
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=1.0 / self.d_head)
        x = x + self.out(a.transpose(1, 2).reshape(b, length, d))
        gate, up = self.wi(self.ln_2(x)).chunk(2, dim=-1)
        return x + self.wo(F.silu(gate) * up)


class BTLM(nn.Module):
    def __init__(self, a):
        super().__init__()
        w = a.d_model / a.base_d_model
        self.embed_mult, self.output_mult = a.embed_mult, a.output_mult / w
        hidden_std = a.init_std / math.sqrt(w)
        out_std = hidden_std / math.sqrt(2.0 * a.n_layers)
        self.embed = nn.Embedding(a.vocab_size, a.d_model)
        trunc_normal_(self.embed.weight, a.init_std)
        self.blocks = nn.ModuleList(
            Block(a.d_model, a.n_heads, a.d_ff, hidden_std, out_std, a.eps)
            for _ in range(a.n_layers))
        self.ln_f = nn.LayerNorm(a.d_model, eps=a.eps)
        self.register_buffer("mask", alibi_causal_mask(a.n_heads, a.seq_len), persistent=False)

    def forward(self, tokens):
        x = self.embed(tokens) * self.embed_mult
        for blk in self.blocks:
            x = blk(x, self.mask)
        x = self.ln_f(x)
        return F.linear(x, self.embed.weight) * self.output_mult  # tied output projection


def param_groups(model: BTLM, a):
    """muP groups as btlm_jax.optim.groups: hidden matrices lr / w (FFN output lr / w_ff);
    embeddings, biases and norms at the base lr; no weight decay on biases and norms."""
    w = a.d_model / a.base_d_model
    w_ff = a.d_ff / a.base_d_ff
    groups = {"hidden": [], "ffn_out": [], "embed": [], "no_decay": []}
    for name, p in model.named_parameters():
        if name.startswith("embed"):
            groups["embed"].append(p)
        elif p.ndim < 2:
            groups["no_decay"].append(p)
        elif name.endswith("wo.weight"):
            groups["ffn_out"].append(p)
        else:
            groups["hidden"].append(p)
    return [
        {"params": groups["hidden"], "lr": a.lr / w, "weight_decay": a.weight_decay},
        {"params": groups["ffn_out"], "lr": a.lr / w_ff, "weight_decay": a.weight_decay},
        {"params": groups["embed"], "lr": a.lr, "weight_decay": a.weight_decay},
        {"params": groups["no_decay"], "lr": a.lr, "weight_decay": 0.0},
    ]


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for name, default in (("vocab_size", 16384), ("d_model", 1024), ("n_layers", 4),
                          ("n_heads", 8), ("d_ff", 2730), ("seq_len", 512), ("batch_size", 1),
                          ("steps", 5), ("warmup", 2), ("threads", 0)):
        p.add_argument(f"--{name}", type=int, default=default)
    for name, default in (("base_d_model", 256.0), ("base_d_ff", 682.6666666666666),
                          ("embed_mult", 14.6), ("output_mult", 2.22), ("init_std", 0.073),
                          ("eps", 1e-5), ("lr", 6e-3), ("weight_decay", 0.1), ("clip", 1.0)):
        p.add_argument(f"--{name}", type=float, default=default)
    p.add_argument("--compile", action="store_true", help="torch.compile the model (inductor)")
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    p.add_argument("--serve", action="store_true",
                   help="after warm-up, run one timed step per 'step' line on stdin (answering "
                        "'ready' / the step time), until 'quit' or EOF; for interleaved timing")
    a = p.parse_args()

    torch.manual_seed(0)
    torch.set_num_threads(a.threads or os.cpu_count() or 1)
    model = BTLM(a)
    step_model = torch.compile(model) if a.compile else model
    opt = torch.optim.AdamW(param_groups(model, a), betas=(0.9, 0.95), eps=1e-8)
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, a.vocab_size, (a.batch_size, a.seq_len + 1), generator=gen)
    inputs, targets = tokens[:, :-1], tokens[:, 1:]

    def step():
        logits = step_model(inputs)
        loss = F.cross_entropy(logits.reshape(-1, a.vocab_size).float(), targets.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if a.clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), a.clip)
        opt.step()
        return loss.item()

    t0 = time.perf_counter()
    first_loss = step()
    first_step_s = time.perf_counter() - t0
    for _ in range(max(0, a.warmup - 1)):
        step()
    times = []

    def timed_step():
        t0 = time.perf_counter()
        out = step()
        times.append(time.perf_counter() - t0)
        return out

    loss = first_loss
    if a.serve:
        print("ready", flush=True)
        for line in sys.stdin:
            if line.strip() != "step":
                break
            loss = timed_step()
            print(f"{times[-1]!r}", flush=True)
    else:
        for _ in range(a.steps):
            loss = timed_step()
    step_s = statistics.median(times)
    result = {
        "framework": f"torch {torch.__version__}" + (" compile" if a.compile else " eager"),
        "threads": torch.get_num_threads(),
        "num_params": sum(p.numel() for p in model.parameters()),
        "first_step_s": first_step_s,
        "step_time_s": step_s,
        "step_times_s": times,
        "tokens_per_sec": a.batch_size * a.seq_len / step_s,
        "first_loss": first_loss,
        "last_loss": loss,
    }
    print(f"torch peer: {result['num_params']:,} params, {result['threads']} threads, "
          f"step {step_s:.3f}s (median of {len(times)}), {result['tokens_per_sec']:.1f} tokens/s, "
          f"loss {first_loss:.3f} -> {loss:.3f}")
    if a.json:
        print(json.dumps(result))


if __name__ == "__main__":
    main()
