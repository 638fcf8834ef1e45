"""vLLM's LoRARequest: which adapter a request runs under. Plain data (msgspec), so that it travels
with a request to the engine core process; the core loads the adapter from `lora_path` the first
time it sees `lora_int_id` (and again if its caches evicted it)."""
from __future__ import annotations

import msgspec


class LoRAError(ValueError):
    """An adapter that cannot be used (missing files, wrong shapes, unsupported options); the message
    names the adapter and what is wrong."""


class LoRARequest(msgspec.Struct, frozen=True, array_like=True, omit_defaults=True):
    lora_name: str
    lora_int_id: int  # unique per adapter, >= 1 (0 means the base model)
    lora_path: str = ""
    base_model_name: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.lora_int_id, int) or self.lora_int_id < 1:
            raise ValueError(f"lora_int_id must be an integer >= 1, got {self.lora_int_id!r}")
        if not self.lora_name:
            raise ValueError("lora_name must not be empty")

    @property
    def adapter_id(self) -> int:
        return self.lora_int_id

    @property
    def name(self) -> str:
        return self.lora_name
