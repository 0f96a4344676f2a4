"""Preemption: SIGTERM (one process) or JAX's preemption sync point (several) ends a run cleanly.

When a Cloud TPU or a cluster scheduler preempts a job it sends SIGTERM. A single process notes the
signal and the train loop saves a checkpoint at the current step and exits with EXIT_PREEMPTED.
With several processes every one of them must save at the same step, so the decision comes from
Orbax's `reached_preemption`, which reads JAX's preemption sync point (all processes agree).
"""

from __future__ import annotations

import signal
import threading

import jax
import orbax.checkpoint as ocp

# EX_TEMPFAIL from sysexits.h: "temporary failure, try again" - rerun the same command to resume.
EXIT_PREEMPTED = 75


class Preempted(Exception):
    """Raised after the preemption checkpoint at `step` is complete."""

    def __init__(self, step: int):
        super().__init__(
            f"preempted at step {step}; a checkpoint of that step is saved, rerun the same "
            "command to resume"
        )
        self.step = step


class Guard:
    """Context manager that records SIGTERM while the train loop runs."""

    def __init__(self):
        self._signalled = False
        self._previous = None

    def _handle(self, signum, frame):
        self._signalled = True

    def __enter__(self) -> Guard:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)

    def reached(self, manager: ocp.CheckpointManager, step: int) -> bool:
        """True when this step is where every process should save and stop."""
        if jax.process_count() > 1:
            return manager.reached_preemption(step)
        return self._signalled
