"""Throughput accounting: device peaks, a measured matmul peak, and MFU.

MFU (model FLOPs utilisation) = achieved model FLOP/s / peak FLOP/s, where the model FLOPs per
token are :func:`btlm_jax.train.flops.train_flops_per_token` (6 x matmul parameters plus causal
attention at half; rematerialisation is *not* counted, so recomputation lowers MFU; neither is
the padding of ``model.pad_multiple``: the logical model's FLOPs).

Two peaks are offered:

- the device's nominal dense peak in bf16 (:data:`NOMINAL_PEAK_TFLOPS`), known for the usual
  accelerators and ``None`` for CPUs and unknown devices;
- a peak measured on the device at hand by :func:`measure_matmul_peak` (a large jitted matrix
  product in the training dtype), which is what "the machine's limit" means on a CPU.

Usage in a train loop (``tokens_per_sec`` over the logging window)::

    peak = perf.measure_matmul_peak(cfg.model.dtype)          # once, at start-up (optional)
    rec.update(perf.mfu_metrics(tokens_per_sec, cfg.model, seq_len, measured_peak=peak))
"""

from __future__ import annotations

import statistics
import time

import jax
import jax.numpy as jnp

from btlm_jax.train.flops import train_flops_per_token

# Dense (no sparsity) bf16 peak per device in TFLOP/s, from the vendors' data sheets.
# Matched against ``device.device_kind`` (lower-cased) by substring, first match wins, so the more
# specific names come first.
NOMINAL_PEAK_TFLOPS: tuple[tuple[str, float], ...] = (
    ("h200", 989.0),
    ("h100", 989.0),  # SXM; the PCIe card is lower (756) but reports a similar device_kind
    ("gh200", 989.0),
    ("a100", 312.0),
    ("tpu v6", 918.0),  # v6e (Trillium); device_kind "TPU v6 lite"
    ("tpu v5p", 459.0),
    ("tpu v5 lite", 197.0),  # v5e
    ("tpu v5e", 197.0),
    ("tpu v4", 275.0),
)


def nominal_peak_tflops(device=None) -> float | None:
    """Nominal bf16 dense peak of ``device`` (default: the first device) in TFLOP/s, or None."""
    device = jax.devices()[0] if device is None else device
    if device.platform == "cpu":
        return None
    kind = str(getattr(device, "device_kind", "")).lower()
    for key, peak in NOMINAL_PEAK_TFLOPS:
        if key in kind:
            return peak
    return None


def _as_dtype(dtype):
    if isinstance(dtype, str):
        return {"float32": jnp.float32, "bfloat16": jnp.bfloat16,
                "float16": jnp.float16}[dtype]
    return dtype


class MatmulProbe:
    """A compiled chain of ``[n, n] @ [n, n]`` products in ``dtype`` on ``device``; ``once()``
    times one call (with ``block_until_ready``) and returns its TFLOP/s (``2 n^3`` per product).

    Each product depends on the previous one, so XLA can neither drop nor merge them; 16 products
    per call (about a second on two CPU cores at n = 1024) keep dispatch overhead and thread
    wake-up out of the figure (4 per call measured ~10% lower on CPU).
    """

    def __init__(self, dtype="float32", n: int | None = None, device=None, chain: int | None = None):
        device = jax.devices()[0] if device is None else device
        cpu = device.platform == "cpu"
        self.n = int(n or (1024 if cpu else 8192))
        self.chain = int(chain or 16)
        dt = _as_dtype(dtype)
        ka, kb = jax.random.split(jax.random.PRNGKey(0))
        scale = self.n ** -0.5  # keeps the chained products O(1)
        self.a = jax.device_put((jax.random.normal(ka, (self.n, self.n)) * scale).astype(dt), device)
        self.b = jax.device_put((jax.random.normal(kb, (self.n, self.n)) * scale).astype(dt), device)
        chain_len = self.chain

        def run(a, b):
            x = a
            for _ in range(chain_len):
                x = jnp.dot(x, b, preferred_element_type=dt)
            return x

        self._run = jax.jit(run)
        self._run(self.a, self.b).block_until_ready()  # compile and warm up

    @property
    def flops(self) -> float:
        return 2.0 * self.n ** 3 * self.chain

    def once(self) -> float:
        t0 = time.perf_counter()
        self._run(self.a, self.b).block_until_ready()
        return self.flops / (time.perf_counter() - t0) / 1e12


def measure_matmul_peak(dtype="float32", n: int | None = None, repeats: int = 5,
                        device=None) -> float:
    """Measured matmul throughput in TFLOP/s: the median over ``repeats`` timed calls of a jitted
    chain of ``[n, n] @ [n, n]`` products in ``dtype`` on ``device`` (see :class:`MatmulProbe`),
    after a warm-up call.

    ``n`` defaults to 1024 on CPU (on the BLAS plateau already: 2048 measures the same rate at
    8x the time) and 8192 on accelerators.
    """
    probe = MatmulProbe(dtype, n=n, device=device)
    return statistics.median(probe.once() for _ in range(max(1, repeats)))


def mfu_metrics(tokens_per_sec: float, model_cfg, seq_len: int, measured_peak: float | None = None,
                num_devices: int | None = None, nominal_peak="device") -> dict:
    """Model TFLOP/s and MFU for a training throughput of ``tokens_per_sec`` (global).

    Returns ``model_tflops`` (achieved model TFLOP/s over all devices), ``mfu_nominal`` when the
    device's nominal peak is known, and ``mfu_measured`` when ``measured_peak`` (TFLOP/s of one
    device, from :func:`measure_matmul_peak`) is given. Peaks are per device and multiplied by
    ``num_devices`` (default: all devices). ``nominal_peak`` (TFLOP/s per device, or None for
    unknown) overrides the lookup of the first device in :data:`NOMINAL_PEAK_TFLOPS`.
    """
    if num_devices is None:
        num_devices = jax.device_count()
    if isinstance(nominal_peak, str):
        nominal_peak = nominal_peak_tflops()
    model_tflops = float(tokens_per_sec) * train_flops_per_token(model_cfg, seq_len) / 1e12
    out = {"model_tflops": model_tflops}
    if nominal_peak:
        out["mfu_nominal"] = model_tflops / (nominal_peak * num_devices)
    if measured_peak:
        out["mfu_measured"] = model_tflops / (measured_peak * num_devices)
    return out
