"""Host time per phase of the engine step, summed over steps (`bench throughput --profile`).

Off by default, and then each lap is one attribute test: no clock read, no device sync. On, it
reads the host clock at phase boundaries only; "wait" is the time the host is blocked on the
device (the previous step's sampled tokens), every other phase is host work. The phases run in
this order within a step: schedule, prepare (applying the plan to the persistent batch and
building the inputs), forward (launching the model), sample (launching the sampler), wait,
output (tokens appended, stops checked, CoreOutputs), frontend (offline only: detokenizing and
RequestOutputs).
"""
from __future__ import annotations

import time

PHASES = ("schedule", "prepare", "forward", "sample", "wait", "output", "frontend")


class StepTimer:
    def __init__(self):
        self.enabled = False
        self.totals = dict.fromkeys(PHASES, 0.0)
        self.steps = 0
        self._last = 0.0

    def enable(self) -> None:
        self.enabled = True
        self.reset()

    def reset(self) -> None:
        self.totals = dict.fromkeys(PHASES, 0.0)
        self.steps = 0

    def start(self) -> None:
        """The beginning of a step."""
        if self.enabled:
            self.steps += 1
            self._last = time.perf_counter()

    def lap(self, phase: str) -> None:
        """The end of `phase`: the time since the last boundary is charged to it."""
        if self.enabled:
            now = time.perf_counter()
            self.totals[phase] += now - self._last
            self._last = now

    def summary(self) -> dict:
        """Per-step milliseconds by phase, and each phase's share of the measured host time."""
        steps = max(1, self.steps)
        total = sum(self.totals.values())
        return {"steps": self.steps, "measured_ms_per_step": 1e3 * total / steps,
                "ms_per_step": {p: 1e3 * t / steps for p, t in self.totals.items()},
                "share": {p: (t / total if total else 0.0) for p, t in self.totals.items()}}
