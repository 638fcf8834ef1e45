"""EngineCore: the scheduler, the model runner and the sampler, in token ids only.

Requests in (one sequence each, see engine/messages.py), one step at a time, every sequence's new
tokens out as plain data. Text, stop strings and n-sample requests belong to the front end
(engine/output_processor.py), which runs in the same process offline (LLMEngine) and in the API
server processes when serving (engine/core_process.py). One core, either way.
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass

import torch

from engine.block_manager import BlockManager
from engine.config import EngineConfig
from engine.messages import CoreOutput, CoreRequest, EngineStats, TokenLogprobs
from engine.model_loader import build_model, load_hf_config, load_tokenizer
from engine.model_runner import ModelRunner
from engine.presets import resolve_model
from engine.prompt_logprobs import record_prompt_logprobs
from engine.sampler import PendingSample, Sampler, SampleResult, SamplingBatch, make_generator
from engine.scheduler import Scheduler
from engine.sequence import Sequence

log = logging.getLogger("engine")

PENDING_TOKEN = -1  # a sampled token still on the device (see EngineCore.step)


@dataclass
class PendingStep:
    """The step whose sampled tokens the host has not read yet."""
    seqs: list[Sequence]  # the sampled sequences, in the rows of `sample`
    sample: PendingSample


class EngineCore:
    def __init__(self, config: EngineConfig):
        start = time.perf_counter()
        self.model_dir = resolve_model(config.model, with_weights=config.load_format != "dummy")
        hf_config = load_hf_config(self.model_dir)
        config.resolve(hf_config)
        self.config = config
        self.tokenizer_dir = self.model_dir if config.tokenizer is None else resolve_model(config.tokenizer,
                                                                                           with_weights=False)
        tokenizer = load_tokenizer(self.tokenizer_dir)
        self.eos_token_ids = eos_token_ids(tokenizer, self.model_dir)
        self.vocab_size = hf_config.vocab_size
        self.device = torch.device(config.device)
        torch.manual_seed(config.seed)
        model = build_model(hf_config, config.torch_dtype, self.device, self.model_dir, config.load_format,
                            config.seed)
        self.runner = ModelRunner(config, model, self.device)
        self.block_manager = BlockManager(self.runner.num_blocks, config.block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(config, self.block_manager)
        self.sampler = Sampler(config.seed, self.device)
        self.requests: dict[str, Sequence] = {}
        self._finished_outputs: list[CoreOutput] = []  # aborts and failures, reported with the next step
        self._pending: PendingStep | None = None
        self._counters = {"prompt_tokens": 0, "generation_tokens": 0, "steps": 0, "scheduled_tokens": 0}
        self._faults = test_faults(os.environ.get("PAGEDBENCH_TEST_FAULTS", ""))
        log.info("engine ready in %.1f s: %s on %s, dtype %s, max_model_len %d, %d KV blocks, max_num_seqs %d, "
                 "max_num_batched_tokens %d, prefix caching %s, chunked prefill %s, CUDA graphs %s",
                 time.perf_counter() - start, self.model_dir, self.device, config.torch_dtype, config.max_model_len,
                 self.runner.num_blocks, config.max_num_seqs, config.max_num_batched_tokens,
                 config.enable_prefix_caching, config.enable_chunked_prefill, bool(self.runner.graphs))

    # ---------------------------------------------------------------- requests
    def add_request(self, request: CoreRequest) -> Sequence:
        """Raises ValueError (naming the field) for a request the engine cannot run."""
        if request.request_id in self.requests:
            raise ValueError(f"request id {request.request_id!r} is already in use")
        params = request.sampling_params()
        if params.n != 1:
            raise ValueError("the engine core takes one sequence per request; the front end fans out n")
        self.validate(request.prompt_token_ids, params)
        if params.top_k > self.vocab_size:  # as vLLM: a top-k past the vocabulary keeps every token
            params.top_k = -1
        generator = None if params.seed is None else make_generator(params.seed, self.device)
        seq = Sequence(request.request_id, 0, request.prompt_token_ids, params, request.arrival_time, generator)
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
            self._drop_pending_token(seq)
            if not seq.is_finished:
                self.scheduler.finish(seq, reason)
            self._finished_outputs.append(CoreOutput(rid, [], finish_reason=reason))

    @staticmethod
    def _drop_pending_token(seq: Sequence) -> None:
        if seq.pending_row is not None:  # its in-flight token is dropped with it
            seq.token_ids.pop()
            seq.pending_row = None

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests) or bool(self._finished_outputs)

    def reset_prefix_cache(self) -> bool:
        return self.block_manager.reset_prefix_cache()

    # ---------------------------------------------------------------- the step
    def step(self) -> list[CoreOutput]:
        """Schedule and launch this step, then finish the previous one on the host while the device
        computes: its tokens are appended and stops checked one step late. A running sequence whose
        token is still on the device holds a placeholder (-1) as its newest token; its next decode
        input is gathered from the device tensor, so the host never waits."""
        outputs, self._finished_outputs = self._finished_outputs, []
        batch = self.scheduler.schedule()
        if not batch:
            return outputs + self._finish_pending()
        prev = self._pending
        try:
            self._inject("step", batch.seqs)
            inputs, logits, prompt_scores = self.runner.run(batch, prev.sample.tokens if prev else None)
            if prompt_scores is not None:  # reads them now: a sync, on steps that score prompt rows only
                record_prompt_logprobs(inputs.prompt_rows, prompt_scores)
        except Exception as exc:  # the step's requests fail; the engine goes on with the rest
            log.exception("model step failed for %d sequences", len(batch.seqs))
            outputs += self._finish_pending()
            self._fail(batch.seqs, exc)
            return outputs + self._take_finished()
        self._counters["steps"] += 1
        self._counters["scheduled_tokens"] += batch.num_tokens
        for seq, n in zip(batch.seqs, batch.num_new_tokens):
            seq.num_computed_tokens += n
        outputs += self._finish_pending()  # overlaps this step's device work
        # Rows of sequences that the previous step finished were computed for nothing; drop them.
        if inputs.sampled:
            try:
                sample = self.sampler(logits, self._sampling_batch(inputs.sampled))
            except Exception as exc:
                log.exception("sampling failed for %d sequences", len(inputs.sampled))
                self._fail(inputs.sampled, exc)
                return outputs + self._take_finished()
            for i, seq in enumerate(inputs.sampled):
                if not seq.is_finished:
                    seq.append_token(PENDING_TOKEN)
                    seq.pending_row = i
            self._pending = PendingStep(inputs.sampled, sample)
        return outputs + self._take_finished()

    def fail_all(self, message: str) -> list[CoreOutput]:
        """Fail every request (after a fault the core cannot pin on some of them); returns their outputs."""
        self._pending = None
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
            if self.requests.pop(seq.request_id, None) is None:
                continue
            self._drop_pending_token(seq)
            if not seq.is_finished:
                self.scheduler.finish(seq, "error")
            self._finished_outputs.append(CoreOutput(seq.request_id, [], finish_reason="error", error=message))

    def _finish_pending(self) -> list[CoreOutput]:
        """Append the in-flight step's tokens (waiting for its device work if need be), check stops,
        and return one output per sequence that got a token."""
        pending, self._pending = self._pending, None
        if pending is None:
            return []
        try:
            result = pending.sample.result()
        except Exception as exc:
            log.exception("reading the sampled tokens failed")
            self._fail([s for s in pending.seqs if s.pending_row is not None], exc)
            return []
        outputs = []
        for i, seq in enumerate(pending.seqs):
            if seq.pending_row is None:  # finished or aborted since it was scheduled
                continue
            seq.pending_row = None
            try:
                outputs.append(self._append(seq, i, result))
            except Exception as exc:  # one request's failure stays its own
                log.exception("handling the token of request %s failed", seq.request_id)
                self._fail([seq], exc)
        return outputs

    def _sampling_batch(self, seqs: list[Sequence]) -> SamplingBatch:
        blocked = []
        for seq in seqs:
            p = seq.params
            if seq.num_output_tokens < p.min_tokens:
                blocked.append(list(p.stop_token_ids) + ([] if p.ignore_eos else sorted(self.eos_token_ids)))
            else:
                blocked.append([])
        # Token histories are only needed for penalties; copying them every step would dominate the
        # host time of large decode batches.
        penalised = any(s.params.repetition_penalty != 1.0 or s.params.presence_penalty != 0.0
                        or s.params.frequency_penalty != 0.0 for s in seqs)
        return SamplingBatch(params=[s.params for s in seqs],
                             prompt_token_ids=[s.token_ids[:s.num_prompt_tokens] for s in seqs] if penalised else [],
                             output_token_ids=[s.output_token_ids for s in seqs] if penalised else [],
                             generators=[s.generator for s in seqs], stop_ids_to_block=blocked)

    def _append(self, seq: Sequence, row: int, result: SampleResult) -> CoreOutput:
        self._inject("request", [seq])
        token = result.token_ids[row]
        seq.token_ids[-1] = token  # in place of the placeholder
        self._counters["generation_tokens"] += 1
        first = seq.num_output_tokens == 1
        if first:
            self._counters["prompt_tokens"] += seq.num_prompt_tokens
        out = CoreOutput(seq.request_id, [token], num_cached_tokens=seq.num_cached_tokens if first else 0)
        if first and seq.prompt_logprobs is not None:  # complete: the prompt's last chunk ran before this token
            out.prompt_logprobs = seq.prompt_logprobs
        if result.logprobs is not None and seq.params.logprobs is not None:
            top = result.top_logprobs[row] or []
            out.logprobs = [TokenLogprobs(result.logprobs[row], result.ranks[row], [t for t, _ in top],
                                          [lp for _, lp in top])]
        reason, stop = self._check_stop(seq, token)
        if reason is not None:
            out.finish_reason, out.stop_reason = reason, stop
            seq.finish_reason, seq.stop_reason = reason, stop
            self.scheduler.finish(seq, reason)
            del self.requests[seq.request_id]
        return out

    def _check_stop(self, seq: Sequence, token: int) -> tuple[str | None, int | None]:
        p = seq.params
        past_min = seq.num_output_tokens >= p.min_tokens
        if past_min and not p.ignore_eos and token in self.eos_token_ids:
            return "stop", None
        if past_min and token in p.stop_token_ids:
            return "stop", token
        max_tokens = p.max_tokens if p.max_tokens is not None else self.config.max_model_len
        if seq.num_output_tokens >= max_tokens or len(seq) >= self.config.max_model_len:
            return "length", None
        return None, None

    def _inject(self, where: str, seqs: list[Sequence]) -> None:
        token = self._faults.get(where)
        if token is not None and any(s.token_ids[0] == token for s in seqs):
            raise RuntimeError(f"injected {where} fault (PAGEDBENCH_TEST_FAULTS)")

    def shutdown(self) -> None:
        """Free the device memory; the core cannot step afterwards."""
        self._pending = None
        self.runner.release()

    # ---------------------------------------------------------------- stats
    def get_stats(self) -> EngineStats:
        bm = self.block_manager
        return EngineStats(
            num_running=len(self.scheduler.running), num_waiting=len(self.scheduler.waiting),
            kv_cache_usage=bm.usage(), num_gpu_blocks=bm.num_blocks,
            num_preemptions_total=self.scheduler.num_preemptions, prefix_cache_queries_total=bm.prefix_queries,
            prefix_cache_hits_total=bm.prefix_hits, prompt_tokens_total=self._counters["prompt_tokens"],
            generation_tokens_total=self._counters["generation_tokens"], num_steps_total=self._counters["steps"],
            scheduled_tokens_total=self._counters["scheduled_tokens"])


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
