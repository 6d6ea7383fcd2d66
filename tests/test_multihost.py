"""Multi-host: 2 processes x 4 CPU devices (jax.distributed on localhost, started by
launch/multiprocess_cpu.sh) give the same losses as 1 process x 8 devices; killing one of two
processes ends the other within a bounded time.

Each process reads its own shard of the documents, so the reference (one process, 8 devices)
is fed the concatenation of the two processes' local batches: process 0's rows first, as
``make_array_from_process_local_data`` lays them out.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from test_parallel import assert_close, make_config, read_losses, tiny_overrides  # noqa: E402


def _worker_reference(cache_dir, workdir, nproc="2"):
    """1 process x 8 devices, fed what ``nproc`` processes would each read, concatenated."""
    import numpy as np

    from btlm_jax.train import loop

    nproc = int(nproc)

    class Concat:
        def __init__(self, its):
            self.its = its

        def __next__(self):
            parts = [next(i) for i in self.its]
            return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

        def get_state(self):
            return [i.get_state() for i in self.its]

        def set_state(self, s):
            for i, st in zip(self.its, s):
                i.set_state(st)

    class AsIfMultiProcess(loop.Trainer):
        def make_iterator(self, phase):
            seq_len, batch_size, _ = self.phases[phase]
            return Concat([self.pipeline.make_train_iterator(
                self.cfg, self.tokenizer, seq_len=seq_len, batch_size=batch_size, phase=phase,
                process_index=p, process_count=nproc) for p in range(nproc)])

    AsIfMultiProcess(make_config(tiny_overrides(cache_dir)), workdir).run()


if __name__ == "__main__":
    mode, *rest = sys.argv[1:]
    {"reference": _worker_reference}[mode](*rest)


import pytest  # noqa: E402


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    d = tmp_path_factory.getbasetemp() / "btlm_parallel_cache"
    d.mkdir(exist_ok=True)
    return d


def _env(**extra):
    env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHON=sys.executable, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    env.update({k: str(v) for k, v in extra.items()})
    return env


def _cli_flags(over):
    return ["--config=configs/btlm.py:tiny"] + [f"--config.{k}={v}" for k, v in over.items()]


def test_two_processes_equal_one_process(cache_dir, tmp_path):
    ref_dir, mp_dir = tmp_path / "ref", tmp_path / "mp"
    # the reference first: it also builds the corpus and tokenizer cache the processes share
    env = _env(XLA_FLAGS="--xla_force_host_platform_device_count=8")
    out = subprocess.run([sys.executable, __file__, "reference", cache_dir, ref_dir], cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    cmd = ["bash", "launch/multiprocess_cpu.sh", "2", "4", f"--workdir={mp_dir}",
           *_cli_flags(tiny_overrides(cache_dir))]
    out = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    assert "[p0] [btlm_jax] model:" in out.stdout and "'data': 8" in out.stdout, out.stdout[-2000:]
    ref, got = read_losses(ref_dir), read_losses(mp_dir)
    assert got["steps"] == [1, 2, 3, 4], got
    assert_close(ref, got, "2 processes x 4 devices vs 1 process x 8 devices")


def test_killing_one_process_ends_the_other(cache_dir, tmp_path):
    """SIGKILL process 1 mid-run: process 0 must exit (with an error) within 120 s."""
    wd = tmp_path / "kill"
    over = tiny_overrides(cache_dir, **{"train.steps": 100000, "eval.every_steps": 100000,
                                        "checkpoint.every_steps": 100000})
    with socket.socket() as s:  # a port nobody holds now (a fixed pick could collide)
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    procs = []
    for i in range(2):
        env = _env(XLA_FLAGS="--xla_force_host_platform_device_count=4",
                   BTLM_COORDINATOR=f"localhost:{port}", BTLM_NUM_PROCESSES=2,
                   BTLM_PROCESS_ID=i, BTLM_HEARTBEAT_TIMEOUT=20)
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "btlm_jax.main", f"--workdir={wd}", *_cli_flags(over)],
            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
    try:
        metrics = wd / "metrics.jsonl"
        t0 = time.time()
        while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
            assert time.time() - t0 < 300, "training did not start"
            assert all(p.poll() is None for p in procs), [p.stderr.read()[-2000:] for p in procs]
            time.sleep(0.5)
        procs[1].send_signal(signal.SIGKILL)
        killed = time.time()
        try:
            rc = procs[0].wait(timeout=120)
        except subprocess.TimeoutExpired:
            pytest.fail("process 0 still running 120 s after process 1 was killed")
        elapsed = time.time() - killed
        err = procs[0].stderr.read()
        assert rc != 0, err[-2000:]
        # Either the coordination service notices the dead peer (heartbeat), or, when the kill
        # lands inside a step, the CPU collective's transport (gloo) fails first; both abort.
        assert any(m in err for m in ("another task died", "unhealthy", "gloo::")), err[-2000:]
        print(f"survivor exited {elapsed:.1f} s after the kill (rc {rc})")
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
