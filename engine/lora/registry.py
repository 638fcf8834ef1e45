"""Adapters served by name (--lora-modules, POST /v1/load_lora_adapter): the engine core's registry.

The core, not an API process, owns it and picks the ids, so that with several API processes one
name means one adapter everywhere (the core sends every API process the whole registry after each
change). Loading checks the adapter at once (reading it into the CPU cache), so a bad adapter is
refused when it is registered, never on a request's first step. Unloading only stops new requests:
requests already running under the adapter finish under it (as vLLM).
"""
from __future__ import annotations

from collections.abc import Callable

from engine.lora.request import LoRAError, LoRARequest


class LoRARegistry:
    def __init__(self, check: Callable[[LoRARequest], object], forget: Callable[[int], None]):
        self.check = check  # reads and checks an adapter (raises LoRAError)
        self.forget = forget  # drops an adapter id from the caches
        self.by_name: dict[str, LoRARequest] = {}
        self.next_id = 1

    def load(self, name: str, path: str, base_model_name: str | None = None, load_inplace: bool = False) -> LoRARequest:
        if not name or not path:
            raise LoRAError("Both 'lora_name' and 'lora_path' must be provided.")
        old = self.by_name.get(name)
        if old is not None and not load_inplace:
            raise LoRAError(f"The lora adapter '{name}' has already been loaded.")
        request = LoRARequest(name, self.next_id, path, base_model_name)
        self.check(request)  # raises before anything changes
        self.next_id += 1
        if old is not None:
            self.forget(old.lora_int_id)
        self.by_name[name] = request
        return request

    def unload(self, name: str) -> LoRARequest:
        request = self.by_name.pop(name, None)
        if request is None:
            raise LoRAError(f"The lora adapter '{name}' cannot be found.", status=404)
        self.forget(request.lora_int_id)
        return request

    def adapters(self) -> list[LoRARequest]:
        return list(self.by_name.values())
