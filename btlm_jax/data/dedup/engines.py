"""Execution engines: run a list of independent tasks locally or on Ray.

Both engines call the same task functions with the same arguments; results are
returned by task index so the driver's output does not depend on the engine or
on completion order.
"""

from __future__ import annotations

import concurrent.futures as cf
import sys
import time
from typing import Callable, Iterator

from .io import DedupInputError


class Progress:
    """One progress bar per stage, with documents/s and MB/s."""

    def __init__(self, stage: str, total: int, unit: str, enabled: bool):
        self.stage, self.enabled = stage, enabled
        self.t0 = time.perf_counter()
        self.docs = 0
        self.nbytes = 0
        self.bar = None
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=stage, unit=unit, file=sys.stderr, dynamic_ncols=True)

    def update(self, n: int = 1, docs: int = 0, nbytes: int = 0) -> None:
        self.docs += docs
        self.nbytes += nbytes
        if self.bar is not None:
            dt = max(time.perf_counter() - self.t0, 1e-9)
            postfix = {}
            if self.docs:
                postfix["docs/s"] = f"{self.docs / dt:,.0f}"
            if self.nbytes:
                postfix["MB/s"] = f"{self.nbytes / dt / 1e6:,.1f}"
            self.bar.set_postfix(postfix, refresh=False)
            self.bar.update(n)

    def close(self) -> dict:
        dt = time.perf_counter() - self.t0
        if self.bar is not None:
            self.bar.close()
            msg = f"[dedup] {self.stage}: {dt:.2f}s"
            if self.docs:
                msg += f", {self.docs:,} docs ({self.docs / max(dt, 1e-9):,.0f} docs/s"
                msg += f", {self.nbytes / max(dt, 1e-9) / 1e6:,.1f} MB/s)" if self.nbytes else ")"
            print(msg, file=sys.stderr, flush=True)
        return {"seconds": round(dt, 4), "documents": self.docs, "bytes": self.nbytes}


class LocalEngine:
    """In-process (workers == 1) or a process pool (workers > 1)."""

    name = "local"

    def __init__(self, workers: int = 1):
        self.workers = workers
        self._pool = None
        if workers > 1:
            self._pool = cf.ProcessPoolExecutor(max_workers=workers)

    def map(self, fn: Callable, tasks: list[tuple], common: dict) -> Iterator[tuple[int, object]]:
        if self._pool is None:
            for i, args in enumerate(tasks):
                yield i, fn(*args, **common)
            return
        futures = {self._pool.submit(fn, *args, **common): i for i, args in enumerate(tasks)}
        try:
            for fut in cf.as_completed(futures):
                yield futures[fut], fut.result()
        finally:
            for fut in futures:
                fut.cancel()

    def shutdown(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(cancel_futures=True)


class RayEngine:
    """Tasks as Ray remote functions (one CPU each); large shared arguments are put once."""

    name = "ray"

    def __init__(self, address: str | None = None, workers: int | None = None):
        try:
            import ray
        except ImportError as exc:  # pragma: no cover - depends on the environment
            raise DedupInputError(
                "--engine ray needs Ray: pip install 'btlm_jax[dedup]' (or pip install ray)"
            ) from exc
        self.ray = ray
        self._owns = False
        if not ray.is_initialized():
            kwargs = {"include_dashboard": False, "log_to_driver": True}
            if address:
                kwargs["address"] = address
            elif workers:
                kwargs["num_cpus"] = workers
            ray.init(**kwargs)
            self._owns = True
        self.workers = workers
        self._remote = {}

    def map(self, fn: Callable, tasks: list[tuple], common: dict) -> Iterator[tuple[int, object]]:
        ray = self.ray
        if fn not in self._remote:
            self._remote[fn] = ray.remote(num_cpus=1, max_retries=2)(fn)
        remote = self._remote[fn]
        common_refs = {k: ray.put(v) for k, v in common.items()}
        pending = {remote.remote(*args, **common_refs): i for i, args in enumerate(tasks)}
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            for ref in done:
                i = pending.pop(ref)
                try:
                    result = ray.get(ref)
                except ray.exceptions.RayTaskError as exc:
                    cause = getattr(exc, "cause", None)
                    if isinstance(cause, Exception):
                        for other in pending:
                            ray.cancel(other)
                        raise cause from None
                    raise
                yield i, result

    def shutdown(self) -> None:
        if self._owns:
            self.ray.shutdown()


def make_engine(name: str, workers: int, address: str | None):
    if name == "local":
        return LocalEngine(workers)
    if name == "ray":
        return RayEngine(address, workers)
    raise DedupInputError(f"--engine: unknown engine {name!r}; use 'local' or 'ray'")
