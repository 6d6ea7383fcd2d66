"""Everything about attention and step speed that needs a GPU, in one run (< 8 min on one H200).

    bash benchmarks/gpu_check.sh              # on a GPU machine; record the output in RESULTS.md
    bash benchmarks/gpu_check.sh --dry-run    # on CPU: every case compiled (and run) at tiny size
    bash benchmarks/gpu_check.sh --only=ab    # just the train-step A/B list

Cases, in order (each in its own time budget; a failing case prints its error and the rest go
on), then a table of each goal of issue 26 beside its published anchor, as a ratio:

1. ``agreement``: ``flash``, ``pallas`` and ``cudnn`` against ``xla`` on the device: outputs and
   q/k/v gradients, packed documents (3 segments; ``cudnn`` one unpacked row: it masks by
   index), 12 heads (not a power of two), T = 1000 (not a block multiple), a position
   interpolation divisor of 2. ``pallas`` in float32 at d_head 64, 80 and 128 (the tiling that
   asked the H200 for 263168 bytes of shared memory no longer exists) and bfloat16 at 80.
   Printed: max |difference| relative to max |xla value|, and the tiling used.
2. ``triton_lowering``: the pallas kernels lowered for CUDA (Triton IR); on CPU this checks every
   kernel op has a Triton lowering rule, for an abstract H200.
3. ``throughput``: ``benchmarks/attention.py`` at seq 2048 and 8192, 3B shape (32 heads x 80),
   bfloat16: xla, cudnn (causal cuDNN, ALiBi folded into the head dimension), flash, pallas
   (its own tiling) and pallas capped at 64 x 64: fwd+bwd ms, TFLOP/s, temporary memory.
4. ``step_1p3b``: ``benchmarks/train_step.py`` on ``slimpajama_dc_1p3b`` at seq 2048, batch 8,
   bfloat16, remat none, attention auto: padded (the default, ``model.pad_multiple=128``) and
   unpadded (``pad_multiple=1``): tokens/s, MFU, peak memory.
5. ``step_3b_8k``: ``3b_8k`` at seq 8192, batch 1, bfloat16, remat minimal, attention auto,
   chunked loss.
6. ``ab``: the step A/B list on the 1.3B case (:data:`AB_VARIANTS`: cuBLAS-only GEMMs, command
   buffers off, remat policies that keep the attention output, a larger batch with
   micro-batches), each a separate process (XLA flags are read at start-up).

``--dry-run`` shrinks every case (tiny shapes, one step, cudnn replaced by xla) so that it
compiles and runs on CPU in a few minutes; it checks the script, not the numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from btlm_jax.config import default_config  # noqa: E402
from btlm_jax.models import attention as A  # noqa: E402
from btlm_jax.models.alibi import effective_slopes  # noqa: E402

# Issue 26's goals, each beside its published anchor (what comparable open trainers reach on the
# same class of GPU) and the figure this project measured on one H200 on 2026-12-04 (jax 0.11.2).
# key: (what, unit, anchor, anchor source, goal, before)
GOALS = {
    "step_1p3b": ("slimpajama_dc_1p3b @2048, batch 8 (default: padded, auto attention)",
                  "tokens/s", 45.5e3, "MPT-1B @2048 on H100 (llm-foundry table)", 50e3, 25.7e3),
    "pad_gain": ("same, padded / unpadded (pad_multiple=1)", "x", 1.25,
                 "nanoGPT vocab 50257 -> 50304: ~25%", 1.6, 1.6),
    "step_3b_8k": ("3b_8k @8192, batch 1, remat minimal", "tokens/s", 16.6e3,
                   "MPT-3B @8192 on H100 (no activation checkpointing, microbatch 3)", 17e3,
                   8.3e3),
    "attn_8192": ("ALiBi attention fwd+bwd 32 x 80 bf16, T 8192, best impl", "TFLOP/s", 330.0,
                  "FlashAttention-2 on H100 (d 128)", 300.0, 120.0),
    "attn_2048": ("same at T 2048", "TFLOP/s", 300.0, "FlashAttention-2 on H100", 200.0, 75.0),
}
RESULTS: dict = {}

# The train-step A/B list (case ``ab``): label, extra config flags, extra environment.
AB_BASE = ["--config.train.batch_size=8", "--config.train.seq_len=2048",
           "--config.model.dtype=bfloat16", "--config.model.remat=none", "--steps=3",
           "--warmup=1"]
AB_VARIANTS = [
    ("base (padded, auto attention, remat none)", [], {}),
    ("cuBLAS only (no Triton GEMM)", [], {"XLA_FLAGS": "--xla_gpu_enable_triton_gemm=false"}),
    ("command buffers off", [], {"XLA_FLAGS": "--xla_gpu_enable_command_buffer="}),
    ("remat minimal_flash (dots + attention out + lse kept)",
     ["--config.model.remat=minimal_flash"], {}),
    ("remat save_qkv_attention_out", ["--config.model.remat=save_qkv_attention_out"], {}),
    ("batch 16 = 2 micro-batches of 8, remat none", ["--config.train.batch_size=16",
                                                     "--config.train.grad_accum_steps=2"], {}),
    ("batch 24, remat minimal_flash, cuBLAS only",
     ["--config.train.batch_size=24", "--config.model.remat=minimal_flash"],
     {"XLA_FLAGS": "--xla_gpu_enable_triton_gemm=false"}),
]


def _inputs(b, t, h, d, dtype, seed=0, packed=True):
    rs = np.random.RandomState(seed)
    q, k, v, g = (jnp.asarray(rs.randn(b, t, h, d), dtype) for _ in range(4))
    seg = np.ones((b, t), np.int32)
    pos = np.tile(np.arange(t, dtype=np.int32), (b, 1))
    if packed:
        cuts = [0, t // 3, (2 * t) // 3, t]
        for n, (lo, hi) in enumerate(zip(cuts[:-1], cuts[1:])):
            seg[-1, lo:hi], pos[-1, lo:hi] = n + 1, np.arange(hi - lo)
    return q, k, v, g, jnp.asarray(pos), jnp.asarray(seg)


def case_agreement(dry):
    b, t, h = (1, 40, 3) if dry else (2, 1000, 12)
    m = default_config().model
    m.n_heads = h
    slopes = effective_slopes(m, key_len=t, alibi_scale=2.0)  # key_len: the T training keys
    runs = [("pallas", jnp.float32, d) for d in (64, 80, 128)] + [
        ("pallas", jnp.bfloat16, 80), ("flash", jnp.float32, 80), ("flash", jnp.bfloat16, 80),
        ("cudnn", jnp.bfloat16, 80)]
    for impl, dtype, d in runs:
        if dry:
            d = {64: 16, 80: 24, 128: 32}[d]
            if impl == "cudnn":
                impl = "xla"
        packed = impl != "cudnn"
        q, k, v, g, pos, seg = _inputs(1 if not packed else b, t, h, d, dtype, packed=packed)

        def run(impl, q, k, v, pos=pos, seg=seg, d=d, dtype=dtype):
            ctx = A.prepare(impl, slopes, pos, seg, pos, seg, 0, dtype)
            blocks = (16, 16) if dry else (512, 512)
            return A.attend(impl, q, k, v, ctx, 1.0 / d, *blocks)

        def both(impl, q=q, k=k, v=v, g=g, run=run):
            f = jax.jit(lambda q, k, v: run(impl, q, k, v))
            gr = jax.jit(jax.grad(lambda q, k, v: jnp.sum(run(impl, q, k, v).astype(jnp.float32)
                                                           * g.astype(jnp.float32)), (0, 1, 2)))
            return [f(q, k, v)] + list(gr(q, k, v))

        name = f"{impl:<6} {jnp.dtype(dtype).name:<8} d {d:<3}"
        tiling = ""
        if impl == "pallas":
            pb = A.pallas_blocks(dtype, d, t, max_block_q=16 if dry else None,
                                 max_block_k=16 if dry else None)
            tiling = (f"  tiling fwd {pb.fwd.block_q}x{pb.fwd.block_k}/{pb.fwd.num_warps}w"
                      f"/{pb.fwd.num_stages}s, chunks {pb.head_chunks}")
        try:
            ref = [np.asarray(x, np.float32) for x in both("xla")]
            got = [np.asarray(x, np.float32) for x in both(impl)]
        except Exception as e:  # noqa: BLE001
            print(f"  {name} failed: {type(e).__name__}: {str(e)[:300]}")
            RESULTS.setdefault("agreement_failed", []).append(name)
            continue
        errs = [float(np.abs(a - r).max() / max(np.abs(r).max(), 1e-30))
                for a, r in zip(got, ref)]
        RESULTS.setdefault("agreement", {})[name.strip()] = max(errs)
        print(f"  {name} rel.err out {errs[0]:.2e}  dq {errs[1]:.2e}  dk {errs[2]:.2e}  "
              f"dv {errs[3]:.2e}{tiling}", flush=True)


def case_triton_lowering(dry):
    b, t, h = 1, 2048, 2
    sl = jnp.full((h,), 0.1, jnp.float32)
    pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    seg = jnp.ones((b, t), jnp.int32)

    def loss(q, k, v):
        out = A.pallas_attention(q, k, v, sl, pos, pos, seg, seg, scale=0.1, interpret=False)
        return jnp.sum(out.astype(jnp.float32))

    for dtype in (jnp.float32, jnp.bfloat16):
        for d in (64, 80, 128):
            x = jax.ShapeDtypeStruct((b, t, h, d), dtype)
            with A.abstract_gpu():  # (on a GPU the real device is the target either way)
                text = jax.jit(jax.grad(loss, (0, 1, 2))).trace(x, x, x).lower(
                    lowering_platforms=("cuda",)).as_text()
            print(f"  {jnp.dtype(dtype).name:<8} d {d:<3}: "
                  f"{text.count('__gpu$xla.gpu.triton')} Triton custom calls, head chunks "
                  f"{A.head_chunks(d)}")


def case_throughput(dry):
    from benchmarks import attention as bench

    if dry:
        args = ["--seqs=128", "--heads=2", "--d_head=16", "--repeats=1", "--block_q=32",
                "--block_k=32", "--impls=xla,flash,pallas,pallas:16x16", "--pallas_max_seq=128"]
    else:
        args = ["--seqs=2048,8192", "--heads=32", "--d_head=80", "--repeats=5",
                "--impls=xla,cudnn,flash,pallas,pallas:64x64", "--dtype=bfloat16"]
    rows = bench.main(args)
    for t in (2048, 8192):
        ok = [r for r in rows if r.get("seq") == t and "tflops" in r]
        if ok:
            best = max(ok, key=lambda r: r["tflops"])
            RESULTS[f"attn_{t}"] = (best["tflops"], best["impl"])


def _train_step(dry, config, extra, label, timeout, env=None):
    # MFU against the device's nominal peak (no matmul probe: it costs time on the clock)
    cmd = [sys.executable, str(ROOT / "benchmarks/train_step.py"), f"--config={config}", "--json",
           "--peak=false"]
    if dry:
        extra = [x for x in extra if "attention=" not in x or "cudnn" not in x]
        extra += ["--config.model.n_layers=1", "--config.model.d_model=64",
                  "--config.model.n_heads=2", "--config.model.d_ff=100",
                  "--config.model.vocab_size=500", "--config.train.seq_len=128",
                  "--config.train.batch_size=4", "--config.model.loss_chunk_size=64",
                  "--config.model.attention_block_q=32", "--config.model.attention_block_k=32",
                  "--steps=1", "--warmup=0"]
        extra = [x for x in extra if not x.startswith("--config.train.batch_size=")] + [
            "--config.train.batch_size=4"]
        env = {}  # GPU flags mean nothing on CPU
    t0 = time.perf_counter()
    e = dict(os.environ)
    for k, v in (env or {}).items():
        e[k] = (e.get(k, "") + " " + v).strip()
    try:
        p = subprocess.run(cmd + extra, capture_output=True, text=True, timeout=timeout,
                           cwd=str(ROOT), env=e)
    except subprocess.TimeoutExpired:
        print(f"  {label}: timed out after {timeout} s")
        return None
    last = (p.stdout.strip().splitlines() or [""])[-1]
    try:
        r = json.loads(last)
    except (json.JSONDecodeError, TypeError):
        print(f"  {label}: failed (rc {p.returncode}): {(p.stderr or p.stdout)[-600:]}")
        return None
    keep = {k: r.get(k) for k in (
        "tokens_per_sec", "step_time_s", "compile_time_s", "model_tflops", "mfu_nominal_peak",
        "peak_memory_bytes", "num_params")}
    keep["attention"] = r.get("model", {}).get("attention")
    print(f"  {label}: {json.dumps(keep)} ({time.perf_counter() - t0:.0f} s)", flush=True)
    return r


STEP_1P3B = ["--config.train.batch_size=8", "--config.train.seq_len=2048",
             "--config.model.dtype=bfloat16", "--config.model.remat=none", "--steps=3",
             "--warmup=1"]


def case_step_1p3b(dry):
    cfg = "configs/btlm.py:slimpajama_dc_1p3b"
    padded = _train_step(dry, cfg, STEP_1P3B, "1.3B seq 2048, padded (default)", 150)
    plain = _train_step(dry, cfg, STEP_1P3B + ["--config.model.pad_multiple=1"],
                        "1.3B seq 2048, unpadded (pad_multiple=1)", 150)
    if padded:
        RESULTS["step_1p3b"] = padded["tokens_per_sec"]
    if padded and plain:
        RESULTS["pad_gain"] = padded["tokens_per_sec"] / plain["tokens_per_sec"]


def case_step_3b_8k(dry):
    args = ["--config.train.batch_size=1", "--config.train.seq_len=8192",
            "--config.model.remat=minimal", "--config.model.loss_chunk_size=1024",
            "--steps=2", "--warmup=1"]
    r = _train_step(dry, "configs/btlm.py:3b_8k", args, "3b_8k seq 8192, remat minimal", 200)
    if r:
        RESULTS["step_3b_8k"] = r["tokens_per_sec"]


def case_ab(dry):
    variants = AB_VARIANTS[:2] if dry else AB_VARIANTS
    base = None
    for label, extra, env in variants:
        r = _train_step(dry, "configs/btlm.py:slimpajama_dc_1p3b", AB_BASE + extra,
                        f"A/B {label}", 120, env)
        if r and base is None:
            base = r["tokens_per_sec"]
        if r and base:
            print(f"    -> {r['tokens_per_sec'] / base:.3f}x the base")


CASES = [("agreement", case_agreement), ("triton_lowering", case_triton_lowering),
         ("throughput", case_throughput), ("step_1p3b", case_step_1p3b),
         ("step_3b_8k", case_step_3b_8k), ("ab", case_ab)]
DEFAULT = ("agreement", "triton_lowering", "throughput", "step_1p3b", "step_3b_8k")


def goals_table() -> list[str]:
    """Each goal's figure beside its anchor: measured / anchor, and whether the goal is met."""
    lines = ["| goal | now | before (2026-12-04) | anchor | now / anchor | goal | met |",
             "|---|---:|---:|---|---:|---:|:---:|"]
    for key, (what, unit, anchor, source, goal, before) in GOALS.items():
        got = RESULTS.get(key)
        impl = ""
        if isinstance(got, tuple):
            got, impl = got
            impl = f" ({impl})"
        fmt = (lambda x: f"{x:.2f}x") if unit == "x" else (
            (lambda x: f"{x / 1e3:.1f}k") if unit == "tokens/s" else (lambda x: f"{x:.0f}"))
        if got is None:
            lines.append(f"| {what} [{unit}] | not measured | {fmt(before)} | {fmt(anchor)} "
                         f"{source} | | {fmt(goal)} | |")
            continue
        lines.append(f"| {what} [{unit}] | {fmt(got)}{impl} | {fmt(before)} | {fmt(anchor)} "
                     f"{source} | {got / anchor:.2f} | {fmt(goal)} | "
                     f"{'yes' if got >= goal else 'no'} |")
    f32 = [k for k in RESULTS.get("agreement", {}) if k.startswith("pallas") and "float32" in k]
    bad = [k for k in RESULTS.get("agreement_failed", []) if "pallas" in k]
    lines.append(f"| pallas float32 compiles and agrees | {len(f32)} of 3 head dims ran"
                 f"{', failed: ' + ', '.join(bad) if bad else ''} | fails to compile "
                 "(263168 bytes of shared memory) | | | compiles and agrees | |")
    return lines


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dry-run", action="store_true", help="tiny shapes on CPU (checks the script)")
    p.add_argument("--only", default="", help="comma-separated case names (default: all but ab; "
                   "'all' adds ab)")
    a = p.parse_args(argv)
    dev = jax.devices()[0]
    print(f"# gpu_check {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}: jax "
          f"{jax.__version__}, {jax.default_backend()} {dev.device_kind} x{jax.device_count()}"
          f"{' (dry run)' if a.dry_run else ''}")
    if not a.dry_run and jax.default_backend() != "gpu":
        sys.exit("gpu_check: no GPU backend; run with --dry-run on CPU")
    only = set(filter(None, a.only.split(","))) or set(DEFAULT)
    if "all" in only:
        only = {name for name, _ in CASES}
    unknown = only - {name for name, _ in CASES}
    if unknown:
        sys.exit(f"gpu_check: unknown case(s) {', '.join(sorted(unknown))}; cases: "
                 + ", ".join(name for name, _ in CASES))
    failed = []
    for name, fn in CASES:
        if name not in only:
            continue
        t0 = time.perf_counter()
        print(f"## {name}", flush=True)
        try:
            fn(a.dry_run)
        except Exception:  # noqa: BLE001 - report and continue with the next case
            failed.append(name)
            print("  failed:\n" + traceback.format_exc(limit=3))
        print(f"  ({time.perf_counter() - t0:.0f} s)", flush=True)
    if only & {"agreement", "throughput", "step_1p3b", "step_3b_8k"}:
        print("## goals (issue 26)")
        print("\n".join(goals_table()), flush=True)
    if failed:
        print("failed cases: " + ", ".join(failed))
    return 1 if failed else 0


if __name__ == "__main__":
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    sys.exit(main())
