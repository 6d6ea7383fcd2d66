"""Config builders shared by the end-to-end tests (small models on the embedded corpus)."""

from __future__ import annotations


def set_keys(c, over: dict):
    """Sets dotted keys (``{"train.steps": 5}``) on a ConfigDict; returns it."""
    for k, v in over.items():
        node = c
        *parents, leaf = k.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = v
    return c


def preset(name: str = "tiny", **over):
    """``configs/btlm.py:NAME`` with dotted overrides given as keyword arguments."""
    from configs.btlm import get_config

    return set_keys(get_config(name), over)


def small(cache_dir, *, d_model=64, n_layers=2, n_heads=2, d_ff=128, seq_len=64, batch_size=4,
          **over):
    """A small BTLM (muP base = its own width, so the multipliers are 1) on the embedded corpus
    cached in ``cache_dir``: synchronous checkpoints, no progress bar or TensorBoard."""
    c = preset("tiny")
    m = c.model
    m.vocab_size, m.d_model, m.n_layers, m.n_heads, m.d_ff = 512, d_model, n_layers, n_heads, d_ff
    m.mup.base_d_model, m.mup.base_d_ff = d_model, float(d_ff)
    c.data.cache_dir = str(cache_dir)
    c.train.seq_len, c.train.batch_size = seq_len, batch_size
    c.optim.peak_lr, c.optim.warmup_steps = 1e-2, 5
    c.eval.num_batches, c.eval.batch_size = 2, batch_size
    c.checkpoint.async_save = False
    c.logging.progress_bar = c.logging.tensorboard = False
    return set_keys(c, over)


def metrics(workdir) -> list[dict]:
    """The records of ``RUN/metrics.jsonl``, in file order."""
    import json
    from pathlib import Path

    return [json.loads(ln) for ln in (Path(workdir) / "metrics.jsonl").read_text().splitlines()]


def checkpoint_steps(workdir) -> list[int]:
    """The steps in ``RUN/checkpoints``, sorted ([] when there is none)."""
    from pathlib import Path

    d = Path(workdir) / "checkpoints"
    return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit()) if d.exists() else []


def xla_flags(devices: int) -> str:
    """``XLA_FLAGS`` for a subprocess on ``devices`` fake CPU devices, keeping this process's
    other XLA flags (conftest.py sets the suite's)."""
    import os
    import re

    rest = re.sub(r"--xla_force_host_platform_device_count=\S+", "",
                  os.environ.get("XLA_FLAGS", "")).strip()
    return f"--xla_force_host_platform_device_count={devices} {rest}".strip()


def spawn_script(script, *args, devices: int = 8, timeout: int = 600):
    """Runs ``python SCRIPT ARGS`` (a test module doubling as its worker) on ``devices`` fake CPU
    devices; asserts it succeeded and returns the completed process."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=str(root),
               XLA_FLAGS=xla_flags(devices), JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, str(script), *map(str, args)], cwd=root, env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return proc
