"""Runtime LoRA adapters: POST /v1/load_lora_adapter and /v1/unload_lora_adapter (vLLM's bodies and
answers). vLLM serves them only when VLLM_ALLOW_RUNTIME_LORA_UPDATING is true, since anyone who can
reach them can make the server read a path; so do we, behind the API key."""
from __future__ import annotations

import os

from fastapi.responses import PlainTextResponse

from engine.server.protocol import LoadLoRAAdapterRequest, OpenAIError, UnloadLoRAAdapterRequest
from engine.server.serving_common import OpenAIServing

ENV_FLAG = "VLLM_ALLOW_RUNTIME_LORA_UPDATING"


def runtime_updates_allowed(environ=os.environ) -> bool:
    return environ.get(ENV_FLAG, "").strip().lower() in ("1", "true")


def _check_enabled(serving: OpenAIServing) -> None:
    if not serving.client.info.enable_lora:
        raise OpenAIError("LoRA is not enabled: start the server with --enable-lora", 400)


def _raise_for(result) -> None:
    if result.error is not None:
        raise OpenAIError(result.error, result.status,
                          err_type="NotFoundError" if result.status == 404 else "invalid_request_error",
                          param="lora_name" if result.status == 404 else None)


async def load_lora_adapter(serving: OpenAIServing, req: LoadLoRAAdapterRequest) -> PlainTextResponse:
    _check_enabled(serving)
    if req.lora_name == serving.model_name:
        raise OpenAIError(f"lora_name {req.lora_name!r} is the base model's name; choose another", 400,
                          param="lora_name")
    _raise_for(await serving.client.load_lora(req.lora_name, req.lora_path, req.load_inplace))
    return PlainTextResponse(f"Success: LoRA adapter '{req.lora_name}' added successfully.")


async def unload_lora_adapter(serving: OpenAIServing, req: UnloadLoRAAdapterRequest) -> PlainTextResponse:
    _check_enabled(serving)
    known = serving.client.adapters.get(req.lora_name)
    if known is not None and req.lora_int_id is not None and req.lora_int_id != known.lora_int_id:
        raise OpenAIError(f"The lora adapter '{req.lora_name}' has lora_int_id {known.lora_int_id}, not "
                          f"{req.lora_int_id}.", 404, param="lora_int_id", err_type="NotFoundError")
    _raise_for(await serving.client.unload_lora(req.lora_name))
    return PlainTextResponse(f"Success: LoRA adapter '{req.lora_name}' removed successfully.")
