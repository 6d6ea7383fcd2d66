"""Synchronised preemption: every process stops at the same step.

A preemption notice (SIGTERM) usually reaches one host first. Each process sets its own flag
(:class:`btlm_jax.train.run_dir.Preemption`); :class:`StopVote` turns the flags into one decision
that every process takes at the same step, so they all reach Orbax's collective save together,
save once and exit cleanly (a process that saved alone would wait in the save's barrier until the
heartbeat timeout).

After each step every process contributes its flag to a max-reduction over all devices (a tiny
jitted collective, dispatched after the step, so it runs on the devices in step order). The
result of step ``i``'s vote is read after step ``i + 1`` has been dispatched, so the host waits
for step ``i`` only, as the loop does anyway, and keeps one step in flight; all processes read
the same reduced value, hence stop after the same step (one step after the first flag was seen).
With one process the local flag is the decision.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P


class StopVote:
    """``vote(flag) -> bool``: True on every process at the same step once any process flagged."""

    def __init__(self):
        self.multi = jax.process_count() > 1
        self._pending = None
        if self.multi:
            devices = jax.devices()
            mesh = Mesh(np.asarray(devices), ("all",))
            self._sharding = NamedSharding(mesh, P("all"))
            self._shape = (len(devices),)
            self._local = [d for d in devices if d.process_index == jax.process_index()]
            self._any = jax.jit(jnp.max, out_shardings=NamedSharding(mesh, P()))

    def vote(self, flag: bool) -> bool:
        if not self.multi:
            return bool(flag)
        mine = np.asarray([1 if flag else 0], np.int32)
        arr = jax.make_array_from_single_device_arrays(
            self._shape, self._sharding, [jax.device_put(mine, d) for d in self._local])
        previous, self._pending = self._pending, self._any(arr)
        return previous is not None and bool(jax.device_get(previous))
