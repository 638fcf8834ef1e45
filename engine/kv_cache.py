"""How many KV blocks fit: on GPU, what is left of `gpu_memory_utilization` after weights, the
peak of a profiling forward pass and the CUDA graphs; on CPU, `kv_cache_memory` bytes.

Under tensor/pipeline parallelism every figure is one rank's: a rank caches its own layers (its
pipeline stage's) and its own KV heads, and `kv_cache_memory` is per rank, as vLLM's per-GPU sizes.
Every rank uses the same block ids, so the engine takes the fewest blocks any rank can hold."""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from engine.config import ConfigError, EngineConfig, GiB
from engine.distributed.state import SINGLE, ParallelRank
from engine.models.llama import head_dim_of, local_kv_heads

log = logging.getLogger("engine")


def cache_layout(config: EngineConfig, par: ParallelRank) -> tuple[int, int, int, int]:
    """This rank's (layers, block size, KV heads, head dim)."""
    hf = config.hf_config
    return len(par.layer_range(hf.num_hidden_layers)), config.block_size, local_kv_heads(hf, par), head_dim_of(hf)


def bytes_per_block(config: EngineConfig, par: ParallelRank = SINGLE) -> int:
    layers, block, kv_heads, head_dim = cache_layout(config, par)
    elem = torch.empty(0, dtype=config.torch_dtype).element_size()
    return layers * 2 * block * kv_heads * head_dim * elem


@dataclass
class MemoryProfile:
    """The device memory plan. The KV cache gets what is left of total x utilization, so the parts
    add up to that budget exactly."""
    total: int
    utilization: float
    earlier: int  # torch memory this process held before the engine loaded (another engine, a benchmark)
    weights: int
    batch_buffers: int  # the runner's persistent batch: staging, block tables, penalty counts
    activation_peak: int  # torch peak of the profiling step above weights, buffers and its scratch cache
    non_torch: int  # CUDA context, cuBLAS workspaces, other libraries and processes on the device
    cuda_graphs: int  # a trial capture of the largest decode graph (device memory it took, >= 0)

    @property
    def budget(self) -> int:
        return int(self.total * self.utilization)

    @property
    def kv_budget(self) -> int:
        return (self.budget - self.earlier - self.weights - self.batch_buffers - self.activation_peak
                - self.non_torch - self.cuda_graphs)

    def describe(self) -> str:
        g = lambda b: f"{b / GiB:.2f} GiB"  # noqa: E731
        earlier = f"earlier allocations {g(self.earlier)} + " if self.earlier else ""
        return (f"{g(self.budget)} ({self.utilization:g} of {g(self.total)}) = {earlier}weights {g(self.weights)} "
                f"+ batch "
                f"buffers {g(self.batch_buffers)} + activation peak {g(self.activation_peak)} + non-torch "
                f"{g(self.non_torch)} + CUDA graphs {g(self.cuda_graphs)} + KV cache {g(self.kv_budget)}")


def check_kv_budget(config: EngineConfig, profile: MemoryProfile) -> MemoryProfile:
    if profile.kv_budget <= 0:
        raise ConfigError(f"no memory left for the KV cache at gpu_memory_utilization="
                          f"{config.gpu_memory_utilization}: {profile.describe()}. Raise gpu_memory_utilization or "
                          "lower max_num_batched_tokens / max_num_seqs.")
    return profile


def kv_cache_bytes(caches: list[tuple[torch.Tensor, torch.Tensor]]) -> int:
    return sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in caches)


def num_blocks_for(config: EngineConfig, kv_budget: int | None, par: ParallelRank = SINGLE) -> int:
    per_block = bytes_per_block(config, par)
    if config.num_gpu_blocks_override is not None:
        num_blocks = config.num_gpu_blocks_override
    elif config.kv_cache_memory is not None:
        num_blocks = config.kv_cache_memory // per_block
    else:
        num_blocks = kv_budget // per_block
    capacity = num_blocks * config.block_size
    if capacity < config.max_model_len:
        raise ConfigError(f"the KV cache holds {num_blocks} blocks = {capacity} tokens, fewer than max_model_len "
                          f"({config.max_model_len}): one sequence could never finish. Give the cache more memory "
                          f"or lower max_model_len.")
    log.info("KV cache: %d blocks of %d tokens = %d tokens; %.3f MiB per block, %.2f GiB in all", num_blocks,
             config.block_size, capacity, per_block / (1 << 20), num_blocks * per_block / GiB)
    return num_blocks


def allocate_kv_cache(config: EngineConfig, num_blocks: int, device: torch.device,
                      par: ParallelRank = SINGLE) -> list[tuple[torch.Tensor, torch.Tensor]]:
    layers, block, kv_heads, head_dim = cache_layout(config, par)
    shape = (num_blocks, block, kv_heads, head_dim)
    # Zeros on GPU (a cheap memset) so that padded rows of CUDA-graph batches read finite values;
    # empty on CPU, where untouched pages then cost nothing.
    make = torch.zeros if device.type == "cuda" else torch.empty
    return [(make(shape, dtype=config.torch_dtype, device=device), make(shape, dtype=config.torch_dtype, device=device))
            for _ in range(layers)]
