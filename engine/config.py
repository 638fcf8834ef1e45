"""EngineConfig: every engine setting, built once from Python or CLI arguments and passed down explicitly."""
from __future__ import annotations

import functools
import logging
from dataclasses import dataclass, field, fields
from typing import Any

import torch

GiB = 1 << 30

# Options whose capability has not landed yet. They are accepted by name (so vLLM code and
# command lines parse) and refused with a clear error when set to anything but the default.
NOT_YET_SUPPORTED = {
    "quantization": (None, "AWQ/GPTQ 4-bit weights"),
    "speculative_model": (None, "speculative decoding"),
    "speculative_config": (None, "speculative decoding"),
    "num_speculative_tokens": (None, "speculative decoding"),
    "tensor_parallel_size": (1, "tensor parallelism"),
    "pipeline_parallel_size": (1, "pipeline parallelism"),
}

DTYPES = {"float16": torch.float16, "half": torch.float16, "bfloat16": torch.bfloat16,
          "float32": torch.float32, "float": torch.float32}


MAX_LORA_RANK = 512


class ConfigError(ValueError):
    """A setting that cannot work; the message says which one and why."""


@dataclass
class EngineConfig:
    model: str
    tokenizer: str | None = None
    served_model_name: str | None = None
    dtype: str = "auto"
    seed: int = 0
    device: str = "auto"  # auto | cuda | cpu
    load_format: str = "auto"  # auto | safetensors | dummy
    gpu_memory_utilization: float = 0.9
    kv_cache_memory: int | None = None  # bytes; sizes the KV cache directly (the CPU default is 1 GiB)
    num_gpu_blocks_override: int | None = None
    block_size: int = 16
    max_model_len: int | None = None
    max_num_seqs: int = 256
    max_num_batched_tokens: int | None = None
    enable_prefix_caching: bool = False
    enable_chunked_prefill: bool = True
    enforce_eager: bool = False
    max_seq_len_to_capture: int = 8192
    max_logprobs: int = 20
    # The periodic stats line (engine/stat_logger.py): off offline, as in vLLM's LLM; the server turns it on
    # unless --disable-log-stats.
    disable_log_stats: bool = True
    # vLLM's switch for a checkpoint's own Python code. Accepted so vLLM code runs; it changes nothing
    # here (every architecture is built in) and says so once in the log.
    trust_remote_code: bool = False
    # LoRA adapters (vLLM's names): GPU slots (distinct adapters in one step), the largest rank, and
    # the adapters kept read in CPU memory (default: max_loras).
    enable_lora: bool = False
    max_loras: int = 1
    max_lora_rank: int = 16
    max_cpu_loras: int | None = None
    # Not yet supported (see NOT_YET_SUPPORTED).
    quantization: str | None = None
    speculative_model: str | None = None
    speculative_config: dict | None = None
    num_speculative_tokens: int | None = None
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    # Filled in by resolve() from the checkpoint and the device.
    hf_config: Any = field(default=None, repr=False)
    torch_dtype: torch.dtype | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        for name, (default, what) in NOT_YET_SUPPORTED.items():
            if getattr(self, name) != default:
                raise ConfigError(f"{name}={getattr(self, name)!r} is not supported yet: {what} has not landed in "
                                  f"this engine. Leave {name} at its default ({default!r}).")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ConfigError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        if self.block_size not in (8, 16, 32, 64, 128):
            raise ConfigError(f"block_size must be one of 8, 16, 32, 64, 128, got {self.block_size}")
        if self.max_num_seqs < 1:
            raise ConfigError(f"max_num_seqs must be at least 1, got {self.max_num_seqs}")
        if self.dtype not in ("auto", *DTYPES):
            raise ConfigError(f"dtype must be one of auto, {', '.join(DTYPES)}; got {self.dtype!r}")
        if self.load_format not in ("auto", "safetensors", "dummy"):
            raise ConfigError(f"load_format must be auto, safetensors or dummy; got {self.load_format!r}")
        if self.device not in ("auto", "cuda", "cpu"):
            raise ConfigError(f"device must be auto, cuda or cpu; got {self.device!r}")
        self._check_lora()
        if self.trust_remote_code:
            _note_no_remote_code()
        if self.device == "auto":
            self.device = "cuda" if torch.cuda.is_available() else "cpu"
        if self.device == "cuda" and not torch.cuda.is_available():
            raise ConfigError("device='cuda' was asked for but torch sees no CUDA device")

    def _check_lora(self) -> None:
        if self.max_loras < 1:
            raise ConfigError(f"max_loras must be at least 1, got {self.max_loras}")
        if not 1 <= self.max_lora_rank <= MAX_LORA_RANK:
            raise ConfigError(f"max_lora_rank must be in [1, {MAX_LORA_RANK}], got {self.max_lora_rank}")
        if self.max_cpu_loras is None:
            self.max_cpu_loras = self.max_loras
        elif self.max_cpu_loras < self.max_loras:
            raise ConfigError(f"max_cpu_loras ({self.max_cpu_loras}) must be at least max_loras ({self.max_loras})")

    @classmethod
    def field_names(cls) -> set[str]:
        return {f.name for f in fields(cls)} - {"hf_config", "torch_dtype"}

    def resolve(self, hf_config: Any) -> None:
        """Fill in what depends on the checkpoint: dtype, max_model_len, the token budget."""
        self.hf_config = hf_config
        self.torch_dtype = _pick_dtype(self.dtype, hf_config, self.device)
        model_max = int(getattr(hf_config, "max_position_embeddings", 2048) or 2048)
        if self.max_model_len is None:
            self.max_model_len = model_max
        elif self.max_model_len > model_max:
            raise ConfigError(f"max_model_len={self.max_model_len} exceeds the model's max_position_embeddings "
                              f"({model_max})")
        if self.max_model_len < 1:
            raise ConfigError(f"max_model_len must be positive, got {self.max_model_len}")
        if self.max_num_batched_tokens is None:
            self.max_num_batched_tokens = 8192 if self.enable_chunked_prefill else max(8192, self.max_model_len)
        if not self.enable_chunked_prefill and self.max_num_batched_tokens < self.max_model_len:
            raise ConfigError(f"max_num_batched_tokens ({self.max_num_batched_tokens}) is smaller than max_model_len "
                              f"({self.max_model_len}); without chunked prefill a whole prompt must fit in one step. "
                              "Raise max_num_batched_tokens, lower max_model_len, or enable chunked prefill.")
        if self.max_num_batched_tokens < self.max_num_seqs:
            raise ConfigError(f"max_num_batched_tokens ({self.max_num_batched_tokens}) must be at least max_num_seqs "
                              f"({self.max_num_seqs}) so that every running sequence can decode in one step")
        if self.device == "cpu" and self.kv_cache_memory is None and self.num_gpu_blocks_override is None:
            self.kv_cache_memory = 1 * GiB

    @property
    def name(self) -> str:
        return self.served_model_name or self.model


@functools.cache  # once per process, however many configs are built
def _note_no_remote_code() -> None:
    logging.getLogger("engine").warning(
        "trust_remote_code=True has no effect: this engine builds its supported architectures itself and never "
        "runs a checkpoint's own code")


def _pick_dtype(dtype: str, hf_config: Any, device: str) -> torch.dtype:
    if dtype != "auto":
        return DTYPES[dtype]
    if device == "cpu":
        return torch.float32  # half-precision matmuls on CPU are slow and inexact
    ckpt = getattr(hf_config, "torch_dtype", None) or getattr(hf_config, "dtype", None)
    if isinstance(ckpt, str):
        ckpt = DTYPES.get(ckpt)
    if ckpt == torch.float32 or ckpt is None:
        return torch.bfloat16  # as vLLM: float32 checkpoints run in half precision on GPU
    return ckpt
