"""A vLLM plugin that bounds how long vLLM's worker spins on its message queue once it has nothing to do.

vLLM's multiprocess executor hands each engine step to its worker over a
shared-memory queue. After every read the worker keeps polling that queue,
yielding the CPU but never sleeping, for a fixed second (SpinCondition's
`busy_loop_s`), so that back-to-back decode steps find it awake. On a CPU
host that second lands, every step, exactly when the replica goes quiet and
the trainer, the reward service and the scheduler want the cores: on 2 cores
it held one of them for the first second of each training step.

The replica (services.generation.engine) sets E3_VLLM_IDLE_SPIN_S on CPU
hosts; the engine core and worker processes inherit it, and vLLM calls
`register` in each of them (entry point group `vllm.general_plugins`, in
pyproject.toml). With the variable unset (GPU hosts, or anyone else's vLLM
in this environment) nothing changes. Decode steps follow each other within
milliseconds, so the default bound, a tenth of a second, keeps the worker
awake while it generates and lets it sleep soon after it stops. (0.02 s let
it fall asleep between the steps of a large batch, 15-30% slower on 512
prompts x 8 samples here; 0.1 s sampled as fast as vLLM's own second.)
"""

from __future__ import annotations

import os

ENV = "E3_VLLM_IDLE_SPIN_S"


def register() -> None:
    """Cap SpinCondition's busy-loop at E3_VLLM_IDLE_SPIN_S seconds in this process (idempotent)."""
    value = os.environ.get(ENV)
    if not value:
        return
    limit = float(value)
    if not limit >= 0:
        raise ValueError(f"{ENV} must be a number of seconds >= 0, got {value!r}")
    from vllm.distributed.device_communicators import shm_broadcast

    condition = getattr(shm_broadcast, "SpinCondition", None)
    if condition is None or getattr(condition, "e3_idle_spin_s", None) is not None:
        return  # a vLLM without it, or bounded already
    unbounded_wait = condition.wait

    def wait(self, timeout_ms=None):
        # Queues built before the plugin loaded carry the default too; cap it at each wait.
        if self.busy_loop_s > limit:
            self.busy_loop_s = limit
        return unbounded_wait(self, timeout_ms)

    condition.wait = wait
    condition.e3_idle_spin_s = limit
