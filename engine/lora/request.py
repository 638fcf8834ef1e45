"""vLLM's LoRARequest: which adapter a request runs under. Plain data (msgspec), so that it travels
with a request to the engine core process; the core loads the adapter from `lora_path` the first
time it sees `lora_int_id` (and again if its caches evicted it)."""
from __future__ import annotations

import msgspec


class LoRAError(ValueError):
    """An adapter that cannot be used (missing files, wrong shapes, unsupported options), or a name that
    is not registered; the message names the adapter and what is wrong. `status`: the HTTP status the
    server answers with (400, or 404 for an unknown name)."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


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


class LoRAModulePath(msgspec.Struct, frozen=True):
    """One --lora-modules entry (vLLM's): `name=path`, or JSON {"name", "path", "base_model_name"}."""
    name: str
    path: str
    base_model_name: str | None = None


def parse_lora_module(text: str) -> LoRAModulePath:
    """vLLM's two forms; ValueError naming what is wrong."""
    import json

    text = text.strip()
    if "=" in text and not text.startswith("{"):
        name, _, path = text.partition("=")
        if not name or not path:
            raise ValueError(f"--lora-modules {text!r}: expected NAME=PATH")
        return LoRAModulePath(name, path)
    try:
        fields = json.loads(text)
    except json.JSONDecodeError:
        raise ValueError(f"--lora-modules {text!r}: neither NAME=PATH nor JSON") from None
    if not isinstance(fields, dict):
        raise ValueError(f"--lora-modules {text!r}: the JSON form is an object with name, path, base_model_name")
    unknown = set(fields) - {"name", "path", "base_model_name"}
    missing = {"name", "path"} - set(fields)
    if unknown or missing:
        raise ValueError(f"--lora-modules {text!r}: " + (f"unknown field(s) {', '.join(sorted(unknown))}" if unknown
                                                            else f"missing {', '.join(sorted(missing))}"))
    if not all(isinstance(fields.get(k), str) for k in ("name", "path")):
        raise ValueError(f"--lora-modules {text!r}: name and path must be strings")
    return LoRAModulePath(fields["name"], fields["path"], fields.get("base_model_name"))
