"""`LLM`: vLLM's offline Python API over an in-process LLMEngine."""
from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Sequence as SequenceABC
from typing import Any

from tqdm.auto import tqdm

from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from engine.lora.request import LoRARequest
from engine.outputs import RequestOutput
from engine.sampling_params import RequestOutputKind, SamplingParams

PromptType = str | list[int] | dict[str, Any]


class LLM:
    """LLM(model=DIR_OR_PRESET, dtype=..., seed=..., gpu_memory_utilization=..., ...): every keyword of
    EngineConfig; unknown keywords are an error, not silently dropped."""

    def __init__(self, model: str, **kwargs: Any):
        unknown = set(kwargs) - EngineConfig.field_names()
        if unknown:
            raise TypeError(f"LLM() got unknown argument(s): {', '.join(sorted(unknown))}")
        self.llm_engine = LLMEngine(EngineConfig(model=str(model), **kwargs))
        self._ids = itertools.count()

    def get_tokenizer(self):
        return self.llm_engine.tokenizer

    def generate(self, prompts: PromptType | list[PromptType],
                 sampling_params: SamplingParams | list[SamplingParams] | None = None,
                 use_tqdm: bool = True,
                 lora_request: LoRARequest | list[LoRARequest | None] | None = None) -> list[RequestOutput]:
        """`lora_request`: one adapter for every prompt, or one per prompt (None: the base model)."""
        prompts = self._as_list(prompts)
        params = self._params_for(prompts, sampling_params)
        loras = self._loras_for(prompts, lora_request)
        request_ids = []
        try:
            for prompt, p, lora in zip(prompts, params, loras):
                request_id = str(next(self._ids))
                text, token_ids = self._prompt_input(prompt)
                self.llm_engine.add_request(request_id, text if text is not None else token_ids, p,
                                            prompt_token_ids=token_ids, lora_request=lora)
                request_ids.append(request_id)
        except BaseException:  # a bad prompt or adapter: nothing of this call stays queued
            self.llm_engine.abort_request(request_ids)
            raise
        return self._run(request_ids, use_tqdm)

    def chat(self, messages: list[dict] | list[list[dict]], sampling_params: SamplingParams | list | None = None,
             use_tqdm: bool = True, chat_template: str | None = None, add_generation_prompt: bool = True,
             continue_final_message: bool = False,
             lora_request: LoRARequest | list[LoRARequest | None] | None = None) -> list[RequestOutput]:
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        tokenizer = self.get_tokenizer()
        prompts = []
        for conversation in conversations:
            # The template writes the special tokens itself, so the text is encoded without adding more.
            text = tokenizer.apply_chat_template(conversation, tokenize=False, chat_template=chat_template,
                                                 add_generation_prompt=add_generation_prompt,
                                                 continue_final_message=continue_final_message)
            prompts.append({"prompt": text,
                            "prompt_token_ids": tokenizer.encode(text, add_special_tokens=False)})
        return self.generate(prompts, sampling_params, use_tqdm=use_tqdm, lora_request=lora_request)

    # ---------------------------------------------------------------- helpers
    @staticmethod
    def _as_list(prompts) -> list[PromptType]:
        if isinstance(prompts, (str, dict)):
            return [prompts]
        if isinstance(prompts, SequenceABC) and prompts and isinstance(prompts[0], int):
            return [list(prompts)]  # one prompt given as token ids
        return list(prompts)

    @staticmethod
    def _params_for(prompts: list, sampling_params) -> list[SamplingParams]:
        if sampling_params is None:
            sampling_params = SamplingParams()
        if isinstance(sampling_params, SamplingParams):
            sampling_params = [sampling_params] * len(prompts)
        if len(sampling_params) != len(prompts):
            raise ValueError(f"got {len(sampling_params)} SamplingParams for {len(prompts)} prompts")
        # Offline generation returns final outputs only (as vLLM's LLM does).
        return [dataclasses.replace(p, output_kind=RequestOutputKind.FINAL_ONLY) for p in sampling_params]

    @staticmethod
    def _loras_for(prompts: list, lora_request) -> list[LoRARequest | None]:
        if lora_request is None or isinstance(lora_request, LoRARequest):
            return [lora_request] * len(prompts)
        loras = list(lora_request)
        if len(loras) != len(prompts):
            raise ValueError(f"got {len(loras)} LoRA requests for {len(prompts)} prompts")
        bad = [type(x).__name__ for x in loras if x is not None and not isinstance(x, LoRARequest)]
        if bad:
            raise TypeError(f"lora_request entries must be LoRARequest or None, got {bad[0]}")
        return loras

    @staticmethod
    def _prompt_input(prompt: PromptType) -> tuple[str | None, list[int] | None]:
        """(text, token ids) of one prompt; either may be None (text is then encoded by the engine)."""
        if isinstance(prompt, dict):
            if "prompt_token_ids" not in prompt and "prompt" not in prompt:
                raise ValueError("a prompt dict needs 'prompt' or 'prompt_token_ids'")
            ids = prompt.get("prompt_token_ids")
            return prompt.get("prompt"), (list(ids) if ids is not None else None)
        if isinstance(prompt, str):
            return prompt, None
        return None, list(prompt)

    def _run(self, request_ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        engine = self.llm_engine
        finished: dict[str, RequestOutput] = {}
        wanted = set(request_ids)
        bar = tqdm(total=len(request_ids), desc="Processed prompts", disable=not use_tqdm, dynamic_ncols=True)
        try:
            while len(finished) < len(request_ids) and engine.has_unfinished_requests():
                for out in engine.step():
                    if out.finished and out.request_id in wanted:
                        finished[out.request_id] = out
                        bar.update(1)
        except BaseException:
            engine.abort_request([r for r in request_ids if r not in finished])
            raise
        finally:
            bar.close()
        return [finished[r] for r in request_ids]
