"""LLMEngine: the engine core and the front end's output processing in one process (offline use).

The served path runs the same EngineCore in its own process (engine/core_process.py) with the
output processing in the API server processes; this class is the in-process pairing of the two.
"""
from __future__ import annotations

import time

from engine.config import EngineConfig
from engine.core import EngineCore
from engine.lora.request import LoRARequest
from engine.messages import EngineStats
from engine.model_loader import load_tokenizer
from engine.output_processor import OutputProcessor
from engine.outputs import RequestOutput
from engine.sampling_params import RequestOutputKind, SamplingParams

__all__ = ["LLMEngine", "EngineStats"]


class LLMEngine:
    def __init__(self, config: EngineConfig):
        self.core = EngineCore(config)
        self.config = config
        self.model_dir = self.core.model_dir
        self.model_name = config.served_model_name or config.model
        self.tokenizer = load_tokenizer(self.core.tokenizer_dir)
        self.processor = OutputProcessor(self.tokenizer)

    # The core's parts, for benchmarks and tests that look inside.
    @property
    def runner(self):
        return self.core.runner

    @property
    def scheduler(self):
        return self.core.scheduler

    @property
    def eos_token_ids(self) -> set[int]:
        return self.core.eos_token_ids

    # ---------------------------------------------------------------- requests
    def add_request(self, request_id: str, prompt: str | list[int], params: SamplingParams,
                    arrival_time: float | None = None, prompt_token_ids: list[int] | None = None,
                    lora_request: LoRARequest | None = None) -> None:
        """`prompt` is text (encoded here) or token ids. Give both text and `prompt_token_ids` to keep
        the text for the output while using ids that were encoded elsewhere (chat templates).
        `lora_request`: the adapter to run under (None: the base model)."""
        if lora_request is not None and not self.config.enable_lora:
            raise ValueError(f"lora_request {lora_request.lora_name!r} given, but LoRA is not enabled: "
                             "pass enable_lora=True")
        if prompt_token_ids is not None:
            text, token_ids = (prompt if isinstance(prompt, str) else None), list(prompt_token_ids)
        elif isinstance(prompt, str):
            text, token_ids = prompt, self.tokenizer.encode(prompt)
        else:
            text, token_ids = None, list(prompt)
        self.core.validate(token_ids, params)
        core_requests = self.processor.add_request(request_id, text, token_ids, params,
                                                   arrival_time or time.monotonic())
        for request in core_requests:
            request.lora = lora_request
        try:
            for request in core_requests:
                self.core.add_request(request)
        except BaseException:  # an adapter that cannot load: the request is not left half-added
            self.abort_request(request_id)
            raise

    def abort_request(self, request_id: str | list[str]) -> None:
        for rid in [request_id] if isinstance(request_id, str) else request_id:
            children = self.processor.child_ids(rid)
            if self.processor.abort(rid) is not None:
                self.core.abort(children)

    def has_unfinished_requests(self) -> bool:
        return bool(self.processor.requests) or self.core.has_unfinished_requests()

    @property
    def requests(self) -> dict:
        return self.processor.requests

    # ---------------------------------------------------------------- the step
    def step(self) -> list[RequestOutput]:
        processed = self.processor.process(self.core.step())
        if processed.to_abort:
            self.core.abort(processed.to_abort)
        final_only = RequestOutputKind.FINAL_ONLY
        outputs = [self.processor.make_output(state) for state in processed.touched
                   if state.finished or state.params.output_kind != final_only]
        self.core.step_timer.lap("frontend")
        self.core.log_stats()  # LLM(..., disable_log_stats=False): the server's periodic line, offline
        return outputs

    def shutdown(self) -> None:
        """Free the device memory; the engine cannot step afterwards."""
        self.core.shutdown()

    def get_stats(self) -> EngineStats:
        return self.core.get_stats()
