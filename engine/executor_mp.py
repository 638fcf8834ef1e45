"""MultiprocExecutor: one worker process per rank (tensor x pipeline), vLLM's `mp` backend.

The engine core sends each step's plan (SchedulerOutput, msgspec-encoded once) to every worker over
ZeroMQ; every rank applies it to its own persistent batch and shard, and the output rank (tensor rank
0 of the last stage) sends the sampled tokens back. `execute_model` returns at once with a handle, so
the core keeps steps in flight (one for TP, as many as stages for PP: engine/core.py). The workers
talk among themselves through torch.distributed (gloo on CPU, NCCL on GPU; engine/distributed/).

Failure is total: a worker that dies or raises takes the engine with it (its peers would wait for it
in their next collective). The executor notices (an ERROR message, or a worker's exit seen while
waiting), kills every other worker, and raises WorkerFailure naming the rank and its pid. Shutdown
(normal exit, or the finalizer at interpreter exit) stops the workers and kills the ones that do not
stop; the workers also watch their parent's pid, so none outlives a killed engine
(engine/distributed/worker_process.py).
"""
from __future__ import annotations

import logging
import multiprocessing
import os
import pickle
import socket
import tempfile
import time
import uuid
import weakref
from pathlib import Path

import msgspec
import zmq

from engine.config import EngineConfig
from engine.distributed.worker_process import CALL, ERROR, READY, RESULT, STEP, STOP, WorkerArgs, worker_main
from engine.executor import WorkerFailure
from engine.scheduler_output import ModelRunnerOutput, SchedulerOutput, encode

log = logging.getLogger("engine")

POLL_MS = 100  # how often a waiting executor checks that its workers are alive
STOP_TIMEOUT_S = 10.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PendingStep:
    def __init__(self, executor: MultiprocExecutor, seq: int):
        self.executor = executor
        self.seq = seq

    def result(self) -> ModelRunnerOutput:
        return self.executor.step_result(self.seq)


class MultiprocExecutor:
    def __init__(self, config: EngineConfig, model_dir: Path):
        self.config = config
        self.world_size = config.world_size
        base = os.path.join(tempfile.gettempdir(), f"pagedbench-workers-{uuid.uuid4().hex[:12]}")
        self.addresses = [f"ipc://{base}-w{rank}" for rank in range(self.world_size)] + [f"ipc://{base}-out"]
        self.zmq = zmq.Context()
        self.inboxes = []
        for address in self.addresses[:-1]:
            sock = self.zmq.socket(zmq.PUSH)
            sock.setsockopt(zmq.SNDHWM, 0)  # never drop or block: a busy worker only queues
            sock.bind(address)
            self.inboxes.append(sock)
        self.replies = self.zmq.socket(zmq.PULL)
        self.replies.bind(self.addresses[-1])
        self.decoder = msgspec.msgpack.Decoder(ModelRunnerOutput)
        self.failure: str | None = None
        self._sent = 0  # steps sent; step results arrive in this order
        self._received = 0
        self._results: dict[int, ModelRunnerOutput] = {}
        ctx = multiprocessing.get_context("spawn")  # never fork a process that may hold CUDA state
        init_method = f"tcp://127.0.0.1:{free_port()}"
        self.procs = []
        for rank in range(self.world_size):
            args = WorkerArgs(config, model_dir, rank, init_method, self.addresses[rank], self.addresses[-1],
                              os.getpid(), logging.getLogger().getEffectiveLevel())
            proc = ctx.Process(target=worker_main, args=(args,), name=f"Worker-{rank}", daemon=True)
            proc.start()
            self.procs.append(proc)
        self._finalizer = weakref.finalize(self, _stop_workers, self.procs, self.inboxes, self.replies, self.zmq,
                                           self.addresses)
        try:
            self._gather(READY)
        except WorkerFailure:
            self.shutdown()
            raise
        log.info("%d worker processes ready (tensor_parallel_size %d x pipeline_parallel_size %d), pids %s",
                 self.world_size, config.tensor_parallel_size, config.pipeline_parallel_size,
                 [p.pid for p in self.procs])

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    # ---------------------------------------------------------------- the executor interface
    def determine_num_blocks(self) -> int:
        """Every rank sizes its own cache; all use the same block ids, so the fewest wins."""
        return min(self._call_all("determine_num_blocks"))

    def initialize_cache(self, num_blocks: int) -> None:
        self._call_all("initialize_cache", num_blocks)

    def execute_model(self, plan: SchedulerOutput) -> PendingStep:
        self._check()
        data = encode(plan)
        for sock in self.inboxes:
            sock.send_multipart([STEP, data], copy=False)
        self._sent += 1
        return PendingStep(self, self._sent)

    def add_lora(self, request) -> None:
        self._call_all("add_lora", request)

    def remove_lora(self, lora_int_id: int) -> None:
        self._call_all("remove_lora", lora_int_id)

    def shutdown(self) -> None:
        self._finalizer()

    # ---------------------------------------------------------------- replies
    def step_result(self, seq: int) -> ModelRunnerOutput:
        """Step `seq`'s output (read in order; a handle the core dropped -- a plan of removals only --
        has its result read and discarded on the way)."""
        while seq not in self._results:
            kind, payload = self._receive()
            if kind != STEP:
                self._fail(f"worker sent {kind!r} while a step result was due")
            self._received += 1
            if self._received >= seq:
                self._results[self._received] = self.decoder.decode(payload)
        for old in [k for k in self._results if k < seq]:
            del self._results[old]
        return self._results.pop(seq)

    def _call_all(self, method: str, *args) -> list:
        self._check()
        message = pickle.dumps((method, args))
        for sock in self.inboxes:
            sock.send_multipart([CALL, message])
        return self._gather(RESULT)

    def _gather(self, expected: bytes) -> list:
        """One `expected` reply from every rank, in rank order. Step results still on their way (the
        core may call between steps) are kept for their handles."""
        results: dict[int, object] = {}
        while len(results) < self.world_size:
            kind, rank, payload = self._receive(with_rank=True)
            if kind == STEP:
                self._received += 1
                self._results[self._received] = self.decoder.decode(payload)
                continue
            if kind != expected:
                self._fail(f"worker {rank} sent {kind!r}, expected {expected!r}")
            results[rank] = pickle.loads(payload) if kind == RESULT else None
        return [results[r] for r in range(self.world_size)]

    def _receive(self, with_rank: bool = False):
        """The next reply from any worker; WorkerFailure if one reports an error or dies meanwhile."""
        self._check()
        while not self.replies.poll(POLL_MS):
            dead = self._dead_worker()
            if dead:
                self._fail(dead)
        kind, rank, payload = self.replies.recv_multipart()
        rank = int(rank)
        if kind == ERROR:
            error = payload.decode(errors="replace")
            # A peer's death shows in the survivors as a failed collective: name the dead worker first.
            deadline = time.monotonic() + 2.0
            while not (dead := self._dead_worker(but=rank)) and time.monotonic() < deadline:
                time.sleep(0.05)
            last = error.strip().splitlines()[-1] if error.strip() else ""
            self._fail(f"{dead} (then worker {rank} failed: {last})" if dead
                       else f"worker {rank} (pid {self.procs[rank].pid}) failed:\n{error}")
        return (kind, rank, payload) if with_rank else (kind, payload)

    def _dead_worker(self, but: int | None = None) -> str | None:
        for rank, proc in enumerate(self.procs):
            if rank != but and proc.exitcode is not None:
                return f"worker {rank} (pid {proc.pid}) exited unexpectedly with code {proc.exitcode}"
        return None

    def _check(self) -> None:
        if self.failure is not None:
            raise WorkerFailure(self.failure)

    def _fail(self, message: str):
        self.failure = message
        log.error("%s; stopping every worker", message)
        _kill_workers(self.procs)
        raise WorkerFailure(message)


def _kill_workers(procs) -> None:
    for proc in procs:
        if proc.is_alive():
            proc.kill()
    for proc in procs:
        proc.join(5)


def _stop_workers(procs, inboxes, replies, ctx, addresses) -> None:
    """Ask every worker to stop, wait a while, kill the rest; close the sockets and remove their files."""
    for sock, proc in zip(inboxes, procs):
        if proc.is_alive():
            try:
                sock.send_multipart([STOP, b""], flags=zmq.NOBLOCK)
            except zmq.ZMQError:
                pass
    deadline = time.monotonic() + STOP_TIMEOUT_S
    for proc in procs:
        proc.join(max(0.0, deadline - time.monotonic()))
    stuck = [p for p in procs if p.is_alive()]
    if stuck:
        log.warning("workers %s did not stop in %.0f s; killing them", [p.name for p in stuck], STOP_TIMEOUT_S)
    _kill_workers(procs)
    for sock in [*inboxes, replies]:
        sock.close(linger=0)
    ctx.term()
    for address in addresses:
        try:
            os.unlink(address.removeprefix("ipc://"))
        except OSError:
            pass
