"""LoRA adapters: vLLM's LoRARequest, PEFT checkpoints, the CPU cache and GPU slots, and the
per-step token-to-slot mapping that the layers add their adapters' deltas with."""
from engine.lora.request import LoRAError, LoRARequest

__all__ = ["LoRARequest", "LoRAError"]
