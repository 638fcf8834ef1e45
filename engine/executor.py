"""The seam between the engine core and its workers. The core talks to an executor with plain data
only: a SchedulerOutput in, a ModelRunnerOutput back (engine/scheduler_output.py), so that the same
core drives one in-process worker today and tensor/pipeline-parallel workers in other processes
later (each applying the same plan to its own persistent batch and shard).

`execute_model` returns once the step is launched, with a handle whose `result()` gives the
ModelRunnerOutput: the core launches step N+1 before it reads step N's tokens (the one-step
overlap, see EngineCore.step). The multi-process executor (engine/executor_mp.py: one worker process
per tensor/pipeline rank) returns the same kind of handle over its IPC channel.
"""
from __future__ import annotations

from pathlib import Path
from typing import Protocol

from engine.config import EngineConfig
from engine.lora.request import LoRARequest
from engine.scheduler_output import ModelRunnerOutput, SchedulerOutput
from engine.step_timer import StepTimer
from engine.worker import Worker


class PendingModelOutput(Protocol):
    def result(self) -> ModelRunnerOutput: ...


class WorkerFailure(RuntimeError):
    """A worker process died or failed: the engine cannot go on (the core lets this through)."""


def make_executor(config: EngineConfig, model_dir: Path, timer: StepTimer):
    """The in-process worker, or one worker process per rank (config.executor_backend)."""
    if config.executor_backend == "mp":
        from engine.executor_mp import MultiprocExecutor

        return MultiprocExecutor(config, model_dir)
    return UniprocExecutor(config, model_dir, timer)


class UniprocExecutor:
    """One worker, in this process."""

    def __init__(self, config: EngineConfig, model_dir: Path, timer: StepTimer):
        self.worker = Worker(config, model_dir, timer)

    @property
    def runner(self):
        return self.worker.runner

    def determine_num_blocks(self) -> int:
        return self.worker.determine_num_blocks()

    def initialize_cache(self, num_blocks: int) -> None:
        self.worker.initialize_cache(num_blocks)

    def execute_model(self, plan: SchedulerOutput) -> PendingModelOutput:
        return self.worker.execute_model(plan)

    def add_lora(self, request: LoRARequest) -> None:
        """Every worker reads and checks the adapter (the plans then name it by id only)."""
        self.worker.add_lora(request)

    def remove_lora(self, lora_int_id: int) -> None:
        self.worker.remove_lora(lora_int_id)

    def shutdown(self) -> None:
        self.worker.shutdown()
