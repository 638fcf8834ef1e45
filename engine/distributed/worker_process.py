"""The body of one worker process (started by engine/executor_mp.py): join the process groups, build
this rank's Worker, then apply every message from the engine in order until told to stop.

Messages in (ZeroMQ PULL, from the executor): STEP + a msgspec-encoded SchedulerOutput, CALL + a
pickled (method, args) for the rare control calls, STOP. Messages out (PUSH, to the executor): the
step's ModelRunnerOutput from the output rank only (tensor rank 0 of the last stage), a RESULT from
every rank for each call, and ERROR with the traceback when something fails (the worker then exits:
its peers cannot go on without it).

No orphans: a thread polls the parent's pid and ends the process when the parent is gone (killed, or
exited without shutting down), even while the main thread is blocked in a collective.
"""
from __future__ import annotations

import logging
import os
import pickle
import signal
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import msgspec
import zmq

from engine.config import EngineConfig

STEP, CALL, STOP, READY, RESULT, ERROR = b"step", b"call", b"stop", b"ready", b"result", b"error"
PARENT_POLL_S = 0.5


@dataclass
class WorkerArgs:
    config: EngineConfig
    model_dir: Path
    rank: int
    init_method: str  # torch.distributed rendezvous, tcp://127.0.0.1:PORT
    inbox: str  # this worker's ZeroMQ address for messages from the executor
    outbox: str  # the executor's address for replies
    parent_pid: int
    log_level: int


def watch_parent(parent_pid: int) -> None:
    def watch():
        while os.getppid() == parent_pid:
            time.sleep(PARENT_POLL_S)
        os._exit(1)  # the engine is gone: nothing will ever read from this worker again

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def worker_main(args: WorkerArgs) -> None:
    logging.basicConfig(level=args.log_level, format=f"%(asctime)s %(levelname)s worker{args.rank}: %(message)s")
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the engine's to handle; it stops us
    watch_parent(args.parent_pid)
    ctx = zmq.Context()
    inbox, outbox = ctx.socket(zmq.PULL), ctx.socket(zmq.PUSH)
    inbox.connect(args.inbox)
    outbox.connect(args.outbox)
    rank = str(args.rank).encode()
    try:
        worker = start_worker(args)
    except BaseException:
        outbox.send_multipart([ERROR, rank, traceback.format_exc().encode()])
        outbox.close(linger=2000)
        raise SystemExit(1) from None
    outbox.send_multipart([READY, rank, b""])
    try:
        serve(worker, args, inbox, outbox, rank)
    except BaseException:
        outbox.send_multipart([ERROR, rank, traceback.format_exc().encode()])
        outbox.close(linger=2000)
        raise SystemExit(1) from None
    worker.shutdown()
    outbox.close(linger=1000)
    inbox.close(linger=0)


def start_worker(args: WorkerArgs):
    import torch

    from engine.distributed.state import init_distributed
    from engine.step_timer import StepTimer
    from engine.worker import Worker

    config = args.config
    world = config.world_size
    if config.device == "cuda":
        device = torch.device("cuda", args.rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))  # the ranks share the host's cores
    par = init_distributed(args.rank, config.tensor_parallel_size, config.pipeline_parallel_size,
                           "nccl" if device.type == "cuda" else "gloo", args.init_method, device)
    return Worker(config, args.model_dir, StepTimer(), par, device)


def serve(worker, args: WorkerArgs, inbox: zmq.Socket, outbox: zmq.Socket, rank: bytes) -> None:
    from engine.distributed.state import output_rank
    from engine.scheduler_output import SchedulerOutput, encode

    config = args.config
    replies = args.rank == output_rank(config.tensor_parallel_size, config.pipeline_parallel_size)
    decoder = msgspec.msgpack.Decoder(SchedulerOutput)
    while True:
        kind, payload = inbox.recv_multipart()
        if kind == STEP:
            out = worker.execute_model(decoder.decode(payload)).result()
            if replies:
                outbox.send_multipart([STEP, rank, encode(out)], copy=False)
        elif kind == CALL:
            method, call_args = pickle.loads(payload)
            result = getattr(worker, method)(*call_args)
            outbox.send_multipart([RESULT, rank, pickle.dumps(result)])
        elif kind == STOP:
            return
        else:
            raise RuntimeError(f"unknown message kind {kind!r}")
