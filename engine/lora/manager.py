"""Adapters between disk, a CPU cache and the GPU slots.

- CPU cache: up to `max_cpu_loras` adapters read and checked (pinned memory on CUDA, so a slot
  fills with asynchronous copies), least recently used evicted first; an evicted adapter is read
  again from its path when a request needs it (as vLLM does). Adapters are known by id: `add`
  registers one (the worker sees only ids in the step plan, engine/scheduler_output.py).
- GPU slots: `max_loras` rows of every LoRA layer's stacked buffers. Each step pins the slots of the
  adapters its rows use (`activate`); an unpinned slot keeps its adapter (a later request reuses it
  without copying) until it is the least recently used one and a slot is needed.

The scheduler never runs more distinct adapters in one step than there are slots (scheduler.py), so
`activate` always finds them; if it cannot, that is a bug and it says so.
"""
from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass

import torch
from torch import nn

from engine.lora.layers import LoRALayerWeights, lora_targets
from engine.lora.peft import LoRAModel, load_adapter
from engine.lora.request import LoRAError, LoRARequest

log = logging.getLogger("engine")


@dataclass(frozen=True)
class LoRASettings:
    max_loras: int  # GPU slots
    max_lora_rank: int
    max_cpu_loras: int


def buffer_rank(max_lora_rank: int) -> int:
    """The stacked buffers' rank: max_lora_rank rounded up to a multiple of 16 (the kernels' smallest
    matmul tile), zero-padded."""
    return -(-max_lora_rank // 16) * 16


class LoRAManager:
    def __init__(self, model: nn.Module, settings: LoRASettings, dtype: torch.dtype, device: torch.device):
        self.settings = settings
        self.dtype = dtype
        self.device = device
        self.targets = lora_targets(model)
        rank = buffer_rank(settings.max_lora_rank)
        self.layers: dict[str, LoRALayerWeights] = {}
        for name in sorted({t.layer for t in self.targets.values()}):
            linear = model.get_submodule(name)
            linear.lora_weights = self.layers[name] = LoRALayerWeights(
                linear.in_features, linear.out_sizes, settings.max_loras, rank, dtype, device)
        self.known: dict[int, LoRARequest] = {}  # every adapter added, by id: its path, to read it again
        self.removed: set[int] = set()  # removed while a step still used them: vacated once unused
        self.cpu: OrderedDict[int, LoRAModel] = OrderedDict()  # LRU: oldest first
        self.slot_of: dict[int, int] = {}  # adapter id -> GPU slot
        self.slot_ids: list[int | None] = [None] * settings.max_loras  # GPU slot -> adapter id
        self.pins = [0] * settings.max_loras
        self.slot_lru: OrderedDict[int, None] = OrderedDict((s, None) for s in range(settings.max_loras))
        log.info("LoRA: %d GPU slots of rank %d over %d layers (%.1f MiB), CPU cache of %d adapters",
                 settings.max_loras, rank, len(self.layers),
                 sum(w.nbytes for w in self.layers.values()) / 2**20, settings.max_cpu_loras)

    @property
    def num_slots(self) -> int:
        return self.settings.max_loras

    # ---------------------------------------------------------------- adapters
    def add(self, request: LoRARequest) -> LoRAModel:
        """Read and check an adapter into the CPU cache (LoRAError if it cannot be used). The same id
        with another path or name is refused: ids are the adapters' identity, as in vLLM."""
        known = self.known.get(request.lora_int_id)
        if known is not None and (known.lora_path, known.lora_name) != (request.lora_path, request.lora_name):
            raise LoRAError(f"lora_int_id {request.lora_int_id} is already adapter {known.lora_name!r} "
                            f"({known.lora_path}); give {request.lora_name!r} another id")
        model = self.cpu.get(request.lora_int_id)
        if model is not None:
            self.cpu.move_to_end(request.lora_int_id)
            return model
        model = load_adapter(request, self.targets, self.settings.max_lora_rank, self.dtype,
                             pin=self.device.type == "cuda")
        self.known[request.lora_int_id] = request
        self.cpu[request.lora_int_id] = model
        while len(self.cpu) > self.settings.max_cpu_loras:
            self.cpu.popitem(last=False)
        return model

    def remove(self, lora_int_id: int) -> None:
        """Drop an adapter's CPU copy now and its GPU slot as soon as no step uses it. Its path stays
        known: requests already queued under it still run (new ones are stopped by the caller)."""
        self.cpu.pop(lora_int_id, None)
        slot = self.slot_of.get(lora_int_id)
        if slot is not None and self.pins[slot] == 0:
            self._vacate(slot)
        elif slot is not None:
            self.removed.add(lora_int_id)

    # ---------------------------------------------------------------- GPU slots
    def activate(self, lora_ids) -> dict[int, int]:
        """Pin exactly the slots of these (added) adapters for the coming step, loading those not in a slot
        (from the CPU cache, or from disk) into the least recently used free ones; every other slot is
        unpinned. Returns adapter id -> slot. The step's rows are its requests, so the pinned set is
        what the step uses: the scheduler keeps it within max_loras."""
        wanted = set(lora_ids)
        if len(wanted) > self.num_slots:
            raise RuntimeError(f"{len(wanted)} adapters in one step, but only {self.num_slots} LoRA slots: the "
                               "scheduler let more distinct adapters run than --max-loras")
        self.pins = [0] * self.num_slots
        for lora_id in list(self.removed):
            if lora_id not in wanted:
                self.removed.discard(lora_id)
                if lora_id in self.slot_of:
                    self._vacate(self.slot_of[lora_id])
        for lora_id in wanted & set(self.slot_of):  # resident ones first, so that loads cannot evict them
            self._pin(self.slot_of[lora_id])
        for lora_id in sorted(wanted - set(self.slot_of)):
            self._pin(self._load(lora_id))
        return {lora_id: self.slot_of[lora_id] for lora_id in wanted}

    def _pin(self, slot: int) -> None:
        self.pins[slot] = 1
        self.slot_lru.move_to_end(slot)

    def _load(self, lora_int_id: int) -> int:
        request = self.known.get(lora_int_id)
        if request is None:
            raise LoRAError(f"LoRA adapter id {lora_int_id} was never added")
        model = self.add(request)
        slot = self._free_slot()
        for layer, weights in self.layers.items():
            shards = model.weights.get(layer)
            if shards:
                weights.write(slot, shards)
            else:
                weights.clear(slot)
        self.slot_of[lora_int_id] = slot
        self.slot_ids[slot] = lora_int_id
        return slot

    def _free_slot(self) -> int:
        for slot in self.slot_lru:  # least recently used first
            if self.pins[slot] == 0:
                if self.slot_ids[slot] is not None:
                    self._vacate(slot)
                return slot
        raise RuntimeError(f"all {self.num_slots} LoRA slots are in use")

    def _vacate(self, slot: int) -> None:
        # The slot's buffers keep their values: a slot is only read for tokens mapped to it, and the next
        # adapter overwrites all of it.
        del self.slot_of[self.slot_ids[slot]]
        self.slot_ids[slot] = None
