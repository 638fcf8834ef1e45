"""EngineConfig: every engine setting, built once from Python or CLI arguments and passed down explicitly."""
from __future__ import annotations

import functools
import logging
from dataclasses import dataclass, field, fields
from typing import Any

import torch

from engine.spec_decode.config import SpecConfigError, SpeculativeConfig, build_speculative_config

GiB = 1 << 30


EXECUTOR_BACKENDS = ("uni", "mp", "ray")  # vLLM's --distributed-executor-backend choices

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
    # Speculative decoding (engine/spec_decode/): vLLM's dict (or JSON text), or its older flags.
    speculative_config: dict | str | None = None
    speculative_model: str | None = None  # "[ngram]" for prompt lookup, else a draft model
    num_speculative_tokens: int | None = None
    ngram_prompt_lookup_max: int | None = None
    ngram_prompt_lookup_min: int | None = None
    # AWQ/GPTQ checkpoints are detected from config.json; when given, this must name the checkpoint's
    # method ("awq", "gptq", or vLLM's aliases "awq_marlin", "gptq_marlin").
    quantization: str | None = None
    # Parallelism (engine/distributed/): tensor-parallel ranks per pipeline stage, pipeline stages, and
    # how the workers run (None: in this process for one rank, worker processes ("mp") for more).
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    distributed_executor_backend: str | None = None
    # Filled in by resolve() from the checkpoint and the device.
    hf_config: Any = field(default=None, repr=False)
    torch_dtype: torch.dtype | None = field(default=None, repr=False)
    quant_config: Any = field(default=None, repr=False)  # engine/quantization/config.py QuantConfig, or None
    # Built by __post_init__ from the speculative settings above (None: off).
    speculative: SpeculativeConfig | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
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
        from engine.quantization.config import normalize_option

        normalize_option(self.quantization)  # a bad name fails before anything loads
        try:
            self.speculative = build_speculative_config(
                self.speculative_config, self.speculative_model, self.num_speculative_tokens,
                self.ngram_prompt_lookup_max, self.ngram_prompt_lookup_min)
        except SpecConfigError as exc:
            raise ConfigError(str(exc)) from None
        if self.device == "auto":
            self.device = "cuda" if torch.cuda.is_available() else "cpu"
        if self.device == "cuda" and not torch.cuda.is_available():
            raise ConfigError("device='cuda' was asked for but torch sees no CUDA device")
        self._check_parallel()

    @property
    def world_size(self) -> int:
        return self.tensor_parallel_size * self.pipeline_parallel_size

    @property
    def executor_backend(self) -> str:
        """'uni' (the worker in this process) or 'mp' (one worker process per rank)."""
        return self.distributed_executor_backend or ("uni" if self.world_size == 1 else "mp")

    def _check_parallel(self) -> None:
        for name in ("tensor_parallel_size", "pipeline_parallel_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        backend = self.distributed_executor_backend
        if backend is not None and backend not in EXECUTOR_BACKENDS:
            raise ConfigError(f"distributed_executor_backend must be one of {', '.join(EXECUTOR_BACKENDS)}; "
                              f"got {backend!r}")
        if backend == "ray":
            raise ConfigError("distributed_executor_backend='ray' needs Ray, which this engine does not drive (and is "
                              "not installed here); use 'mp' (worker processes on this host)")
        if backend == "uni" and self.world_size > 1:
            raise ConfigError(f"distributed_executor_backend='uni' runs one worker in this process, but "
                              f"tensor_parallel_size x pipeline_parallel_size = {self.world_size}; use 'mp'")
        if self.world_size > 1 and self.enable_lora:
            raise ConfigError("enable_lora with tensor_parallel_size or pipeline_parallel_size > 1 is not supported "
                              "yet: LoRA adapters are not sharded")
        if self.world_size > 1 and self.quantization is not None:
            raise ConfigError("quantization with tensor_parallel_size or pipeline_parallel_size > 1 is not supported "
                              "yet: quantized weights are not sharded")
        if self.world_size > 1 and self.speculative is not None:
            raise ConfigError("speculative decoding with tensor_parallel_size or pipeline_parallel_size > 1 is not "
                              "supported yet: the draft model runs in the engine's one worker")
        if self.device == "cuda" and self.world_size > torch.cuda.device_count():
            raise ConfigError(f"tensor_parallel_size x pipeline_parallel_size = {self.world_size} needs as many GPUs; "
                              f"torch sees {torch.cuda.device_count()}")

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
        return {f.name for f in fields(cls)} - {"hf_config", "torch_dtype", "quant_config", "speculative"}

    @property
    def num_spec_tokens(self) -> int:
        """Draft tokens a request may verify per step (0: no speculative decoding)."""
        return self.speculative.num_speculative_tokens if self.speculative else 0

    def resolve(self, hf_config: Any) -> None:
        """Fill in what depends on the checkpoint: dtype, max_model_len, the token budget."""
        from engine.quantization.config import resolve as resolve_quantization

        self.hf_config = hf_config
        self.quant_config = resolve_quantization(self.quantization, hf_config)
        if self.quant_config is not None and self.world_size > 1:  # detected from the checkpoint's config.json
            raise ConfigError(f"{self.quant_config.method.upper()} checkpoints with tensor_parallel_size or "
                              "pipeline_parallel_size > 1 are not supported yet: quantized weights are not sharded")
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
        check_parallel_shapes(hf_config, self.tensor_parallel_size, self.pipeline_parallel_size)

    @property
    def name(self) -> str:
        return self.served_model_name or self.model


@functools.cache  # once per process, however many configs are built
def _note_no_remote_code() -> None:
    logging.getLogger("engine").warning(
        "trust_remote_code=True has no effect: this engine builds its supported architectures itself and never "
        "runs a checkpoint's own code")


def check_parallel_shapes(hf_config: Any, tp: int, pp: int) -> None:
    """The model must split over the ranks: heads and the MLP evenly over tp, KV heads split or replicated
    evenly, at least one layer per pipeline stage. (The vocabulary needs nothing: its last shard is padded.)"""
    heads = hf_config.num_attention_heads
    kv_heads = getattr(hf_config, "num_key_value_heads", None) or heads
    if heads % tp:
        raise ConfigError(f"num_attention_heads ({heads}) must be divisible by tensor_parallel_size ({tp})")
    if kv_heads % tp and tp % kv_heads:
        raise ConfigError(f"num_key_value_heads ({kv_heads}) must divide or be divisible by "
                          f"tensor_parallel_size ({tp})")
    if hf_config.intermediate_size % tp:
        raise ConfigError(f"intermediate_size ({hf_config.intermediate_size}) must be divisible by "
                          f"tensor_parallel_size ({tp})")
    if hf_config.num_hidden_layers < pp:
        raise ConfigError(f"pipeline_parallel_size ({pp}) exceeds num_hidden_layers ({hf_config.num_hidden_layers}): "
                          "every stage needs a layer")


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
