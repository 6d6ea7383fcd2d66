"""Ahead-of-time compilation of the train step for a mesh: per-device memory before launch.

``python -m btlm_jax.describe --config=configs/btlm.py:3b_8k --mesh=1,8,1 --fake_devices=8``
lowers and compiles the real train step (same shardings, same layout, same remat policy) for
abstract inputs, allocates nothing, and reads the compiled program's ``memory_analysis()``.
With ``--fake_devices=N`` the devices are N host (CPU) devices, so the figure is XLA:CPU's buffer
assignment for the per-device program; on GPU/TPU machines it is the accelerator's own.
"""

from __future__ import annotations

import os

import jax
import numpy as np


def use_fake_devices(n: int) -> None:
    """Must run before JAX initialises its backends: N CPU devices stand in for the mesh."""
    flag = f"--xla_force_host_platform_device_count={int(n)}"
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + flag).strip()
    jax.config.update("jax_platforms", "cpu")


def parse_mesh(text: str) -> tuple[int, int, int]:
    try:
        d, f, t = (int(x) for x in text.split(","))
    except ValueError:
        raise ValueError(f"--mesh={text!r}: expected DATA,FSDP,TENSOR, e.g. 1,8,1 (one may be -1)") \
            from None
    return d, f, t


def _bytes(tree, host: bool) -> int:
    total = 0
    for x in jax.tree_util.tree_leaves(tree):
        kind = getattr(getattr(x, "sharding", None), "memory_kind", None)
        if (kind is not None and "host" in kind) == host:
            shard = x.sharding.shard_shape(x.shape) if getattr(x, "sharding", None) else x.shape
            total += int(np.prod(shard)) * np.dtype(x.dtype).itemsize
    return total


def train_step_memory(cfg, mesh: tuple[int, int, int], *, seq_len: int | None = None,
                      batch_size: int | None = None, devices=None) -> dict:
    """Compiles the train step on ``mesh`` and returns per-device memory figures (bytes).

    ``seq_len`` picks the phase (default: the longest sequence); ``batch_size`` overrides its
    global batch. ``device_total`` = arguments + outputs - aliased (donated) + temporaries, minus
    what lives in host memory (weight streaming) where the backend does not report it apart.
    ``host_total`` is the host-memory figure: the backend's host fields where it reports them,
    else the host-resident state (a lower bound: XLA:CPU, where host and device memory are the
    same RAM, counts the streamed gradients and the optimizer loop's buffers as temporaries).
    """
    import ml_collections

    from btlm_jax.config import parse_phases
    from btlm_jax.train.program import Program

    cfg = ml_collections.ConfigDict(cfg.to_dict())
    cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor = mesh
    phases = parse_phases(cfg)
    if seq_len is None:
        seq_len, bs, _ = max(phases)
    else:
        match = [p for p in phases if p[0] == seq_len]
        bs = match[0][1] if match else phases[-1][1]
    bs = int(batch_size or bs)
    tr = Program.from_config(cfg, devices)
    return memory_figures(tr, tr.compile_train_step(seq_len, bs), seq_len, bs)


def memory_figures(tr, compiled, seq_len: int, bs: int) -> dict:
    """The figures of :func:`train_step_memory` for program ``tr``'s compiled train step."""
    cfg = tr.cfg
    ma = compiled.memory_analysis()
    fields = ("argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes",
              "temp_size_in_bytes", "generated_code_size_in_bytes",
              "host_argument_size_in_bytes", "host_output_size_in_bytes",
              "host_alias_size_in_bytes", "host_temp_size_in_bytes")
    raw = {f: int(getattr(ma, f, 0) or 0) for f in fields}
    total = (raw["argument_size_in_bytes"] + raw["output_size_in_bytes"]
             - raw["alias_size_in_bytes"] + raw["temp_size_in_bytes"])
    state_host = _bytes(tr.abstract_state, host=True)
    reported_apart = raw["host_argument_size_in_bytes"] > 0
    if state_host and not reported_apart:
        # this backend counts host-memory buffers with the device's: take the (donated, so
        # counted once) host-resident state out again
        total -= state_host
    host_total = (raw["host_argument_size_in_bytes"] + raw["host_output_size_in_bytes"]
                  - raw["host_alias_size_in_bytes"] + raw["host_temp_size_in_bytes"]
                  if reported_apart else state_host)
    return {
        "mesh": dict(tr.mesh.shape), "layout": cfg.mesh.layout, "seq_len": seq_len,
        "global_batch": bs,
        "per_device_batch": bs // int(np.prod([tr.mesh.shape[a] for a in tr.place.batch_axes])),
        "backend": jax.default_backend(), "num_devices": tr.mesh.size,
        "state_bytes_per_device_on_device": _bytes(tr.abstract_state, host=False),
        "state_bytes_per_device_in_host_memory": state_host,
        "device_total_bytes": total, "host_total_bytes": host_total,
        "host_reported_apart": reported_apart, **raw,
    }


def format_report(info: dict) -> str:
    gib = 1024 ** 3
    lines = [
        f"AOT train step: mesh {info['mesh']} ({info['num_devices']} {info['backend']} devices), "
        f"layout {info['layout']}, seq_len {info['seq_len']}, global batch {info['global_batch']} "
        f"({info['per_device_batch']} per batch shard)",
        f"  per device: state on device {info['state_bytes_per_device_on_device'] / gib:.3f} GiB"
        f", state in host memory {info['state_bytes_per_device_in_host_memory'] / gib:.3f} GiB",
        f"  compiled: arguments {info['argument_size_in_bytes'] / gib:.3f} GiB, outputs "
        f"{info['output_size_in_bytes'] / gib:.3f} GiB, aliased {info['alias_size_in_bytes'] / gib:.3f}"
        f" GiB, temporaries {info['temp_size_in_bytes'] / gib:.3f} GiB",
        f"  device memory per device (peak estimate): {info['device_total_bytes'] / gib:.3f} GiB",
    ]
    if info.get("host_total_bytes"):
        how = ("reported by the backend" if info.get("host_reported_apart") else
               "the host-resident state; this backend does not report host buffers apart")
        lines.append(f"  host memory per device: {info['host_total_bytes'] / gib:.3f} GiB ({how})")
    return "\n".join(lines)
