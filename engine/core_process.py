"""The engine core in its own process, as vLLM v1 runs it: a busy loop that takes requests and
aborts from the API server processes, steps the engine, and sends each API process one message per
step with all of its sequences' new token ids.

Why a process: with the engine stepping in a thread of the API server, the GIL, one cross-thread
call per sequence per step and detokenizing in the engine held the served path at 1/12 of the
offline engine (0.5B on an H100). Here the core's only Python work is scheduling and sampling
bookkeeping; text and HTTP live in other processes.

IPC is ZeroMQ over Unix sockets with msgspec/msgpack payloads (engine/messages.py): one PUSH/PULL
pipe in (every API process pushes to the core), one PUSH/PULL pipe out per API process. ZeroMQ's
I/O thread does the socket work, so sending a step's outputs costs the loop a memcpy.
"""
from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import tempfile
import uuid
from dataclasses import dataclass

import msgspec
import zmq

from engine.config import EngineConfig
from engine.executor import WorkerFailure
from engine.lora.registry import LoRARegistry
from engine.lora.request import LoRAError
from engine.messages import (
    ABORT,
    ADD,
    LOAD_LORA,
    RESET_PREFIX_CACHE,
    SHUTDOWN,
    UNLOAD_LORA,
    CallResult,
    CoreInfo,
    CoreOutput,
    CoreOutputs,
    CoreRequest,
    LoadLoRA,
    UnloadLoRA,
)

log = logging.getLogger("engine.core")

MAX_CONSECUTIVE_STEP_FAILURES = 3  # then the device is taken to be broken and the core exits non-zero


@dataclass
class CoreAddresses:
    input: str  # API processes push requests here
    outputs: list[str]  # one per API process

    @staticmethod
    def new(num_clients: int) -> CoreAddresses:
        base = os.path.join(tempfile.gettempdir(), f"pagedbench-{uuid.uuid4().hex[:12]}")
        return CoreAddresses(f"ipc://{base}-in", [f"ipc://{base}-out{i}" for i in range(num_clients)])


class CoreStartError(RuntimeError):
    """The core could not start (a bad setting, a missing model); the message says why."""


class CoreProcess:
    """The parent's handle: starts the core, waits until it is ready, stops it."""

    def __init__(self, config: EngineConfig, num_clients: int, log_level: str = "INFO", lora_modules: list = ()):
        """`lora_modules`: LoRAModulePath entries (--lora-modules), registered before the core reports ready."""
        self.addresses = CoreAddresses.new(num_clients)
        ctx = multiprocessing.get_context("spawn")  # never fork a process that may hold CUDA state
        reader, writer = ctx.Pipe(duplex=False)
        self.process = ctx.Process(target=run_core, name="EngineCore",
                                   args=(config, self.addresses, writer, log_level, list(lora_modules)), daemon=False)
        self.process.start()
        writer.close()
        try:
            status, payload = reader.recv()
        except EOFError:
            self.process.join(5)
            raise CoreStartError(f"the engine core process exited during start-up "
                                 f"(exit code {self.process.exitcode})") from None
        finally:
            reader.close()
        if status == "error":
            self.process.join(10)
            raise CoreStartError(payload)
        self.info: CoreInfo = msgspec.msgpack.decode(payload, type=CoreInfo)

    @property
    def sentinel(self) -> int:
        return self.process.sentinel

    def shutdown(self, timeout: float = 10.0) -> None:
        if self.process.is_alive():
            ctx = zmq.Context.instance()
            sock = ctx.socket(zmq.PUSH)
            sock.setsockopt(zmq.LINGER, 1000)
            sock.connect(self.addresses.input)
            sock.send_multipart([SHUTDOWN, b""])
            sock.close()
            self.process.join(timeout)
        if self.process.is_alive():
            log.warning("the engine core did not stop in %.0f s; killing it", timeout)
            self.process.kill()
            self.process.join(5)


# ---------------------------------------------------------------- the core process
def run_core(config: EngineConfig, addresses: CoreAddresses, ready, log_level: str, lora_modules: list = ()) -> None:
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # Ctrl-C reaches the whole process group: the API processes drain their streams first and the
    # parent then stops the core, so the core must not die on SIGINT. SIGTERM does stop it.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    from engine.core import EngineCore

    try:
        core = EngineCore(config)
    except Exception as exc:  # ConfigError, missing files, out of memory: the parent prints it
        log.debug("engine core start-up failed", exc_info=True)
        ready.send(("error", f"{exc}" if isinstance(exc, (ValueError, FileNotFoundError)) else f"{exc!r}"))
        ready.close()
        return
    # Adapter names are the server's: the registry lives here, beside the core, which checks and caches them.
    registry = LoRARegistry(core.add_lora, core.remove_lora) if config.enable_lora else None
    for module in lora_modules:
        try:
            if registry is None:
                raise LoRAError("LoRA is not enabled: start the server with --enable-lora")
            registry.load(module.name, module.path, module.base_model_name)
        except LoRAError as exc:
            ready.send(("error", f"--lora-modules {module.name}: {exc}"))
            ready.close()
            core.shutdown()
            return
    ctx = zmq.Context()
    inbox = ctx.socket(zmq.PULL)
    inbox.bind(addresses.input)
    outboxes = []
    for address in addresses.outputs:
        sock = ctx.socket(zmq.PUSH)
        sock.setsockopt(zmq.SNDHWM, 0)  # never drop or block: a slow API process only queues
        sock.bind(address)
        outboxes.append(sock)
    info = CoreInfo(str(core.model_dir), str(core.tokenizer_dir), core.config.max_model_len, core.vocab_size,
                    core.config.max_logprobs,
                    core.config.max_num_seqs, sorted(core.eos_token_ids), core.get_stats(),
                    enable_lora=registry is not None, adapters=registry.adapters() if registry else [])
    ready.send(("ready", msgspec.msgpack.encode(info)))
    ready.close()
    try:
        CoreLoop(core, inbox, outboxes, registry).run()
    finally:
        core.shutdown()
        for sock in [inbox, *outboxes]:
            sock.close(linger=0)
        ctx.term()
        for address in [addresses.input, *addresses.outputs]:
            _unlink_ipc(address)


def _unlink_ipc(address: str) -> None:
    try:
        os.unlink(address.removeprefix("ipc://"))
    except OSError:
        pass


class CoreLoop:
    """Busy while there is work: drain the inbox without blocking, step, send. Idle: block on the
    inbox (waking once a second to notice an orphaned core)."""

    def __init__(self, core, inbox: zmq.Socket, outboxes: list[zmq.Socket], loras: LoRARegistry | None = None):
        self.core = core
        self.loras = loras  # None when LoRA is off
        self.inbox = inbox
        self.outboxes = outboxes
        self.client_of: dict[str, int] = {}  # request id -> API process, while it runs
        self.encoder = msgspec.msgpack.Encoder()
        self.request_decoder = msgspec.msgpack.Decoder(CoreRequest)
        self.ids_decoder = msgspec.msgpack.Decoder(list[str])
        self.load_decoder = msgspec.msgpack.Decoder(LoadLoRA)
        self.unload_decoder = msgspec.msgpack.Decoder(UnloadLoRA)
        self.parent = os.getppid()
        self.failures = 0

    def run(self) -> None:
        while True:
            busy = self.core.has_unfinished_requests()
            if not self.drain(block=not busy):
                return
            if self.core.has_unfinished_requests():
                self.step()

    def drain(self, block: bool) -> bool:
        """Handle every waiting message; False on shutdown."""
        while True:
            if not self.inbox.poll(1000 if block else 0):
                if block and os.getppid() != self.parent:
                    log.error("the server process is gone; the engine core exits")
                    return False
                if block:
                    self.core.log_stats()  # idle: the line that says so, once
                    continue
                return True
            kind, payload = self.inbox.recv_multipart(copy=True)
            if kind == ADD:
                self.add(self.request_decoder.decode(payload))
            elif kind == ABORT:
                self.core.abort(self.ids_decoder.decode(payload))
            elif kind == RESET_PREFIX_CACHE:
                self.core.reset_prefix_cache()
            elif kind == LOAD_LORA:
                call = self.load_decoder.decode(payload)
                self.call(call, lambda: self._registry().load(call.lora_name, call.lora_path, call.base_model_name,
                                                              call.load_inplace))
            elif kind == UNLOAD_LORA:
                call = self.unload_decoder.decode(payload)
                self.call(call, lambda: self._registry().unload(call.lora_name))
            elif kind == SHUTDOWN:
                return False
            block = False  # something arrived: take the rest without waiting, then step

    def add(self, request: CoreRequest) -> None:
        try:
            self.core.add_request(request)
        except ValueError as exc:
            out = CoreOutput(request.request_id, [], finish_reason="error", error=str(exc))
            self.send({request.client_index: [out]})
            return
        if len(self.outboxes) > 1:
            self.client_of[request.request_id] = request.client_index

    def call(self, call: LoadLoRA | UnloadLoRA, run) -> None:
        """Run an adapter call; its result goes to the caller and the registry to every API process."""
        try:
            run()
            result = CallResult(call.call_id)
        except LoRAError as exc:
            result = CallResult(call.call_id, str(exc), exc.status)
        except Exception as exc:  # noqa: BLE001 -- a bug here must not take the core down
            log.exception("LoRA call failed")
            result = CallResult(call.call_id, f"{type(exc).__name__}: {exc}", 500)
        stats, adapters = self.core.get_stats(), self.loras.adapters() if self.loras else []
        for client, outbox in enumerate(self.outboxes):
            results = [result] if client == call.client_index else []
            outbox.send(self.encoder.encode(CoreOutputs([], stats, results, adapters)), copy=False)

    def _registry(self) -> LoRARegistry:
        if self.loras is None:
            raise LoRAError("LoRA is not enabled: start the server with --enable-lora")
        return self.loras

    def step(self) -> None:
        try:
            outputs = self.core.step()
            self.failures = 0
        except WorkerFailure as exc:  # a worker process is gone: nothing can run any more
            log.error("the engine's workers failed; the engine core exits: %s", exc)
            raise SystemExit(f"the engine's workers failed: {exc}") from exc
        except Exception as exc:  # a fault outside one request: fail what runs, keep serving
            self.failures += 1
            log.exception("engine step failed (%d in a row)", self.failures)
            if self.failures >= MAX_CONSECUTIVE_STEP_FAILURES:
                raise SystemExit(f"the engine step failed {self.failures} times in a row: {exc!r}") from exc
            outputs = self.core.fail_all(f"engine step failed: {exc!r}")
        self.core.log_stats()
        if len(self.outboxes) == 1:
            self.send({0: outputs})
            return
        by_client: dict[int, list[CoreOutput]] = {i: [] for i in range(len(self.outboxes))}
        for out in outputs:
            client = self.client_of.get(out.request_id, 0)
            if out.finish_reason is not None:
                self.client_of.pop(out.request_id, None)
            by_client[client].append(out)
        self.send(by_client)

    def send(self, by_client: dict[int, list[CoreOutput]]) -> None:
        stats = self.core.get_stats()
        for client, outputs in by_client.items():
            self.outboxes[client].send(self.encoder.encode(CoreOutputs(outputs, stats)), copy=False)
