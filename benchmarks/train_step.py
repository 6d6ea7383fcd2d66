"""Train-step throughput: compile time, step time, tokens/s, TFLOP/s, MFU, memory; vs PyTorch.

Benchmarks the project's own jitted, donated ``btlm_jax.train.step.train_step`` (with
``btlm_jax.optim.build``: clipping + AdamW with muP groups) on synthetic batches, for a config
and mesh given exactly as to ``btlm_jax.main``:

    python benchmarks/train_step.py                                   # configs/btlm.py:bench
    python benchmarks/train_step.py --json --vs-torch                 # + the PyTorch peer
    python benchmarks/train_step.py --config=configs/btlm.py:slimpajama_dc_1p3b \
        --config.train.batch_size=8 --config.model.remat=minimal      # on a GPU

Reported: compile time; steady-state step time (median of ``--steps`` after ``--warmup``, each
ended with ``block_until_ready``); tokens/s; achieved model TFLOP/s
(:func:`btlm_jax.train.flops.train_flops_per_token`); MFU against a matmul peak measured in this run in
the training dtype (:class:`btlm_jax.train.perf.MatmulProbe`, one probe after every timed step: median
step against median probe) and against the device's nominal peak where known; peak device memory
(``memory_stats`` where the backend has it, else the compiled program's memory analysis).
``--json`` prints one JSON object as the last line. ``--vs-torch`` starts
``benchmarks/torch_peer.py --serve`` with the same shapes and interleaves its timed steps with
ours (JAX step, torch step, probe, repeat), so both see the same load on a shared machine; it
prints both tokens/s and the ratio.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # for configs/

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file(
    "config", os.path.join(ROOT, "configs/btlm.py") + ":bench",
    "Config file and preset, e.g. configs/btlm.py:bench; override keys with --config.KEY=VALUE.",
    lock_config=True)
_STEPS = flags.DEFINE_integer("steps", 5, "Timed steps (the median is reported).")
_WARMUP = flags.DEFINE_integer("warmup", 2, "Untimed steps after compilation.")
_DONATE = flags.DEFINE_bool("donate", True, "Donate the train state to the step (as the loop does).")
_PEAK = flags.DEFINE_bool("peak", True, "Measure the matmul peak (MFU vs measured peak).")
_PEAK_N = flags.DEFINE_integer("peak_n", 0, "Matmul size for the peak (0: perf's default).")
_JSON = flags.DEFINE_bool("json", False, "Print one JSON object as the last line.")
_VS_TORCH = flags.DEFINE_bool("vs_torch", False, "Also run benchmarks/torch_peer.py, same shapes.")
_TORCH_ARGS = flags.DEFINE_string("torch_args", "", "Extra arguments for torch_peer.py.")
flags.DEFINE_alias("vs-torch", "vs_torch")


def _synthetic_batch(cfg, batch_size, seq_len, sharding):
    import jax
    import numpy as np

    rng = np.random.default_rng(0)
    tokens = rng.integers(0, cfg.model.vocab_size, (batch_size, seq_len + 1), dtype=np.int32)
    host = {
        "inputs": tokens[:, :-1],
        "targets": tokens[:, 1:],
        "loss_mask": np.ones((batch_size, seq_len), np.float32),
        "segment_ids": np.ones((batch_size, seq_len), np.int32),
        "positions": np.broadcast_to(np.arange(seq_len, dtype=np.int32), (batch_size, seq_len)),
    }
    return {k: jax.device_put(np.ascontiguousarray(v), sharding) for k, v in host.items()}


def _memory(device, compiled) -> dict:
    out = {}
    stats = None
    try:
        stats = device.memory_stats()
    except Exception:  # noqa: BLE001 - not every backend implements it
        stats = None
    if stats and stats.get("peak_bytes_in_use"):
        out["peak_memory_bytes"] = int(stats["peak_bytes_in_use"])
        out["peak_memory_source"] = "memory_stats"
    try:
        ma = compiled.memory_analysis()
    except Exception:  # noqa: BLE001
        ma = None
    if ma is not None:
        prog = (ma.argument_size_in_bytes + ma.output_size_in_bytes + ma.temp_size_in_bytes
                - ma.alias_size_in_bytes)
        out["compiled_memory"] = {
            "argument_bytes": int(ma.argument_size_in_bytes),
            "output_bytes": int(ma.output_size_in_bytes),
            "temp_bytes": int(ma.temp_size_in_bytes),
            "alias_bytes": int(ma.alias_size_in_bytes),
            "total_bytes": int(prog),
        }
        if "peak_memory_bytes" not in out:
            out["peak_memory_bytes"] = int(prog)
            out["peak_memory_source"] = "compiled.memory_analysis"
    return out


def run_jax(cfg, steps: int, warmup: int, donate: bool, measure_peak: bool, peak_n: int,
            peer=None) -> dict:
    import flax.linen as nn
    import jax

    from btlm_jax.train import perf
    from btlm_jax.train.flops import train_flops_per_token
    from btlm_jax.train.program import Program

    # the training program itself: same placement, same step, same shardings as a real run
    program = Program.from_config(cfg)
    cfg, mesh = program.cfg, program.mesh
    batch_size, seq_len = int(cfg.train.batch_size), int(cfg.train.seq_len)
    num_params = program.num_params
    state = program.init_state()
    batch = _synthetic_batch(cfg, batch_size, seq_len, program.batch_sharding)
    with program.tracing():
        jitted = jax.jit(program.train_step_fn(),
                         in_shardings=(program.state_shardings, program.batch_sharding),
                         out_shardings=(program.state_shardings, None),
                         donate_argnums=(0,) if donate else ())
        t0 = time.perf_counter()
        lowered = jitted.lower(state, batch)
        t1 = time.perf_counter()
        compiled = lowered.compile()
        t2 = time.perf_counter()

    device = jax.devices()[0]
    probe = perf.MatmulProbe(cfg.model.dtype, n=peak_n or None) if measure_peak else None
    losses, times, peaks = [], [], []
    for _ in range(warmup):
        state, metrics = compiled(state, batch)
        losses.append(float(metrics["loss"]))

    if peer is not None:
        peer.wait_ready()
    # Round robin: JAX step, peer step (if any), matmul probe. Step, peer and peak are then
    # sampled over the same period, which matters on a shared machine whose load drifts.
    for _ in range(steps):
        t = time.perf_counter()
        state, metrics = compiled(state, batch)
        jax.block_until_ready((state, metrics))
        times.append(time.perf_counter() - t)
        losses.append(float(metrics["loss"]))
        if peer is not None:
            peer.step()
        if probe is not None:
            peaks.append(probe.once())

    step_s = statistics.median(times)
    tokens = batch_size * seq_len
    tokens_per_sec = tokens / step_s
    measured_peak = statistics.median(peaks) if peaks else None
    mfu = perf.mfu_metrics(tokens_per_sec, cfg.model, seq_len, measured_peak=measured_peak,
                           num_devices=mesh.devices.size)
    # Alternative readings of the same samples: per-step ratios (each step against the probe
    # right after it), and best step against best probe (the least disturbed of each).
    paired = [perf.mfu_metrics(tokens / t, cfg.model, seq_len, measured_peak=p,
                               num_devices=mesh.devices.size)["mfu_measured"]
              for t, p in zip(times, peaks)]
    best = perf.mfu_metrics(tokens / min(times), cfg.model, seq_len,
                            measured_peak=max(peaks) if peaks else None,
                            num_devices=mesh.devices.size).get("mfu_measured")
    result = {
        "framework": f"jax {jax.__version__}",
        "backend": jax.default_backend(),
        "device_kind": device.device_kind,
        "num_devices": int(mesh.devices.size),
        "mesh": dict(zip(mesh.axis_names, (int(s) for s in mesh.devices.shape))),
        "num_params": num_params,
        "batch_size": batch_size,
        "seq_len": seq_len,
        "tokens_per_step": tokens,
        "flops_per_token": train_flops_per_token(cfg.model, seq_len),
        "model": {k: cfg.model[k] for k in ("d_model", "n_layers", "n_heads", "d_ff", "vocab_size",
                                            "dtype", "remat", "scan_layers", "attention",
                                            "loss_chunk_size")},
        "grad_accum_steps": int(cfg.train.grad_accum_steps),
        "donate": donate,
        "lower_time_s": t1 - t0,
        "compile_time_s": t2 - t1,
        "step_time_s": step_s,
        "step_times_s": times,
        "tokens_per_sec": tokens_per_sec,
        "model_tflops": mfu["model_tflops"],
        "measured_peak_tflops": measured_peak,
        "measured_peaks_tflops": peaks,
        "nominal_peak_tflops": perf.nominal_peak_tflops(device),
        "mfu_measured_peak": mfu.get("mfu_measured"),
        "mfu_measured_peak_paired": statistics.median(paired) if paired else None,
        "mfu_measured_peak_best": best,
        "mfu_nominal_peak": mfu.get("mfu_nominal"),
        "first_loss": losses[0] if losses else None,
        "last_loss": losses[-1] if losses else None,
    }
    result.update(_memory(device, compiled))
    return result


class TorchPeer:
    """``benchmarks/torch_peer.py --serve`` in a subprocess with the config's shapes: it builds and
    warms up while JAX compiles, then runs one timed step each time :meth:`step` is called."""

    def __init__(self, cfg, warmup: int, extra: str):
        m = cfg.model
        if m.activation != "swiglu" or m.position != "alibi" or not m.tie_embeddings \
                or not m.mup.enabled or not m.use_bias:
            raise SystemExit("--vs-torch: the peer implements the BTLM architecture only "
                             "(swiglu, alibi, tied embeddings, muP, biases)")
        args = [sys.executable, os.path.join(ROOT, "benchmarks", "torch_peer.py"), "--json",
                "--serve", f"--warmup={warmup}",
                f"--vocab_size={m.vocab_size}", f"--d_model={m.d_model}",
                f"--n_layers={m.n_layers}", f"--n_heads={m.n_heads}", f"--d_ff={m.d_ff}",
                f"--seq_len={cfg.train.seq_len}", f"--batch_size={cfg.train.batch_size}",
                f"--base_d_model={m.mup.base_d_model}", f"--base_d_ff={m.mup.base_d_ff}",
                f"--embed_mult={m.mup.embed_mult}", f"--output_mult={m.mup.output_mult}",
                f"--init_std={m.init_std}", f"--eps={m.layer_norm_eps}",
                f"--lr={cfg.optim.peak_lr}", f"--weight_decay={cfg.optim.weight_decay}",
                f"--clip={cfg.optim.grad_clip}"] + extra.split()
        self.proc = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, bufsize=1)

    def _read(self) -> str:
        line = self.proc.stdout.readline()
        if not line:
            err = self.proc.stderr.read()
            self.proc.wait()
            raise SystemExit(f"torch_peer.py failed (exit {self.proc.returncode}); is torch "
                             f"installed? pip install torch==2.13.0 (CPU build)\n{err[-3000:]}")
        return line.strip()

    def wait_ready(self):
        while self._read() != "ready":
            pass

    def step(self) -> float:
        self.proc.stdin.write("step\n")
        self.proc.stdin.flush()
        return float(self._read())

    def finish(self) -> dict:
        self.proc.stdin.write("quit\n")
        self.proc.stdin.flush()
        out, err = self.proc.communicate()
        if self.proc.returncode:
            raise SystemExit(f"torch_peer.py failed (exit {self.proc.returncode}):\n{err[-3000:]}")
        return json.loads(out.strip().splitlines()[-1])


def _fmt_bytes(n):
    return "n/a" if n is None else f"{n / 2**30:.2f} GiB"


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    cfg = _CONFIG.value
    peer = TorchPeer(cfg, _WARMUP.value, _TORCH_ARGS.value) if _VS_TORCH.value else None
    r = run_jax(cfg, _STEPS.value, _WARMUP.value, _DONATE.value, _PEAK.value, _PEAK_N.value, peer)
    pct = lambda x: "n/a" if x is None else f"{100 * x:.1f}%"  # noqa: E731
    rows = [
        ("backend / devices", f"{r['backend']} {r['device_kind']} x{r['num_devices']} "
                              f"mesh {r['mesh']}"),
        ("model", f"{r['num_params']:,} params, {r['model']}"),
        ("batch", f"{r['batch_size']} x {r['seq_len']} = {r['tokens_per_step']} tokens/step, "
                  f"grad_accum {r['grad_accum_steps']}, donate {r['donate']}"),
        ("compile time", f"{r['compile_time_s']:.1f} s (+ lowering {r['lower_time_s']:.1f} s)"),
        ("step time (median)", f"{r['step_time_s']:.3f} s of {len(r['step_times_s'])} "
                               f"[{', '.join(f'{t:.3f}' for t in r['step_times_s'])}]"),
        ("tokens/s", f"{r['tokens_per_sec']:.1f}"),
        ("model TFLOP/s", f"{r['model_tflops']:.4f} ({r['flops_per_token'] / 1e6:.1f} "
                          "MFLOP/token)"),
        ("measured matmul peak", "n/a" if r["measured_peak_tflops"] is None else
         f"{r['measured_peak_tflops']:.4f} TFLOP/s ({r['model']['dtype']}; median of "
         f"{', '.join(f'{p:.4f}' for p in r['measured_peaks_tflops'])})"),
        ("MFU vs measured peak", f"{pct(r['mfu_measured_peak'])} (median step / median probe; "
                                 f"per-step ratios {pct(r['mfu_measured_peak_paired'])}, "
                                 f"best/best {pct(r['mfu_measured_peak_best'])})"),
        ("MFU vs nominal peak", pct(r["mfu_nominal_peak"]) + (
            "" if r["nominal_peak_tflops"] is None else f" of {r['nominal_peak_tflops']} TFLOP/s")),
        ("peak memory", f"{_fmt_bytes(r.get('peak_memory_bytes'))} "
                        f"({r.get('peak_memory_source', 'unavailable')})"),
        ("loss", f"{r['first_loss']:.4f} -> {r['last_loss']:.4f}"),
    ]
    if _VS_TORCH.value:
        t = peer.finish()
        r["torch"] = t
        r["torch_tokens_per_sec"] = t["tokens_per_sec"]
        r["ratio_vs_torch"] = r["tokens_per_sec"] / t["tokens_per_sec"]
        rows += [
            ("torch peer", f"{t['framework']}, {t['threads']} threads, {t['num_params']:,} params, "
                           f"step {t['step_time_s']:.3f} s, loss {t['first_loss']:.4f} -> "
                           f"{t['last_loss']:.4f}"),
            ("tokens/s jax | torch", f"{r['tokens_per_sec']:.1f} | {t['tokens_per_sec']:.1f}"),
            ("ratio jax / torch", f"{r['ratio_vs_torch']:.2f}x"),
        ]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    if _JSON.value:
        print(json.dumps(r))


if __name__ == "__main__":
    app.run(main)
