"""EngineCore: the scheduler and an executor (the workers: model runner and sampler), in token ids only.

Requests in (one sequence each, see engine/messages.py), one step at a time, every sequence's new
tokens out as plain data. The core talks to its workers in plain data too: a step plan
(SchedulerOutput) out, the sampled tokens (ModelRunnerOutput) back (engine/scheduler_output.py). Text, stop
strings and n-sample requests belong to the front end
(engine/output_processor.py), which runs in the same process offline (LLMEngine) and in the API
server processes when serving (engine/core_process.py). One core, either way.
"""
from __future__ import annotations

import atexit
import gc
import logging
import os
import time
from collections import deque
from dataclasses import dataclass

from engine.block_manager import BlockManager
from engine.config import EngineConfig
from engine.executor import PendingModelOutput, WorkerFailure, make_executor
from engine.lora.request import LoRAError, LoRARequest
from engine.messages import CoreOutput, CoreRequest, EngineStats
from engine.model_loader import load_hf_config, load_tokenizer
from engine.output_handler import OutputHandler
from engine.presets import resolve_model
from engine.scheduler import ScheduledStep, Scheduler
from engine.scheduler_output import RequestSampling
from engine.sequence import Sequence
from engine.spec_decode import scheduling as spec_scheduling
from engine.stat_logger import StatLogger, log_stats_interval
from engine.step_timer import StepTimer

log = logging.getLogger("engine")


@dataclass
class PendingStep:
    """A step whose sampled tokens the host has not read yet."""
    step: ScheduledStep
    output: PendingModelOutput


class EngineCore:
    def __init__(self, config: EngineConfig):
        start = time.perf_counter()
        # First, so that a bad VLLM_LOG_STATS_INTERVAL fails before the model loads.
        self.stat_logger = None if config.disable_log_stats else StatLogger(log_stats_interval())
        self.model_dir = resolve_model(config.model, with_weights=config.load_format != "dummy")
        hf_config = load_hf_config(self.model_dir)
        config.resolve(hf_config)
        self.config = config
        self.tokenizer_dir = self.model_dir if config.tokenizer is None else resolve_model(config.tokenizer,
                                                                                           with_weights=False)
        tokenizer = load_tokenizer(self.tokenizer_dir)
        self.eos_token_ids = eos_token_ids(tokenizer, self.model_dir)
        self.vocab_size = hf_config.vocab_size
        self.step_timer = StepTimer()
        self.executor = make_executor(config, self.model_dir, self.step_timer)
        num_blocks = self.executor.determine_num_blocks()
        self.executor.initialize_cache(num_blocks)
        self.block_manager = BlockManager(num_blocks, config.block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(config, self.block_manager)
        self._faults = test_faults(os.environ.get("PAGEDBENCH_TEST_FAULTS", ""))
        self.output_handler = OutputHandler(self.eos_token_ids, (lambda seq: self._inject("request", [seq]))
                                            if "request" in self._faults else None)
        self.requests: dict[str, Sequence] = {}
        self._finished_outputs: list[CoreOutput] = []  # aborts and failures, reported with the next step
        # Steps launched and not read yet, oldest first. After each step() at most `max_unread` remain:
        # one (the one-step overlap), or one per pipeline stage, so that every stage has a step to run
        # while the host reads the oldest (the scheduler keeps their requests disjoint).
        self._in_flight: deque[PendingStep] = deque()
        self._counters = {"prompt_tokens": 0, "generation_tokens": 0, "steps": 0, "scheduled_tokens": 0}
        # Speculative decoding runs each step to its end before the next is scheduled (none unread): the
        # next step's drafts and token counts depend on how many of this step's drafts were accepted.
        self.spec_stats = (spec_scheduling.SpecDecodeStats(config.num_spec_tokens) if config.speculative
                           else None)
        self.max_unread = 0 if self.spec_stats is not None else config.pipeline_parallel_size
        # The start-up heap (torch, transformers, the model) is never garbage, yet the collector's full
        # passes walk it: one pauses a step for a third of a second on a 0.5B run. Frozen, they skip it
        # (as vLLM does); unfrozen at exit, so that the interpreter's last collection still sees it.
        gc.collect()
        gc.freeze()
        atexit.register(gc.unfreeze)
        log.info("engine ready in %.1f s: %s on %s, dtype %s, max_model_len %d, %d KV blocks, max_num_seqs %d, "
                 "max_num_batched_tokens %d, prefix caching %s, chunked prefill %s, CUDA graphs %s",
                 time.perf_counter() - start, self.model_dir, config.device, config.torch_dtype, config.max_model_len,
                 num_blocks, config.max_num_seqs, config.max_num_batched_tokens,
                 config.enable_prefix_caching, config.enable_chunked_prefill,
                 bool(self.runner.graphs) if self.runner is not None else "(in the workers)")
        self.log_stats()  # the first interval starts now

    @property
    def runner(self):
        """The in-process worker's model runner (benchmarks and tests look inside); None when the workers
        are processes of their own."""
        return getattr(self.executor, "runner", None)

    # ---------------------------------------------------------------- requests
    def add_request(self, request: CoreRequest) -> Sequence:
        """Raises ValueError (naming the field) for a request the engine cannot run."""
        if request.request_id in self.requests:
            raise ValueError(f"request id {request.request_id!r} is already in use")
        params = request.sampling_params()
        if params.n != 1:
            raise ValueError("the engine core takes one sequence per request; the front end fans out n")
        self.validate(request.prompt_token_ids, params)
        stop_ids = self.output_handler.stop_ids_for(params.ignore_eos, params.stop_token_ids)
        sampling = RequestSampling(
            temperature=params.temperature, top_p=params.top_p,
            top_k=-1 if params.top_k > self.vocab_size else params.top_k,  # as vLLM: past the vocabulary = all
            min_p=params.min_p, presence_penalty=params.presence_penalty, frequency_penalty=params.frequency_penalty,
            repetition_penalty=params.repetition_penalty, seed=params.seed, min_tokens=params.min_tokens,
            min_tokens_stop_ids=sorted(stop_ids) if params.min_tokens else [], logprobs=params.logprobs,
            prompt_logprobs=params.prompt_logprobs,
            logit_bias=params.logit_bias or None, allowed_token_ids=params.allowed_token_ids or None)
        max_tokens = params.max_tokens if params.max_tokens is not None else self.config.max_model_len
        prompt = request.prompt_token_ids
        lora_id = 0
        if request.lora is not None:
            self.add_lora(request.lora)  # read and checked now: LoRAError (a ValueError) refuses the request
            lora_id = request.lora.lora_int_id
        seq = Sequence(request.request_id, prompt, params, sampling, request.arrival_time,
                       max_num_tokens=min(len(prompt) + max_tokens, self.config.max_model_len), stop_ids=stop_ids,
                       lora_id=lora_id)
        seq.client_index = request.client_index
        self.scheduler.add(seq)
        self.requests[request.request_id] = seq
        return seq

    def validate(self, token_ids: list[int], params) -> None:
        if not token_ids:
            raise ValueError("the prompt is empty: give at least one token")
        vocab = self.vocab_size
        if min(token_ids) < 0 or max(token_ids) >= vocab:
            raise ValueError(f"prompt token ids must be in [0, {vocab}); got {min(token_ids)}..{max(token_ids)}")
        if len(token_ids) >= self.config.max_model_len:
            raise ValueError(f"the prompt has {len(token_ids)} tokens; max_model_len is {self.config.max_model_len}, "
                             "which must leave room for at least one generated token")
        if params.logprobs is not None and params.logprobs > self.config.max_logprobs:
            raise ValueError(f"logprobs={params.logprobs} exceeds max_logprobs ({self.config.max_logprobs})")
        for name in ("stop_token_ids", "logit_bias", "allowed_token_ids"):
            bad = [t for t in getattr(params, name) or () if not 0 <= t < vocab]
            if bad:
                raise ValueError(f"{name} must hold token ids in [0, {vocab}); got {bad[0]}")
        if params.prompt_logprobs is not None and params.prompt_logprobs > self.config.max_logprobs:
            raise ValueError(f"prompt_logprobs={params.prompt_logprobs} exceeds max_logprobs "
                             f"({self.config.max_logprobs})")

    def abort(self, request_ids: list[str], reason: str = "abort") -> None:
        for rid in request_ids:
            seq = self.requests.pop(rid, None)
            if seq is None:
                continue
            if not seq.is_finished:
                self.scheduler.finish(seq, reason)
            self._finished_outputs.append(CoreOutput(rid, [], finish_reason=reason))

    def add_lora(self, request: LoRARequest) -> None:
        """Read and check an adapter into the workers' CPU cache (vLLM's add_lora); LoRAError if it cannot
        be used."""
        if not self.config.enable_lora:
            raise LoRAError(f"LoRA adapter {request.lora_name!r} asked for, but LoRA is not enabled "
                            "(enable_lora / --enable-lora)")
        self.executor.add_lora(request)

    def remove_lora(self, lora_int_id: int) -> None:
        if self.config.enable_lora:
            self.executor.remove_lora(lora_int_id)

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests) or bool(self._finished_outputs)

    def reset_prefix_cache(self) -> bool:
        return self.block_manager.reset_prefix_cache()

    # ---------------------------------------------------------------- the step
    def step(self) -> list[CoreOutput]:
        """Schedule and launch this step, then finish the previous one on the host while the device
        computes: its tokens are appended and stops checked one step late. A running sequence whose
        token is still on the device counts it in num_tokens (not yet in token_ids); the worker
        gathers its next decode input from the previous step's output tensor, so the host never
        waits. A row computed for a sequence that the previous step finished is dropped."""
        timer = self.step_timer
        timer.start()
        outputs, self._finished_outputs = self._finished_outputs, []
        step = self.scheduler.schedule()
        timer.lap("schedule")
        if not step:
            if step.has_removals:  # rows to drop, nothing to run: the workers apply it at once
                self._launch(step)
            return outputs + self._finish_pending()
        try:
            launched = self._launch(step)
        except WorkerFailure:
            raise
        except Exception as exc:  # the step's requests fail; the engine goes on with the rest
            log.exception("model step failed for %d sequences", len(step.seqs))
            while self._in_flight:
                outputs += self._finish_pending()
            self._fail(step.seqs, exc)
            return outputs + self._take_finished()
        self._counters["steps"] += 1
        self._counters["scheduled_tokens"] += step.num_tokens
        self._in_flight.append(PendingStep(step, launched))
        while len(self._in_flight) > self.max_unread:
            outputs += self._finish_pending()  # overlaps the device work of the steps after it
        return outputs + self._take_finished()

    def _launch(self, step: ScheduledStep) -> PendingModelOutput:
        try:
            self._inject("step", step.seqs)
            return self.executor.execute_model(step.plan)
        except Exception:
            self.scheduler.plan_failed(step.plan)  # its removals are told again with the next plan
            raise

    def fail_all(self, message: str) -> list[CoreOutput]:
        """Fail every request (after a fault the core cannot pin on some of them); returns their outputs."""
        self._in_flight.clear()
        failed = list(self.requests.values())
        self._fail(failed, RuntimeError(message))
        return self._take_finished()

    def _take_finished(self) -> list[CoreOutput]:
        finished, self._finished_outputs = self._finished_outputs, []
        return finished

    def _fail(self, seqs: list[Sequence], exc: Exception) -> None:
        """Finish these sequences with an error and free their blocks."""
        message = f"{type(exc).__name__}: {exc}"
        for seq in seqs:
            if self.requests.get(seq.request_id) is not seq:
                continue  # finished or aborted already (its id may even be in use again)
            del self.requests[seq.request_id]
            if not seq.is_finished:
                self.scheduler.finish(seq, "error")
            self._finished_outputs.append(CoreOutput(seq.request_id, [], finish_reason="error", error=message))

    def _finish_pending(self) -> list[CoreOutput]:
        """Read the oldest in-flight step's tokens (waiting for its device work if need be) and hand
        them to output handling; finish what stopped."""
        if not self._in_flight:
            return []
        pending = self._in_flight.popleft()
        try:
            result = pending.output.result()
        except WorkerFailure:
            raise
        except Exception as exc:
            log.exception("reading the sampled tokens failed")
            self._fail(pending.step.seqs, exc)
            return []
        # The step's own sequences, not self.requests: an id aborted and reused since then must not
        # receive the old request's token.
        seqs = {seq.request_id: seq for seq in pending.step.seqs}
        outcome = self.output_handler.process(result, seqs)
        for seq in outcome.finished:
            self.scheduler.finish(seq, seq.finish_reason)
            del self.requests[seq.request_id]
        if self.spec_stats is not None:
            spec_scheduling.after_step(self.scheduler, pending.step.plan, result, seqs, self.spec_stats)
        for seq, exc in outcome.failed:
            self._fail([seq], exc)
        self._counters["generation_tokens"] += outcome.num_generated
        self._counters["prompt_tokens"] += outcome.num_prompt_tokens
        self.step_timer.lap("output")
        return outcome.outputs

    def _inject(self, where: str, seqs: list[Sequence]) -> None:
        token = self._faults.get(where)
        if token is not None and any(s.token_ids[0] == token for s in seqs):
            raise RuntimeError(f"injected {where} fault (PAGEDBENCH_TEST_FAULTS)")

    def shutdown(self) -> None:
        """Free the device memory (and stop the worker processes); the core cannot step afterwards."""
        self._in_flight.clear()
        self.executor.shutdown()

    # ---------------------------------------------------------------- stats
    def log_stats(self) -> None:
        """The periodic stats line (engine/stat_logger.py), when one is due; cheap when not."""
        if self.stat_logger is not None and self.stat_logger.due():
            self.stat_logger.observe(self.get_stats())

    def get_stats(self) -> EngineStats:
        bm = self.block_manager
        spec = self.spec_stats or spec_scheduling.SpecDecodeStats(0)
        return EngineStats(
            num_running=len(self.scheduler.running), num_waiting=len(self.scheduler.waiting),
            kv_cache_usage=bm.usage(), num_gpu_blocks=bm.num_blocks,
            num_preemptions_total=self.scheduler.num_preemptions, prefix_cache_queries_total=bm.prefix_queries,
            prefix_cache_hits_total=bm.prefix_hits, prompt_tokens_total=self._counters["prompt_tokens"],
            generation_tokens_total=self._counters["generation_tokens"], num_steps_total=self._counters["steps"],
            scheduled_tokens_total=self._counters["scheduled_tokens"],
            spec_decode_num_drafts_total=spec.num_drafts, spec_decode_num_draft_tokens_total=spec.num_draft_tokens,
            spec_decode_num_accepted_tokens_total=spec.num_accepted_tokens,
            spec_decode_num_accepted_tokens_per_pos=list(spec.accepted_per_pos))


def test_faults(spec: str) -> dict[str, int]:
    """Fault injection for tests: "request:ID,step:ID" makes a sequence whose prompt starts with token
    ID fail while its token is handled ("request"), or fail its whole model step ("step")."""
    faults = {}
    for item in filter(None, spec.split(",")):
        where, _, token = item.partition(":")
        if where not in ("request", "step") or not token.isdigit():
            raise ValueError(f"PAGEDBENCH_TEST_FAULTS: {item!r} is not request:ID or step:ID")
        faults[where] = int(token)
    return faults


def eos_token_ids(tokenizer, model_dir) -> set[int]:
    """EOS ids from the tokenizer and from generation_config.json (which may list several)."""
    import json

    ids = set()
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    gen_file = model_dir / "generation_config.json"
    if gen_file.is_file():
        eos = json.loads(gen_file.read_text()).get("eos_token_id")
        ids.update(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    return ids
