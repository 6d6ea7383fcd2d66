"""Weight streaming vs the standard layout: per-device memory and step time against depth.

For each layout and each depth (``--depths``, layers), the real train step
(:meth:`btlm_jax.train.program.Program.compile_train_step`) is compiled ahead of time on a
data-parallel mesh of ``--devices`` devices; the table gives the compiled program's per-device
device memory and host-resident state (:func:`btlm_jax.train.aot.memory_figures`) and the median
step time of ``--steps`` steps of that compiled program on synthetic tokens. A straight line
``a + b * layers`` fitted to each layout's memory gives the deepest model of this width that fits
a per-device budget (``--budget_mib``).

    python benchmarks/streaming.py                       # tiny width, seq 512, 8 fake CPU devices
    python benchmarks/streaming.py --preset=bench --depths=4,16 --steps=0     # memory only
    python benchmarks/streaming.py --fake_devices=0 --budget_mib=81920         # real devices

On fake CPU devices host and device memory are the same RAM and XLA:CPU reports no host buffers
apart, so the "device" figure of the streamed step also holds the buffers that live in host
memory on an accelerator (the gradient stack, the optimizer loop's working copies); the step
times are those of 2 shared CPU cores, for the trend only.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--seq_len", type=int, default=512)
    ap.add_argument("--batch_size", type=int, default=8, help="global batch")
    ap.add_argument("--depths", default="4,8,16,32")
    ap.add_argument("--layouts", default="standard,weight_streaming")
    ap.add_argument("--fake_devices", type=int, default=8, help="0: the machine's devices")
    ap.add_argument("--steps", type=int, default=2, help="timed steps (0: memory only)")
    ap.add_argument("--budget_mib", type=float, default=64.0)
    args = ap.parse_args()

    from btlm_jax.train import aot

    if args.fake_devices:
        aot.use_fake_devices(args.fake_devices)
    import jax
    import jax.numpy as jnp
    import numpy as np

    from btlm_jax.train.program import Program
    from configs.btlm import get_config

    n = len(jax.devices())
    mib = 2 ** 20
    rows, fits = [], {}
    print(f"preset {args.preset}, seq {args.seq_len}, global batch {args.batch_size}, {n} "
          f"{jax.default_backend()} devices (data parallel)")
    print(f"{'layout':<17}{'layers':>7}{'params':>12}{'device MiB':>12}{'host MiB':>10}"
          f"{'state MiB/dev':>15}{'step s':>9}{'compile s':>11}")
    for layout in args.layouts.split(","):
        pts = []
        for layers in (int(x) for x in args.depths.split(",")):
            c = get_config(args.preset)
            c.model.n_layers, c.mesh.layout = layers, layout
            c.mesh.data, c.mesh.fsdp, c.mesh.tensor = n, 1, 1
            c.train.seq_len, c.train.batch_size = args.seq_len, args.batch_size
            tr = Program.from_config(c)
            t0 = time.perf_counter()
            compiled = tr.compile_train_step(args.seq_len, args.batch_size)
            t_compile = time.perf_counter() - t0
            info = aot.memory_figures(tr, compiled, args.seq_len, args.batch_size)
            step_s = float("nan")
            if args.steps:
                state = tr.init_state()
                rng = np.random.default_rng(0)
                toks = rng.integers(0, c.model.vocab_size, (args.batch_size, args.seq_len + 1))
                batch = {"inputs": toks[:, :-1], "targets": toks[:, 1:],
                         "loss_mask": np.ones((args.batch_size, args.seq_len), np.float32),
                         "segment_ids": np.ones((args.batch_size, args.seq_len), np.int32),
                         "positions": np.broadcast_to(np.arange(args.seq_len, dtype=np.int32),
                                                      (args.batch_size, args.seq_len))}
                batch = {k: jax.device_put(np.asarray(v, jnp.float32 if k == "loss_mask"
                                                      else np.int32), tr.batch_sharding)
                         for k, v in batch.items()}
                state, m = compiled(state, batch)  # warm-up
                jax.block_until_ready(m)
                times = []
                for _ in range(args.steps):
                    t0 = time.perf_counter()
                    state, m = compiled(state, batch)
                    jax.block_until_ready(m)
                    times.append(time.perf_counter() - t0)
                step_s = statistics.median(times)
                del state
            dev, host = info["device_total_bytes"] / mib, info["host_total_bytes"] / mib
            std_state = (info["state_bytes_per_device_on_device"]
                         + info["state_bytes_per_device_in_host_memory"]) / mib
            pts.append((layers, dev))
            rows.append((layout, layers, tr.num_params, dev, host))
            print(f"{layout:<17}{layers:>7}{tr.num_params:>12,}{dev:>12.1f}{host:>10.1f}"
                  f"{std_state:>15.1f}{step_s:>9.3f}{t_compile:>11.1f}", flush=True)
        if len(pts) >= 2:
            b, a = np.polyfit([p[0] for p in pts], [p[1] for p in pts], 1)
            fits[layout] = (a, b)
    print(f"\nlargest depth fitting {args.budget_mib:g} MiB of device memory per device "
          "(line a + b * layers fitted to the rows above):")
    for layout, (a, b) in fits.items():
        deepest = int((args.budget_mib - a) // b) if b > 0 else float("inf")
        print(f"  {layout:<17} a = {a:.1f} MiB, b = {b:.2f} MiB/layer -> "
              f"{max(deepest, 0)} layers")


if __name__ == "__main__":
    main()
