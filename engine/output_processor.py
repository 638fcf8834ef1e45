"""The front end's half of a request: n-sample fan-out, incremental detokenizing, stop strings,
logprob tokens, request timings and RequestOutputs, from the engine core's token-id outputs.

It runs wherever the user is: in-process for the offline LLMEngine, in each API server process
when serving. A stop string is found here, so the finished sequence must also be aborted in the
core: `process` returns those ids (the core may already have computed a token or two beyond it;
they are dropped).
"""
from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass, field

from engine.detokenizer import IncrementalDetokenizer
from engine.messages import CoreOutput, CoreRequest
from engine.outputs import CompletionOutput, Logprob, RequestMetrics, RequestOutput
from engine.sampling_params import RequestOutputKind, SamplingParams

log = logging.getLogger("engine")


@dataclass
class SampleState:
    """One of a request's n samples, as the front end sees it."""
    index: int
    token_ids: list[int] = field(default_factory=list)
    detokenizer: IncrementalDetokenizer | None = None
    detokenized_tokens: int = 0  # tokens handed to the detokenizer (offline runs decode at the end)
    stopped_on_token: bool = False  # EOS or a stop token id: its text is not shown (as vLLM)
    logprobs: list[dict[int, Logprob]] | None = None
    cumulative_logprob: float = 0.0
    finish_reason: str | None = None
    stop_reason: int | str | None = None


@dataclass
class RequestState:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    samples: list[SampleState]
    metrics: RequestMetrics
    num_cached_tokens: int = 0
    error: str | None = None  # set when the core failed the request
    prompt_logprobs: list[dict[int, Logprob] | None] | None = None  # vLLM's shape: None at position 0
    num_unfinished: int = 0  # samples without a finish reason (kept by finish_sample)
    # Text is needed every step to find stop strings or to stream it; otherwise (offline runs) the
    # output is decoded once when it is returned, which keeps the per-step host cost flat.
    streams_text: bool = True

    @property
    def finished(self) -> bool:
        return self.num_unfinished == 0

    def finish_sample(self, sample: SampleState, reason: str, stop: int | str | None = None) -> None:
        if sample.finish_reason is None:
            sample.finish_reason, sample.stop_reason = reason, stop
            self.num_unfinished -= 1


@dataclass
class ProcessedOutputs:
    touched: list[RequestState]  # requests that changed this step, in first-touched order
    to_abort: list[str]  # core request ids finished here (stop strings) that the core must drop
    finished: list[RequestState]  # requests that finished this step (every sample done)


class OutputProcessor:
    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.requests: dict[str, RequestState] = {}
        self._children: dict[str, tuple[RequestState, SampleState]] = {}  # core request id -> sample

    def add_request(self, request_id: str, prompt: str | None, prompt_token_ids: list[int], params: SamplingParams,
                    arrival_time: float, client_index: int = 0) -> list[CoreRequest]:
        """Track a request; returns the core requests to send (one per sample)."""
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        state = RequestState(request_id, prompt, prompt_token_ids, params, [], RequestMetrics(arrival_time),
                             num_unfinished=params.n, streams_text=bool(params.stop_list)
                             or params.output_kind != RequestOutputKind.FINAL_ONLY)
        core_requests = []
        for index in range(params.n):
            sample = SampleState(index, logprobs=[] if params.logprobs is not None else None)
            sample.detokenizer = IncrementalDetokenizer(
                self.tokenizer, prompt_token_ids, skip_special_tokens=params.skip_special_tokens,
                stop=params.stop_list, include_stop_str_in_output=params.include_stop_str_in_output)
            state.samples.append(sample)
            child_id = self.child_id(request_id, index, params.n)
            child = dataclasses.replace(params, n=1, seed=None if params.seed is None else params.seed + index)
            core_requests.append(CoreRequest.from_params(child_id, prompt_token_ids, child, arrival_time,
                                                         client_index))
            self._children[child_id] = (state, sample)
        self.requests[request_id] = state
        return core_requests

    @staticmethod
    def child_id(request_id: str, index: int, n: int) -> str:
        return request_id if n == 1 else f"{request_id}#{index}"

    def child_ids(self, request_id: str) -> list[str]:
        state = self.requests.get(request_id)
        if state is None:
            return []
        n = len(state.samples)
        return [self.child_id(request_id, s.index, n) for s in state.samples if s.finish_reason is None]

    def abort(self, request_id: str) -> RequestState | None:
        """Forget a request (the caller aborts its core requests); returns its final state."""
        state = self.requests.pop(request_id, None)
        if state is None:
            return None
        now = time.monotonic()
        for sample in state.samples:
            self._children.pop(self.child_id(request_id, sample.index, len(state.samples)), None)
            state.finish_sample(sample, "abort")
        state.metrics.finished_time = now
        return state

    def process(self, outputs: list[CoreOutput]) -> ProcessedOutputs:
        """One step's core outputs, in one pass (the per-output work is kept to a few attribute
        writes: an API process folds tens of thousands of them a second)."""
        now = time.monotonic()
        touched: dict[str, RequestState] = {}
        to_abort: list[str] = []
        finished: list[RequestState] = []
        children = self._children
        for out in outputs:
            entry = children.get(out.request_id)
            if entry is None:
                continue  # aborted here already; the core's last tokens for it are dropped
            state, sample = entry
            touched[state.request_id] = state
            try:
                stopped_here = self._apply(state, sample, out, now)
            except Exception as exc:  # detokenizing one request failed: it alone ends, with the error
                log.exception("output processing failed for request %s", state.request_id)
                state.error = f"{type(exc).__name__}: {exc}"
                stopped_here = out.finish_reason is None and sample.finish_reason is None
                state.finish_sample(sample, "error")
            if stopped_here:
                to_abort.append(out.request_id)
            if sample.finish_reason is not None:
                del children[out.request_id]
                if state.finished:
                    state.metrics.finished_time = now
                    del self.requests[state.request_id]
                    finished.append(state)
        return ProcessedOutputs(list(touched.values()), to_abort, finished)

    def _apply(self, state: RequestState, sample: SampleState, out: CoreOutput, now: float) -> bool:
        """Fold one core output into its sample; True if a stop string finished it here."""
        if out.error is not None:
            state.error = out.error
        if out.prompt_logprobs is not None and state.prompt_logprobs is None:  # n samples score it n times
            state.prompt_logprobs = self._prompt_logprobs(state.prompt_token_ids, out.prompt_logprobs)
        new_ids = out.new_token_ids
        if new_ids:
            metrics = state.metrics
            if metrics.first_token_time is None:
                metrics.first_token_time = now
                state.num_cached_tokens = out.num_cached_tokens
            metrics.last_token_time = now
            sample.token_ids += new_ids
            if out.logprobs is not None and sample.logprobs is not None:
                self._record_logprobs(sample, out)
        reason = out.finish_reason
        if reason is not None:
            if reason == "stop" and new_ids:
                sample.stopped_on_token = True  # EOS or a stop token id
            state.finish_sample(sample, reason, out.stop_reason)
        if state.streams_text and new_ids:
            stop = sample.detokenizer.append(new_ids[:-1] if sample.stopped_on_token else new_ids)
            sample.detokenized_tokens = len(sample.token_ids)
            if stop is not None and sample.finish_reason is None:
                state.finish_sample(sample, "stop", stop)
                return True
        return False

    def _record_logprobs(self, sample: SampleState, out: CoreOutput) -> None:
        convert = self.tokenizer.convert_ids_to_tokens
        for token, lp in zip(out.new_token_ids, out.logprobs):
            entry = {token: Logprob(lp.logprob, lp.rank, convert(token))}
            for tid, value in zip(lp.top_ids, lp.top_logprobs):
                if tid not in entry:
                    entry[tid] = Logprob(value, None, convert(tid))
            ranked = sorted((t for t in entry if t != token), key=lambda t: -entry[t].logprob)
            for rank, tid in enumerate(ranked, start=1):
                entry[tid].rank = rank
            sample.logprobs.append(entry)
            sample.cumulative_logprob += lp.logprob

    def _prompt_logprobs(self, prompt_ids: list[int], scored: list) -> list[dict[int, Logprob] | None]:
        """vLLM's prompt_logprobs: None for the first token, then for each prompt token a dict of it
        (with its rank in the distribution) and the top-N (ranks 1..N), each with its decoded text."""
        decode = lambda tid: self.tokenizer.decode([tid])  # noqa: E731  (as vLLM: each token alone)
        result: list[dict[int, Logprob] | None] = [None]
        for token, lp in zip(prompt_ids[1:], scored):
            entry = {token: Logprob(lp.logprob, lp.rank, decode(token))}  # first, as vLLM orders them
            for rank, (tid, value) in enumerate(zip(lp.top_ids, lp.top_logprobs), start=1):
                entry.setdefault(tid, Logprob(value, rank, decode(tid)))
            result.append(entry)
        return result

    # ---------------------------------------------------------------- outputs
    def make_output(self, state: RequestState) -> RequestOutput:
        completions = []
        for sample in state.samples:
            finished = sample.finish_reason is not None
            if not state.streams_text:
                end = len(sample.token_ids) - (1 if sample.stopped_on_token else 0)
                sample.detokenizer.append(sample.token_ids[sample.detokenized_tokens:end])
                sample.detokenized_tokens = max(end, sample.detokenized_tokens)
            completions.append(CompletionOutput(
                index=sample.index, text=sample.detokenizer.stable_text(finished), token_ids=list(sample.token_ids),
                cumulative_logprob=sample.cumulative_logprob if sample.logprobs is not None else None,
                logprobs=list(sample.logprobs) if sample.logprobs is not None else None,
                finish_reason=sample.finish_reason, stop_reason=sample.stop_reason))
        return RequestOutput(request_id=state.request_id, prompt=state.prompt,
                             prompt_token_ids=state.prompt_token_ids, outputs=completions,
                             finished=state.finished, prompt_logprobs=state.prompt_logprobs,
                             num_cached_tokens=state.num_cached_tokens, metrics=state.metrics, error=state.error)
