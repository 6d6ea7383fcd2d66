"""Attention implementations side by side: forward+backward time and compiled memory per length.

    python benchmarks/attention.py                         # CPU default: xla, flash (+ pallas to 1024)
    python benchmarks/attention.py --seqs=2048,8192 --impls=xla,flash,pallas,cudnn --dtype=bfloat16
    python benchmarks/attention.py --impls=pallas,pallas:64x64,pallas:128x64 ...  # tilings

For each implementation of ``model.attention`` and each sequence length, one jitted function
computes ``grad(sum(attention(q, k, v) * g))`` with respect to q, k, v, through the same
``btlm_jax.models.attention.prepare`` / ``attend`` the model uses (causal, one segment, ALiBi
slopes from ``effective_slopes``). Reported: the median wall time of ``--repeats`` calls of the
ahead-of-time compiled function, the achieved TFLOP/s counting the causal half of the dense work (forward 2 matmuls,
backward 5, each ``2 B H T^2 D / 2`` FLOPs), and the compiled program's temporary memory
(``memory_analysis().temp_size_in_bytes``), i.e. what attention needs beyond its inputs and
outputs. ``pallas`` runs in interpret mode off GPUs (correct but very slow), so on CPU it is only
run up to ``--pallas_max_seq``; ``cudnn`` only on GPUs. ``--json`` prints one JSON list last.
``pallas:QxK`` caps the Pallas tiling (:func:`btlm_jax.models.attention.pallas_blocks`) at Q
queries x K keys per block (what ``model.attention_block_q/k`` do), to compare tilings.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from btlm_jax.config import default_config  # noqa: E402
from btlm_jax.models import attention as A  # noqa: E402
from btlm_jax.models.alibi import effective_slopes  # noqa: E402


def build(impl, b, t, h, d, dtype, block_q, block_k):
    """(jitted fwd+bwd function, its arguments)."""
    if ":" in impl:  # pallas:QxK
        impl, caps = impl.split(":")
        block_q, block_k = (int(x) for x in caps.split("x"))
    m = default_config().model
    m.n_heads = h
    slopes = effective_slopes(m, key_len=t)  # key_len: the T keys of a training forward
    pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    seg = jnp.ones((b, t), jnp.int32)
    scale = 1.0 / d  # muP attention scale

    def loss(q, k, v, g):
        ctx = A.prepare(impl, slopes, pos, seg, pos, seg, 0, dtype)
        out = A.attend(impl, q, k, v, ctx, scale, block_q, block_k)
        return jnp.sum(out.astype(jnp.float32) * g)

    keys = jax.random.split(jax.random.PRNGKey(t), 4)
    q, k, v = (jax.random.normal(kk, (b, t, h, d), dtype) for kk in keys[:3])
    g = jax.random.normal(keys[3], (b, t, h, d), jnp.float32)
    return jax.jit(jax.grad(loss, argnums=(0, 1, 2))), (q, k, v, g)


def measure(impl, b, t, h, d, dtype, block_q, block_k, repeats):
    fn, args = build(impl, b, t, h, d, dtype, block_q, block_k)
    t0 = time.perf_counter()
    compiled = fn.lower(*args).compile()
    compile_s = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    temp = getattr(mem, "temp_size_in_bytes", float("nan")) if mem is not None else float("nan")
    times = []  # an AOT-compiled executable's first call includes no compilation: no warm-up
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - t0)
    sec = statistics.median(times)
    flops = 7 * 2 * b * h * t * t * d / 2  # fwd 2 + bwd 5 matmuls, causal half
    return {"impl": impl, "seq": t, "batch": b, "heads": h, "d_head": d, "dtype": str(dtype.__name__
            if hasattr(dtype, "__name__") else dtype), "fwd_bwd_ms": 1e3 * sec,
            "tflops": flops / sec / 1e12, "temp_mib": temp / 2**20, "compile_s": compile_s,
            "backend": jax.default_backend()}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seqs", default="512,1024,2048,4096,8192")
    p.add_argument("--impls", default="xla,flash,pallas")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--d_head", type=int, default=64)
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--block_q", type=int, default=512)
    p.add_argument("--block_k", type=int, default=512)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--pallas_max_seq", type=int, default=1024,
                   help="off GPU (interpret mode) run pallas only up to this length")
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    dtype = jnp.dtype(a.dtype).type
    gpu = jax.default_backend() == "gpu"
    rows = []
    print(f"backend {jax.default_backend()} ({jax.devices()[0].device_kind}), batch {a.batch}, "
          f"heads {a.heads}, d_head {a.d_head}, {a.dtype}, blocks {a.block_q}x{a.block_k}, "
          f"median of {a.repeats}")
    print(f"| {'seq':>5} | {'impl':<6} | {'fwd+bwd ms':>10} | {'TFLOP/s':>7} | {'temp MiB':>9} "
          f"| {'compile s':>9} |")
    print("|------:|:-------|-----------:|--------:|----------:|----------:|")
    for t in (int(s) for s in a.seqs.split(",")):
        for impl in a.impls.split(","):
            if impl == "cudnn" and not gpu:
                continue
            if impl.startswith("pallas") and not gpu and t > a.pallas_max_seq:
                continue
            try:
                r = measure(impl, a.batch, t, a.heads, a.d_head, dtype, a.block_q, a.block_k,
                            a.repeats)
            except Exception as e:  # noqa: BLE001 - a benchmark row records the failure
                print(f"| {t:>5} | {impl:<6} | failed: {type(e).__name__}: {str(e)[:80]}")
                rows.append({"impl": impl, "seq": t, "error": f"{type(e).__name__}: {e}"[:300]})
                continue
            rows.append(r)
            print(f"| {t:>5} | {impl:<6} | {r['fwd_bwd_ms']:>10.1f} | {r['tflops']:>7.3f} | "
                  f"{r['temp_mib']:>9.1f} | {r['compile_s']:>9.1f} |", flush=True)
    if a.json:
        print(json.dumps(rows))
    return rows


if __name__ == "__main__":
    main()
