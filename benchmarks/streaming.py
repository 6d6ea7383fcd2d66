"""Weight streaming vs the standard layout: memory, step time and the host-link limit.

For each depth (``--depths``, layers), global batch (``--batches``) and variant (``--variants``:
``standard``, or weight streaming as ``OVERLAP/UPDATE``, i.e. ``mesh.stream_overlap`` /
``mesh.stream_update``, e.g. ``prefetch_writeback/device``), the
real train step (:meth:`btlm_jax.train.program.Program.compile_train_step`) is compiled ahead of
time on a data-parallel mesh; a row gives the compiled program's per-device device memory and
host-resident state (:func:`btlm_jax.train.aot.memory_figures`), the median step time of
``--steps`` steps on synthetic tokens, and the loss of the first step (the same batch and
initialisation for every variant, so the layouts' losses can be compared).

The limit, for each streamed row:

- ``h2d GB`` / ``d2h GB``: bytes one device moves from / to host memory per step, computed from
  the state's shapes (:func:`btlm_jax.parallel.streaming.transfer_bytes`: every layer in for the
  forward and again for the backward, gradients out, the device optimizer update's state in and
  out; its docstring has the exact count);
- ``link GB/s``: the link measured in the same run by a probe that copies a ``--probe_mib`` buffer
  from pinned host memory to the devices and back (median of 5, per device; on CPU devices, with
  no separate host memory, it is a host-memory copy and is labelled so);
- ``got GB/s``: h2d bytes / step time;
- ``bound s``: max(standard step of that depth and batch, h2d / link h2d, d2h / link d2h): the
  step cannot be faster than the standard one nor than its transfers (the two directions of
  the link run at once);
- ``/std`` and ``/bound``: the streamed step over the standard one and over the bound.

Then, per streamed variant and depth, the **break-even batch**: the smallest batch of the sweep at
which streamed / standard <= 1.1; and a line fit ``a + b * layers`` of each variant's device
memory at the first batch (the deepest model that fits ``--budget_mib`` per device). With
``--hlo`` each streamed row also prints how the compiled program's layer loops issue their
host-device copies (asynchronous copy-start / copy-done pairs around the matmuls on GPU).

    python benchmarks/streaming.py                       # tiny width, seq 512, 8 fake CPU devices
    python benchmarks/streaming.py --preset=bench --depths=4,16 --steps=0     # memory only
    bash benchmarks/streaming_gpu.sh                                         # the H200 figures

On fake CPU devices host and device memory are the same RAM and XLA:CPU reports no host buffers
apart, so the "device" figure of the streamed step also holds the buffers that live in host
memory on an accelerator (the gradient stack); the step times are those of shared CPU cores,
for the trend only, and the link is a memory copy.
"""

from __future__ import annotations

import argparse
import re
import statistics
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

GB = 1e9
MIB = 2 ** 20


def probe_link(mib: float, reps: int = 5) -> dict:
    """Per-device GB/s of pinned-host -> device and device -> pinned-host copies of a buffer of
    ``mib`` MiB per device (sharded over all devices, so every device's link is busy at once)."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P

    devices = jax.devices()
    mesh = jax.sharding.Mesh(np.array(devices), ("d",))
    kinds = {m.kind for m in devices[0].addressable_memories()}
    host_kind = "pinned_host" if "pinned_host" in kinds else None
    per_dev = int(mib * MIB) // 4
    shape = (len(devices), per_dev)
    dev_sh = NamedSharding(mesh, P("d"), memory_kind=devices[0].default_memory().kind)
    x = jax.device_put(jnp.ones(shape, jnp.float32), dev_sh)
    if host_kind is None:
        return {"h2d": float("nan"), "d2h": float("nan"), "what": "no host memory space"}
    host_sh = NamedSharding(mesh, P("d"), memory_kind=host_kind)
    h = jax.device_put(x, host_sh)
    jax.block_until_ready(h)

    def timed(src, sh):
        jax.block_until_ready(jax.device_put(src, sh))  # warm-up
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            jax.block_until_ready(jax.device_put(src, sh))
            times.append(time.perf_counter() - t0)
        return per_dev * 4 / statistics.median(times) / GB

    what = ("pinned_host <-> device copy" if jax.default_backend() != "cpu" else
            "host-memory copy (CPU devices have no separate host memory)")
    return {"h2d": timed(h, dev_sh), "d2h": timed(x, host_sh), "what": what}


def hlo_loops(text: str) -> list[str]:
    """One line per while loop with matmuls: its host-device copies as the schedule issues them
    (``copy-start`` before the first matmul = issued under the compute; ``copy-done`` after the
    last = waited for only at the end of the iteration)."""
    comps, cur = {}, None
    for line in text.splitlines():
        m = re.match(r"^(?:ENTRY )?%(\S+) \(.*\{\s*$", line)
        if m:
            cur = comps.setdefault(m.group(1), [])
        elif line.startswith("}"):
            cur = None
        elif cur is not None and " = " in line:
            cur.append(line)
    called = {c: set(re.findall(r"(?:calls|to_apply)=%([\w.\-]+)", "\n".join(b)))
              for c, b in comps.items()}
    memo: dict = {}

    def has_matmul(c):
        if c not in memo:
            memo[c] = False
            body = "\n".join(comps.get(c, []))
            memo[c] = bool(re.search(r" (dot|convolution)\(|gemm|cublas", body)) or any(
                has_matmul(x) for x in called.get(c, ()))
        return memo[c]

    out = []
    bodies = [b for c in comps.values() for ln in c
              for b in re.findall(r"body=%([\w.\-]+)", ln) if " while(" in ln]
    for b in bodies:
        lines = comps.get(b, [])
        mm = [i for i, ln in enumerate(lines) if re.search(r" (dot|convolution)\(|gemm|cublas", ln)
              or any(has_matmul(x) for x in re.findall(r"calls=%([\w.\-]+)", ln))]
        if not mm:
            continue
        starts = [i for i, ln in enumerate(lines) if re.search(r" copy-start(\.\d+)?\(|"
                                                                r"= \S+ copy-start\(", ln)]
        dones = [i for i, ln in enumerate(lines) if re.search(r"copy-done\(", ln)]
        hosty = sum(1 for ln in lines if "S(5)" in ln)
        out.append(f"{b[:40]:<40} matmuls {len(mm):>3}  copy-start {len(starts):>3} "
                   f"({sum(i < mm[0] for i in starts)} before the first matmul)  "
                   f"copy-done {len(dones):>3} ({sum(i > mm[-1] for i in dones)} after the last)"
                   f"  host-memory operands {hosty}")
    return out


def _batch(np, jnp, jax, vocab, bs, seq, sharding):
    rng = np.random.default_rng(0)
    toks = rng.integers(0, vocab, (bs, seq + 1))
    batch = {"inputs": toks[:, :-1], "targets": toks[:, 1:],
             "loss_mask": np.ones((bs, seq), np.float32),
             "segment_ids": np.ones((bs, seq), np.int32),
             "positions": np.broadcast_to(np.arange(seq, dtype=np.int32), (bs, seq))}
    return {k: jax.device_put(np.asarray(v, jnp.float32 if k == "loss_mask" else np.int32),
                              sharding) for k, v in batch.items()}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--seq_len", type=int, default=512)
    ap.add_argument("--batches", default="8", help="global batches (a sweep: 8,16,32,64)")
    ap.add_argument("--batch_size", type=int, default=None, help="one global batch (old name)")
    ap.add_argument("--depths", default="4,8,16,32")
    ap.add_argument("--variants", default="standard,prefetch/device",
                    help="standard and/or OVERLAP/UPDATE (mesh.stream_overlap/stream_update), "
                         "comma-separated; the standard rows are the reference")
    ap.add_argument("--fake_devices", type=int, default=8, help="0: the machine's devices")
    ap.add_argument("--steps", type=int, default=2, help="timed steps (0: memory only)")
    ap.add_argument("--budget_mib", type=float, default=64.0)
    ap.add_argument("--probe_mib", type=float, default=256.0)
    ap.add_argument("--hlo", action="store_true", help="print each streamed program's loops")
    ap.add_argument("--set", action="append", default=[],
                    help="extra config override KEY=VALUE (e.g. model.dtype=bfloat16), "
                         "parsed as training's --config.KEY=VALUE")
    args = ap.parse_args()

    from btlm_jax.train import aot

    if args.fake_devices:
        aot.use_fake_devices(args.fake_devices)
    import jax
    import jax.numpy as jnp
    import numpy as np

    from btlm_jax import optim
    from btlm_jax.cli.overrides import load_config
    from btlm_jax.parallel.streaming import transfer_bytes
    from btlm_jax.train.program import Program

    n = len(jax.devices())
    batches = ([args.batch_size] if args.batch_size else
               [int(b) for b in args.batches.split(",")])
    depths = [int(x) for x in args.depths.split(",")]
    variants = []
    for v in args.variants.split(","):
        if v == "standard":
            variants.insert(0, ("standard", "standard", None, None))
        else:
            ov, up = v.split("/")
            variants.append((f"ws/{ov}/{up}", "weight_streaming", ov, up))
    link = probe_link(args.probe_mib) if args.steps else None
    print(f"preset {args.preset}, seq {args.seq_len}, {n} {jax.default_backend()} devices "
          f"(data parallel), jax {jax.__version__}")
    if link:
        print(f"link probe ({link['what']}, {args.probe_mib:g} MiB per device): "
              f"h2d {link['h2d']:.1f} GB/s, d2h {link['d2h']:.1f} GB/s per device")
    head = (f"{'variant':<30}{'layers':>7}{'batch':>6}{'dev MiB':>9}{'host MiB':>9}{'loss':>9}"
            f"{'step s':>8}{'h2d GB':>8}{'d2h GB':>8}{'got GB/s':>9}{'bound s':>8}"
            f"{'/std':>6}{'/bound':>7}{'compile s':>10}")
    print(head)
    std_step, rows, mem = {}, [], {}
    for layers in depths:
        for bs in batches:
            for name, layout, ov, up in variants:
                c = load_config(args.preset, [f"--config.{kv}" for kv in args.set])
                c.model.n_layers, c.mesh.layout = layers, layout
                if ov is not None:
                    c.mesh.stream_overlap, c.mesh.stream_update = ov, up
                c.mesh.data, c.mesh.fsdp, c.mesh.tensor = n, 1, 1
                c.train.seq_len, c.train.batch_size = args.seq_len, bs
                try:
                    tr = Program.from_config(c)
                    t0 = time.perf_counter()
                    compiled = tr.compile_train_step(args.seq_len, bs)
                    t_compile = time.perf_counter() - t0
                    info = aot.memory_figures(tr, compiled, args.seq_len, bs)
                    step_s = loss = float("nan")
                    if args.steps:
                        state = tr.init_state()
                        batch = _batch(np, jnp, jax, c.model.vocab_size, bs, args.seq_len,
                                       tr.batch_sharding)
                        state, m = compiled(state, batch)  # warm-up; its loss is step 1's
                        loss = float(m["loss"])
                        times = []
                        for _ in range(args.steps):
                            t0 = time.perf_counter()
                            state, m = compiled(state, batch)
                            jax.block_until_ready(m)
                            times.append(time.perf_counter() - t0)
                        step_s = statistics.median(times)
                        del state
                except Exception as e:  # noqa: BLE001 - one failing variant must not end the table
                    print(f"{name:<30}{layers:>7}{bs:>6}  failed: {type(e).__name__}: "
                          f"{str(e).splitlines()[0][:200]}", flush=True)
                    traceback.print_exc(limit=3)
                    continue
                dev, host = info["device_total_bytes"] / MIB, info["host_total_bytes"] / MIB
                mem.setdefault(name, {}).setdefault(layers, dev)
                cols = ["", "", "", "", "", ""]
                if layout == "standard":
                    std_step[(layers, bs)] = step_s
                else:
                    tx, _ = optim.build(c, c.train.steps)
                    tb = transfer_bytes(c, tx, tr.abstract_state, n)
                    h2d, d2h = tb["h2d"] / GB, tb["d2h"] / GB
                    std = std_step.get((layers, bs), float("nan"))
                    bound = float("nan")
                    if link:
                        bound = max(std if std == std else 0.0, h2d / link["h2d"],
                                    d2h / link["d2h"])
                    cols = [f"{h2d:.2f}", f"{d2h:.2f}", f"{h2d / step_s:.1f}", f"{bound:.3f}",
                            f"{step_s / std:.2f}", f"{step_s / bound:.2f}"]
                    rows.append((name, layers, bs, step_s / std))
                print(f"{name:<30}{layers:>7}{bs:>6}{dev:>9.1f}{host:>9.1f}{loss:>9.4f}"
                      f"{step_s:>8.3f}{cols[0]:>8}{cols[1]:>8}{cols[2]:>9}{cols[3]:>8}"
                      f"{cols[4]:>6}{cols[5]:>7}{t_compile:>10.1f}", flush=True)
                if args.hlo and layout != "standard":
                    for line in hlo_loops(compiled.as_text()):
                        print("    " + line)
    if args.steps and rows:
        print("\nbreak-even batch (smallest global batch with streamed / standard <= 1.1):")
        for name in [v[0] for v in variants if v[1] != "standard"]:
            for layers in depths:
                got = [(bs, r) for nm, ly, bs, r in rows if nm == name and ly == layers]
                hit = [bs for bs, r in got if r <= 1.1]
                seen = ", ".join(f"{bs}: {r:.2f}x" for bs, r in got)
                verdict = f"batch {min(hit)}" if hit else (
                    f"not reached up to batch {max(bs for bs, _ in got)}" if got else "no rows")
                print(f"  {name:<30} {layers:>3} layers: {verdict}  ({seen})")
    fits = {}
    for name, pts in mem.items():
        if len(pts) >= 2:
            b, a = np.polyfit(list(pts), list(pts.values()), 1)
            fits[name] = (a, b)
    if fits:
        print(f"\nlargest depth fitting {args.budget_mib:g} MiB of device memory per device "
              f"(line a + b * layers fitted to the rows above at batch {batches[0]}):")
        for name, (a, b) in fits.items():
            deepest = int((args.budget_mib - a) // b) if b > 0 else float("inf")
            print(f"  {name:<30} a = {a:.1f} MiB, b = {b:.2f} MiB/layer -> "
                  f"{max(deepest, 0)} layers")


if __name__ == "__main__":
    main()
