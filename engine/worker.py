"""A worker: one device's model, KV cache and model runner. The executor (engine/executor.py)
drives it with step plans only; a tensor- or pipeline-parallel worker in its own process
(engine/executor_mp.py) is this same class, holding its rank's shard and its stage's layers.

Memory sizing (GPU), as vLLM users expect it: weights are loaded, then the largest step the
scheduler can produce runs through the real path (plan -> persistent batch -> inputs -> forward ->
sampler with every option that costs memory; nano-vllm's warm-up idea) against a scratch cache,
and its peak is measured. The largest decode CUDA graph is captured once on trial, and the device
memory that took (measured at the device, before and after, so it cannot come out negative) is
set aside too. The KV cache gets the rest of gpu_memory_utilization; the log line's figures add up
to that budget by construction.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch

from engine.config import EngineConfig
from engine.distributed.stage import PipelineStage
from engine.distributed.state import SINGLE, ParallelRank
from engine.kv_cache import (
    MemoryProfile,
    allocate_kv_cache,
    bytes_per_block,
    check_kv_budget,
    kv_cache_bytes,
    num_blocks_for,
)
from engine.lora.manager import LoRAManager, LoRASettings
from engine.lora.request import LoRARequest
from engine.model_loader import build_model
from engine.model_runner import ModelRunner, PendingOutput, graph_batch_sizes
from engine.scheduler_output import SchedulerOutput
from engine.spec_decode.build import build_spec_decoder
from engine.step_timer import StepTimer

log = logging.getLogger("engine")


def device_used() -> int:
    free, total = torch.cuda.mem_get_info()
    return total - free


class Worker:
    def __init__(self, config: EngineConfig, model_dir: Path, timer: StepTimer, par: ParallelRank = SINGLE,
                 device: torch.device | None = None):
        """`par`: this worker's rank in the tensor x pipeline grid; `device`: its device (default config.device)."""
        self.config = config
        self.par = par
        self.device = device or torch.device(config.device)
        torch.manual_seed(config.seed)
        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.empty_cache()
        allocated = torch.cuda.memory_allocated if cuda else (lambda: 0)
        self.earlier = allocated()  # this process's tensors from before (another engine, a benchmark's)
        model = build_model(config.hf_config, config.torch_dtype, self.device, model_dir, config.load_format,
                            config.seed, config.quant_config, par)
        # The adapters' GPU slots are weights too (allocated once, whatever the batch).
        self.lora = LoRAManager(model, LoRASettings(config.max_loras, config.max_lora_rank, config.max_cpu_loras),
                                config.torch_dtype, self.device) if config.enable_lora else None
        # Speculative decoding's proposer (a draft model's weights count as weights).
        spec = build_spec_decoder(config, self.device) if config.speculative is not None else None
        self.weights = allocated() - self.earlier
        stage = PipelineStage(par, config.hf_config.hidden_size, config.torch_dtype, self.device) \
            if par.pp_size > 1 else None
        self.runner = ModelRunner(config, model, self.device, timer, self.lora, stage)
        self.runner.spec = spec
        # A later pipeline stage's graph would have to start from received activations: eager for now.
        self.use_graphs = cuda and not config.enforce_eager and par.pp_size == 1
        self.batch_buffers = allocated() - self.earlier - self.weights
        self.memory_profile: MemoryProfile | None = None

    # ---------------------------------------------------------------- memory and cache
    @property
    def draft(self):
        """The draft-model proposer, whose KV cache shares the budget (None without one)."""
        spec = self.runner.spec
        return getattr(spec, "proposer", None) if spec is not None and hasattr(spec.proposer, "kv_caches") else None

    def determine_num_blocks(self) -> int:
        budget = None if self.device.type != "cuda" else self._profile().kv_budget
        if self.draft is not None:  # one rank only (speculation is refused with more)
            return self.draft.split_kv_budget(self.config, budget)
        return num_blocks_for(self.config, budget, self.par)

    @torch.inference_mode()
    def _profile(self) -> MemoryProfile:
        cfg, runner = self.config, self.runner
        plan, num_blocks = runner.profile_plan()
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        scratch = allocate_kv_cache(cfg, num_blocks, self.device, self.par)
        runner.bind_cache(scratch)
        runner.run_profile_plan(plan)
        torch.cuda.synchronize()
        activation_peak = max(0, torch.cuda.max_memory_allocated() - self.earlier - self.weights - self.batch_buffers
                              - kv_cache_bytes(scratch))
        runner.bind_cache([])
        del scratch
        torch.cuda.empty_cache()
        non_torch = max(0, device_used() - torch.cuda.memory_reserved())
        graphs = self._trial_graph_bytes() if self.use_graphs else 0
        self.memory_profile = check_kv_budget(cfg, MemoryProfile(
            total=torch.cuda.mem_get_info()[1], utilization=cfg.gpu_memory_utilization, earlier=self.earlier,
            weights=self.weights,
            batch_buffers=self.batch_buffers, activation_peak=activation_peak, non_torch=non_torch,
            cuda_graphs=graphs))
        log.info("memory profile: %s", self.memory_profile.describe())
        return self.memory_profile

    def _trial_graph_bytes(self) -> int:
        """Capture the largest decode graph against a one-block cache and measure what it took."""
        runner = self.runner
        bs = max(graph_batch_sizes(self.config.max_num_seqs))
        runner.bind_cache(allocate_kv_cache(self.config, 1, self.device, self.par))
        runner.warm_up_graph(bs)  # compiles and autotunes outside the measured window
        torch.cuda.synchronize()
        torch.cuda.empty_cache()  # as capturing does: the cache's release must not offset the graph's take
        before = device_used()
        graph = runner.capture_graph(bs)
        torch.cuda.synchronize()
        taken = max(0, device_used() - before)
        del graph
        runner.graph_hidden = None
        runner.bind_cache([])
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        return taken

    def initialize_cache(self, num_blocks: int) -> None:
        self.runner.bind_cache(allocate_kv_cache(self.config, num_blocks, self.device, self.par))
        if self.draft is not None:
            self.draft.initialize_cache(num_blocks)
        if self.use_graphs:
            taken = self.runner.capture_graphs()
            profiled = self.memory_profile.cuda_graphs if self.memory_profile else 0
            log.info("CUDA graphs took %.2f GiB (%.2f GiB set aside by the profile); KV cache %d blocks of %.3f MiB",
                     taken / (1 << 30), profiled / (1 << 30), num_blocks,
                     bytes_per_block(self.config, self.par) / (1 << 20))

    # ---------------------------------------------------------------- steps
    def execute_model(self, plan: SchedulerOutput) -> PendingOutput:
        return self.runner.execute_model(plan)

    def add_lora(self, request: LoRARequest) -> None:
        self.lora.add(request)

    def remove_lora(self, lora_int_id: int) -> None:
        self.lora.remove(lora_int_id)

    def shutdown(self) -> None:
        if self.draft is not None:
            self.draft.release()
        self.runner.release()
