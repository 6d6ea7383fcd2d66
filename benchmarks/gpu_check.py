"""Everything about attention and step speed that needs a GPU, in one run (< 8 min on one H200).

    bash benchmarks/gpu_check.sh              # on a GPU machine; record the output in RESULTS.md
    bash benchmarks/gpu_check.sh --dry-run    # on CPU: every case compiled (and run) at tiny size

Cases, in order (each in its own time budget; a failing case prints its error and the rest go on):

1. ``agreement``: ``flash``, ``pallas`` and ``cudnn`` against ``xla`` on the device: outputs and
   q/k/v gradients, float32 and bfloat16, packed documents (3 segments), 12 heads (not a power of
   two), d_head 80 (BTLM's; pallas pads it to 128), T = 1000 (not a block multiple), a position
   interpolation divisor of 2. Printed: max |difference| relative to max |xla value|.
2. ``triton_lowering``: the pallas kernels lowered for CUDA (Triton IR); on CPU this checks every
   kernel op has a Triton lowering rule without a GPU.
3. ``throughput``: ``benchmarks/attention.py`` at seq 2048 and 8192, 3B shape (32 heads x 80),
   bfloat16, every implementation: fwd+bwd ms, TFLOP/s, temporary memory.
4. ``step_1p3b``: ``benchmarks/train_step.py`` on ``slimpajama_dc_1p3b`` at seq 2048, batch 8,
   bfloat16, remat minimal, chunked loss, with ``pallas`` and with ``cudnn``: tokens/s and MFU.
5. ``step_3b_8k``: ``3b_8k`` at seq 8192, batch 1, bfloat16, remat full, chunked loss, ``pallas``:
   whether it fits, tokens/s, MFU, peak memory.

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


def _inputs(b, t, h, d, dtype, seed=0):
    rs = np.random.RandomState(seed)
    q, k, v, g = (jnp.asarray(rs.randn(b, t, h, d), dtype) for _ in range(4))
    seg = np.ones((b, t), np.int32)
    pos = np.tile(np.arange(t, dtype=np.int32), (b, 1))
    cuts = [0, t // 3, (2 * t) // 3, t]
    for n, (lo, hi) in enumerate(zip(cuts[:-1], cuts[1:])):
        seg[-1, lo:hi], pos[-1, lo:hi] = n + 1, np.arange(hi - lo)
    return q, k, v, g, jnp.asarray(pos), jnp.asarray(seg)


def case_agreement(dry):
    b, t, h, d = (1, 40, 3, 16) if dry else (2, 1000, 12, 80)
    m = default_config().model
    m.n_heads = h
    slopes = effective_slopes(m, key_len=t, alibi_scale=2.0)  # key_len: the T training keys
    impls = ["flash", "pallas"] + ([] if dry else ["cudnn"])
    for dtype in (jnp.float32, jnp.bfloat16):
        q, k, v, g, pos, seg = _inputs(b, t, h, d, dtype)

        def run(impl, q, k, v):
            ctx = A.prepare(impl, slopes, pos, seg, pos, seg, 0, dtype)
            blocks = (16, 16) if dry else (128, 128)
            return A.attend(impl, q, k, v, ctx, 1.0 / d, *blocks)

        def both(impl):
            f = jax.jit(lambda q, k, v: run(impl, q, k, v))
            gr = jax.jit(jax.grad(lambda q, k, v: jnp.sum(run(impl, q, k, v).astype(jnp.float32)
                                                           * g.astype(jnp.float32)), (0, 1, 2)))
            return [f(q, k, v)] + list(gr(q, k, v))

        ref = [np.asarray(x, np.float32) for x in both("xla")]
        for impl in impls:
            try:
                got = [np.asarray(x, np.float32) for x in both(impl)]
            except Exception as e:  # noqa: BLE001
                print(f"  {impl:<6} {jnp.dtype(dtype).name:<8} failed: {type(e).__name__}: "
                      f"{str(e)[:200]}")
                continue
            errs = [float(np.abs(a - r).max() / max(np.abs(r).max(), 1e-30))
                    for a, r in zip(got, ref)]
            print(f"  {impl:<6} {jnp.dtype(dtype).name:<8} rel.err out {errs[0]:.2e}  dq "
                  f"{errs[1]:.2e}  dk {errs[2]:.2e}  dv {errs[3]:.2e}")


def case_triton_lowering(dry):
    b, t, h, d = 1, 256, 2, 80
    sl = jnp.full((h,), 0.1, jnp.float32)
    pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    seg = jnp.ones((b, t), jnp.int32)

    def loss(q, k, v):
        out = A.pallas_attention(q, k, v, sl, pos, pos, seg, seg, scale=0.1, block_q=64,
                                 block_k=64, interpret=False)
        return jnp.sum(out.astype(jnp.float32))

    x = jax.ShapeDtypeStruct((b, t, h, d), jnp.bfloat16)
    lowered = jax.jit(jax.grad(loss, (0, 1, 2))).trace(x, x, x).lower(lowering_platforms=("cuda",))
    text = lowered.as_text()
    print(f"  lowered fwd + bwd for cuda: {text.count('__gpu$xla.gpu.triton')} Triton custom calls"
          f" ({len(text)} chars of StableHLO)")


def case_throughput(dry):
    from benchmarks import attention as bench

    if dry:
        args = ["--seqs=128", "--heads=2", "--d_head=16", "--repeats=1", "--block_q=32",
                "--block_k=32", "--impls=xla,flash,pallas", "--pallas_max_seq=128"]
    else:
        args = ["--seqs=2048,8192", "--heads=32", "--d_head=80", "--repeats=5", "--block_q=512",
                "--block_k=512", "--impls=xla,cudnn,flash,pallas", "--dtype=bfloat16"]
    bench.main(args)


def _train_step(dry, config, extra, label, timeout):
    # MFU against the device's nominal peak (no matmul probe: it costs time on the clock)
    cmd = [sys.executable, str(ROOT / "benchmarks/train_step.py"), f"--config={config}", "--json",
           "--peak=false"]
    if dry:
        extra = [x for x in extra if "attention=" not in x or "cudnn" not in x]
        extra += ["--config.model.n_layers=1", "--config.model.d_model=64",
                  "--config.model.n_heads=2", "--config.model.d_ff=128",
                  "--config.model.vocab_size=512", "--config.train.seq_len=128",
                  "--config.train.batch_size=2", "--config.model.loss_chunk_size=64",
                  "--config.model.attention_block_q=32", "--config.model.attention_block_k=32",
                  "--steps=1", "--warmup=0"]
    t0 = time.perf_counter()
    p = subprocess.run(cmd + extra, capture_output=True, text=True, timeout=timeout,
                       cwd=str(ROOT))
    last = (p.stdout.strip().splitlines() or [""])[-1]
    try:
        r = json.loads(last)
        keep = {k: r.get(k) for k in (
            "device_kind", "tokens_per_sec", "step_time_s", "compile_time_s", "model_tflops",
            "mfu_nominal_peak", "peak_memory_bytes", "peak_memory_source")}
        print(f"  {label}: {json.dumps(keep)} ({time.perf_counter() - t0:.0f} s)")
    except (json.JSONDecodeError, TypeError):
        print(f"  {label}: failed (rc {p.returncode}): {(p.stderr or p.stdout)[-600:]}")


def case_step_1p3b(dry):
    base = ["--config.train.batch_size=8", "--config.train.seq_len=2048",
            "--config.model.dtype=bfloat16", "--config.model.remat=minimal",
            "--config.model.loss_chunk_size=1024", "--steps=3", "--warmup=1"]
    for impl in ("pallas", "cudnn"):
        if dry and impl == "cudnn":
            impl = "xla"
        _train_step(dry, "configs/btlm.py:slimpajama_dc_1p3b",
                    base + [f"--config.model.attention={impl}"], f"1.3B seq 2048 {impl}", 150)


def case_step_3b_8k(dry):
    args = ["--config.train.batch_size=1", "--config.train.seq_len=8192",
            "--config.model.attention=pallas", "--config.model.loss_chunk_size=1024",
            "--steps=2", "--warmup=1"]
    _train_step(dry, "configs/btlm.py:3b_8k", args, "3b_8k seq 8192 pallas", 200)


CASES = [("agreement", case_agreement), ("triton_lowering", case_triton_lowering),
         ("throughput", case_throughput), ("step_1p3b", case_step_1p3b),
         ("step_3b_8k", case_step_3b_8k)]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dry-run", action="store_true", help="tiny shapes on CPU (checks the script)")
    p.add_argument("--only", default="", help="comma-separated case names")
    a = p.parse_args(argv)
    dev = jax.devices()[0]
    print(f"# gpu_check {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}: jax "
          f"{jax.__version__}, {jax.default_backend()} {dev.device_kind} x{jax.device_count()}"
          f"{' (dry run)' if a.dry_run else ''}")
    if not a.dry_run and jax.default_backend() != "gpu":
        sys.exit("gpu_check: no GPU backend; run with --dry-run on CPU")
    only = set(filter(None, a.only.split(",")))
    failed = []
    for name, fn in CASES:
        if only and name not in only:
            continue
        t0 = time.perf_counter()
        print(f"## {name}", flush=True)
        try:
            fn(a.dry_run)
        except Exception:  # noqa: BLE001 - report and continue with the next case
            failed.append(name)
            print("  failed:\n" + traceback.format_exc(limit=3))
        print(f"  ({time.perf_counter() - t0:.0f} s)", flush=True)
    if failed:
        print("failed cases: " + ", ".join(failed))
    return 1 if failed else 0


if __name__ == "__main__":
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    sys.exit(main())
