"""Where adapters attach to the model, their stacked GPU buffers, and the per-step mapping.

LoRA is added on top of whatever a `Linear` computes (dense or quantized: the quantization method
never sees it). Each LoRA-capable Linear gets one `LoRALayerWeights` (the adapters of every GPU slot,
stacked) in its `lora` attribute; the model passes one `LoRAMapping` (each token's slot) down the
forward call, as it passes AttentionMetadata, and `Linear.forward` adds the delta.

Our model merges q/k/v and gate/up into one matmul each; PEFT adapts each projection separately.
A merged layer's buffers hold one slice per projection (`LoRATarget.shard`), so one shrink and one
expand serve all of them.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from kernels import lora as lora_kernels

# The projections an adapter may target (PEFT's module names), and the layers they live in.
SUPPORTED_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class LoRATarget:
    """One PEFT module (e.g. model.layers.3.self_attn.k_proj) and where it lives in our model."""
    layer: str  # our Linear, e.g. model.layers.3.self_attn.qkv_proj
    shard: int  # its slice of that Linear's output
    in_features: int
    out_features: int


def lora_targets(model: nn.Module) -> dict[str, LoRATarget]:
    """Every adaptable projection of the model, by its Hugging Face (= PEFT) module name."""
    from engine.layers.linear import Linear

    merged = {}  # our merged piece -> [(HF piece, shard)]
    for piece, (ours, shard) in getattr(model, "packed_shards", {}).items():
        merged.setdefault(ours, []).append((piece, shard))
    targets = {}
    for name, module in model.named_modules():
        if not isinstance(module, Linear) or ".layers." not in name:
            continue  # lm_head (and anything outside the decoder layers) is not adaptable
        parent, _, piece = name.rpartition(".")
        for hf_piece, shard in merged.get(piece, [(piece, 0)]):
            if hf_piece in SUPPORTED_MODULES:
                targets[f"{parent}.{hf_piece}"] = LoRATarget(name, shard, module.in_features, module.out_sizes[shard])
    return targets


class LoRALayerWeights:
    """The adapters of all GPU slots for one Linear: A [slots, slices * rank, in] and B (scaled)
    [slots, out, rank]. A slot's adapter of a smaller rank, or one that skips some of the layer's
    projections, is zero there, which adds exactly nothing."""

    def __init__(self, in_features: int, out_sizes: list[int], num_slots: int, rank: int, dtype: torch.dtype,
                 device: torch.device):
        self.rank = rank
        self.offsets = [0]
        for size in out_sizes:
            self.offsets.append(self.offsets[-1] + size)
        self.max_slice = max(out_sizes)
        self.offsets_t = torch.tensor(self.offsets, dtype=torch.int32, device=device)
        self.a = torch.zeros(num_slots, len(out_sizes) * rank, in_features, dtype=dtype, device=device)
        self.b = torch.zeros(num_slots, self.offsets[-1], rank, dtype=dtype, device=device)

    def write(self, slot: int, shards: dict[int, tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Put one adapter's (A, scaled B) per slice into `slot` (asynchronous from pinned memory: the copies
        queue on the stream behind the steps that may still read the slot's previous adapter)."""
        self.clear(slot)
        for j, (a, b) in shards.items():
            r = a.shape[0]
            self.a[slot, j * self.rank:j * self.rank + r].copy_(a, non_blocking=True)
            self.b[slot, self.offsets[j]:self.offsets[j + 1], :r].copy_(b, non_blocking=True)

    def clear(self, slot: int) -> None:
        self.a[slot].zero_()
        self.b[slot].zero_()

    @property
    def nbytes(self) -> int:
        return self.a.numel() * self.a.element_size() + self.b.numel() * self.b.element_size()


@dataclass
class LoRAMapping:
    """One step's tokens -> GPU slots, passed down the forward call. The implementation (Triton or
    the torch reference) is chosen once, when the mapping is built."""
    indices: lora_kernels.LoRAIndices
    use_triton: bool

    @staticmethod
    def build(token_slots: torch.Tensor, num_slots: int) -> LoRAMapping:
        return LoRAMapping(lora_kernels.lora_indices(token_slots, num_slots), token_slots.is_cuda)

    def add(self, weights: LoRALayerWeights, x: torch.Tensor, out: torch.Tensor) -> None:
        """out += each token's adapter delta of x, in place."""
        if self.use_triton:
            lora_kernels.add_lora(x, weights.a, weights.b, self.indices, weights.offsets_t, weights.max_slice, out)
        else:
            lora_kernels.add_lora_ref(x, weights.a, weights.b, self.indices.token_slots, weights.offsets, out)
