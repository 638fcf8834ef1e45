"""LLMEngine: requests in, one scheduler step at a time, RequestOutputs out."""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

from engine.block_manager import BlockManager
from engine.config import EngineConfig
from engine.detokenizer import IncrementalDetokenizer
from engine.model_loader import build_model, load_hf_config, load_tokenizer
from engine.model_runner import ModelRunner
from engine.outputs import CompletionOutput, Logprob, RequestMetrics, RequestOutput
from engine.presets import resolve_model
from engine.sampler import PendingSample, Sampler, SampleResult, SamplingBatch, make_generator
from engine.sampling_params import RequestOutputKind, SamplingParams
from engine.scheduler import Scheduler
from engine.sequence import Sequence

log = logging.getLogger("engine")


PENDING_TOKEN = -1  # a sampled token still on the device (see LLMEngine.step)


@dataclass
class PendingStep:
    """The step whose sampled tokens the host has not read yet."""
    seqs: list[Sequence]  # the sampled sequences, in the rows of `sample`
    sample: PendingSample


@dataclass
class EngineStats:
    num_running: int
    num_waiting: int
    kv_cache_usage: float
    num_gpu_blocks: int
    num_preemptions_total: int
    prefix_cache_queries_total: int
    prefix_cache_hits_total: int
    prompt_tokens_total: int
    generation_tokens_total: int
    num_steps_total: int
    scheduled_tokens_total: int


class Request:
    """A prompt and its n samples (one Sequence each)."""

    def __init__(self, request_id: str, prompt: str | None, prompt_token_ids: list[int], params: SamplingParams,
                 arrival_time: float):
        self.request_id = request_id
        self.prompt = prompt
        self.prompt_token_ids = prompt_token_ids
        self.params = params
        self.seqs: list[Sequence] = []
        self.metrics = RequestMetrics(arrival_time=arrival_time)
        self.counted_prompt = False

    @property
    def finished(self) -> bool:
        seqs = self.seqs
        return seqs[0].is_finished if len(seqs) == 1 else all(s.is_finished for s in seqs)


class LLMEngine:
    def __init__(self, config: EngineConfig):
        start = time.perf_counter()
        self.model_dir = resolve_model(config.model, with_weights=config.load_format != "dummy")
        hf_config = load_hf_config(self.model_dir)
        config.resolve(hf_config)
        self.config = config
        self.model_name = config.served_model_name or config.model
        self.tokenizer = load_tokenizer(self.model_dir if config.tokenizer is None
                                        else resolve_model(config.tokenizer, with_weights=False))
        self.eos_token_ids = self._eos_token_ids()
        self.device = torch.device(config.device)
        torch.manual_seed(config.seed)
        model = build_model(hf_config, config.torch_dtype, self.device, self.model_dir, config.load_format,
                            config.seed)
        self.runner = ModelRunner(config, model, self.device)
        self.block_manager = BlockManager(self.runner.num_blocks, config.block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(config, self.block_manager)
        self.sampler = Sampler(config.seed, self.device)
        self.requests: dict[str, Request] = {}
        self._aborted_outputs: list[RequestOutput] = []
        self._pending: PendingStep | None = None
        self._counters = {"prompt_tokens": 0, "generation_tokens": 0, "steps": 0, "scheduled_tokens": 0}
        log.info("engine ready in %.1f s: %s on %s, dtype %s, max_model_len %d, %d KV blocks, max_num_seqs %d, "
                 "max_num_batched_tokens %d, prefix caching %s, chunked prefill %s, CUDA graphs %s",
                 time.perf_counter() - start, self.model_dir, self.device, config.torch_dtype, config.max_model_len,
                 self.runner.num_blocks, config.max_num_seqs, config.max_num_batched_tokens,
                 config.enable_prefix_caching, config.enable_chunked_prefill, bool(self.runner.graphs))

    def _eos_token_ids(self) -> set[int]:
        ids = set()
        if self.tokenizer.eos_token_id is not None:
            ids.add(self.tokenizer.eos_token_id)
        gen_file = self.model_dir / "generation_config.json"
        if gen_file.is_file():
            import json

            eos = json.loads(gen_file.read_text()).get("eos_token_id")
            ids.update(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        return ids

    # ---------------------------------------------------------------- requests
    def add_request(self, request_id: str, prompt: str | list[int], params: SamplingParams,
                    arrival_time: float | None = None, prompt_token_ids: list[int] | None = None) -> None:
        """`prompt` is text (encoded here) or token ids. Give both text and `prompt_token_ids` to keep
        the text for the output while using ids that were encoded elsewhere (chat templates)."""
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        if prompt_token_ids is not None:
            text, token_ids = (prompt if isinstance(prompt, str) else None), list(prompt_token_ids)
        elif isinstance(prompt, str):
            text, token_ids = prompt, self.tokenizer.encode(prompt)
        else:
            text, token_ids = None, list(prompt)
        self._validate(token_ids, params)
        request = Request(request_id, text, token_ids, params, arrival_time or time.monotonic())
        for index in range(params.n):
            seed = None if params.seed is None else params.seed + index
            generator = None if seed is None else make_generator(seed, self.device)
            detok = IncrementalDetokenizer(self.tokenizer, token_ids, skip_special_tokens=params.skip_special_tokens,
                                           stop=params.stop_list,
                                           include_stop_str_in_output=params.include_stop_str_in_output)
            seq = Sequence(request_id, index, token_ids, params, request.metrics.arrival_time, generator, detok)
            request.seqs.append(seq)
            self.scheduler.add(seq)
        self.requests[request_id] = request

    def _validate(self, token_ids: list[int], params: SamplingParams) -> None:
        if not token_ids:
            raise ValueError("the prompt is empty: give at least one token")
        vocab = self.config.hf_config.vocab_size
        if min(token_ids) < 0 or max(token_ids) >= vocab:
            raise ValueError(f"prompt token ids must be in [0, {vocab}); got {min(token_ids)}..{max(token_ids)}")
        if len(token_ids) >= self.config.max_model_len:
            raise ValueError(f"the prompt has {len(token_ids)} tokens; max_model_len is {self.config.max_model_len}, "
                             "which must leave room for at least one generated token")
        if params.logprobs is not None and params.logprobs > self.config.max_logprobs:
            raise ValueError(f"logprobs={params.logprobs} exceeds max_logprobs ({self.config.max_logprobs})")
        if params.prompt_logprobs is not None:
            raise ValueError("prompt_logprobs is not supported by this engine yet")

    def abort_request(self, request_id: str | list[str]) -> None:
        for rid in [request_id] if isinstance(request_id, str) else request_id:
            request = self.requests.pop(rid, None)
            if request is None:
                continue
            for seq in request.seqs:
                if seq.pending_row is not None:  # its in-flight token is dropped with it
                    seq.token_ids.pop()
                    seq.pending_row = None
                if not seq.is_finished:
                    self.scheduler.finish(seq, "abort")
            request.metrics.finished_time = time.monotonic()
            self._aborted_outputs.append(self._output(request))

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests) or bool(self._aborted_outputs)

    # ---------------------------------------------------------------- the step
    def step(self) -> list[RequestOutput]:
        """Schedule and launch this step, then finish the previous one on the host while the device
        computes: its tokens are appended, stops checked and outputs built one step late. A running
        sequence whose token is still on the device holds a placeholder (-1) as its newest token;
        its next decode input is gathered from the device tensor, so the host never waits."""
        outputs, self._aborted_outputs = self._aborted_outputs, []
        batch = self.scheduler.schedule()
        if not batch:
            return outputs + self._finish_pending()
        prev = self._pending
        inputs, logits = self.runner.run(batch, prev.sample.tokens if prev else None)
        self._counters["steps"] += 1
        self._counters["scheduled_tokens"] += batch.num_tokens
        for seq, n in zip(batch.seqs, batch.num_new_tokens):
            seq.num_computed_tokens += n
        outputs += self._finish_pending()  # overlaps this step's device work
        # Rows of sequences that the previous step finished were computed for nothing; drop them.
        if inputs.sampled:
            sample = self.sampler(logits, self._sampling_batch(inputs.sampled))
            for i, seq in enumerate(inputs.sampled):
                if not seq.is_finished:
                    seq.append_token(PENDING_TOKEN)
                    seq.pending_row = i
            self._pending = PendingStep(inputs.sampled, sample)
        return outputs

    def _finish_pending(self) -> list[RequestOutput]:
        """Append the in-flight step's tokens (waiting for its device work if need be), check stops,
        and return the outputs it produced."""
        pending, self._pending = self._pending, None
        if pending is None:
            return []
        result = pending.sample.result()
        now = time.monotonic()
        touched: dict[str, Request] = {}
        for i, seq in enumerate(pending.seqs):
            if seq.pending_row is None:  # finished or aborted since it was scheduled
                continue
            seq.pending_row = None
            request = touched[seq.request_id] = self.requests[seq.request_id]
            self._append(request, seq, i, result, now)
        outputs = []
        for request in touched.values():
            if request.finished or request.params.output_kind != RequestOutputKind.FINAL_ONLY:
                outputs.append(self._output(request))
            if request.finished:
                request.metrics.finished_time = now
                del self.requests[request.request_id]
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

    def _append(self, request: Request, seq: Sequence, row: int, result: SampleResult, now: float) -> None:
        token = result.token_ids[row]
        seq.token_ids[-1] = token  # in place of the placeholder
        self._counters["generation_tokens"] += 1
        metrics = request.metrics
        if metrics.first_token_time is None:
            metrics.first_token_time = now
            metrics.first_scheduled_time = seq.first_scheduled_time
        metrics.last_token_time = now
        if not request.counted_prompt:
            request.counted_prompt = True
            self._counters["prompt_tokens"] += seq.num_prompt_tokens
        if seq.first_token_time is None:
            seq.first_token_time = now
        if result.logprobs is not None and seq.params.logprobs is not None:
            self._record_logprobs(seq, row, token, result)
        reason, stop = self._check_stop(seq, token)
        if reason is not None:
            seq.stop_reason = stop
            seq.finish_reason = reason
            self.scheduler.finish(seq, reason)

    def _record_logprobs(self, seq: Sequence, row: int, token: int, result: SampleResult) -> None:
        entry = {token: Logprob(result.logprobs[row], result.ranks[row],
                                self.tokenizer.convert_ids_to_tokens(token))}
        for tid, lp in result.top_logprobs[row] or []:
            if tid not in entry:
                entry[tid] = Logprob(lp, None, self.tokenizer.convert_ids_to_tokens(tid))
        ranked = sorted((t for t in entry if t != token), key=lambda t: -entry[t].logprob)
        for rank, tid in enumerate(ranked, start=1):
            entry[tid].rank = rank
        seq.logprobs.append(entry)
        seq.cumulative_logprob += result.logprobs[row]

    def _check_stop(self, seq: Sequence, token: int) -> tuple[str | None, int | str | None]:
        p = seq.params
        past_min = seq.num_output_tokens >= p.min_tokens
        if past_min and not p.ignore_eos and token in self.eos_token_ids:
            seq.stopped_on_token = True
            return "stop", None
        if past_min and token in p.stop_token_ids:
            seq.stopped_on_token = True
            return "stop", token
        if self._detokenize_each_step(seq):
            stop_str = seq.detokenizer.append([token])
            if past_min and stop_str is not None:
                return "stop", stop_str
        max_tokens = p.max_tokens if p.max_tokens is not None else self.config.max_model_len
        if seq.num_output_tokens >= max_tokens or len(seq) >= self.config.max_model_len:
            return "length", None
        return None, None

    @staticmethod
    def _detokenize_each_step(seq: Sequence) -> bool:
        """Text is needed every step to find stop strings or to stream it; otherwise (offline runs)
        the output is decoded once when it is returned, which keeps the per-step host cost flat."""
        return bool(seq.params.stop_list) or seq.params.output_kind != RequestOutputKind.FINAL_ONLY

    def _output(self, request: Request) -> RequestOutput:
        completions = []
        for seq in request.seqs:
            finished = seq.is_finished
            if not self._detokenize_each_step(seq):
                end = seq.num_output_tokens - (1 if seq.stopped_on_token else 0)  # as vLLM: no stop-token text
                seq.detokenizer.append(seq.output_token_ids[seq.detokenized_tokens:end])
                seq.detokenized_tokens = end
            completions.append(CompletionOutput(
                index=seq.index, text=seq.detokenizer.stable_text(finished), token_ids=seq.output_token_ids,
                cumulative_logprob=seq.cumulative_logprob if seq.params.logprobs is not None else None,
                logprobs=list(seq.logprobs) if seq.params.logprobs is not None else None,
                finish_reason=seq.finish_reason, stop_reason=seq.stop_reason))
        return RequestOutput(request_id=request.request_id, prompt=request.prompt,
                             prompt_token_ids=request.prompt_token_ids, outputs=completions,
                             finished=request.finished, num_cached_tokens=request.seqs[0].num_cached_tokens,
                             metrics=request.metrics)

    def shutdown(self) -> None:
        """Free the device memory; the engine cannot step afterwards."""
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
