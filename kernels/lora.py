"""Batched LoRA for a step that mixes adapters and the base model (Punica's shrink and expand).

Every LoRA-capable linear layer holds the adapters of all GPU slots stacked: A as
[num_slots, num_slices * rank, in] and B as [num_slots, out, rank] (B already scaled by alpha / r,
zero-padded past each adapter's own rank). A merged layer (q/k/v, gate/up) has one slice per
projection: slice j of the shrink's output feeds the rows of B (= output columns) of projection j.

    shrink:  y[t] = x[t] @ A[slot(t)]^T                      (per token's slot; slot -1 = base)
    expand:  out[t, cols(j)] += y[t, rank(j)] @ B[slot(t), cols(j)]^T   for each slice j

The kernels group tokens by slot, as vLLM's punica kernels do: the step's token indices sorted by
slot (`LoRAIndices`), one grid axis over the slots, and each program takes a tile of its slot's
tokens and leaves at once when the slot has fewer. The grid and every buffer depend only on the
number of tokens and the slot count, never on how tokens spread over slots, and the indices are
built on the device without a host sync: a captured CUDA graph replays any mix of adapters.
The shrink splits its long reduction (in_features) over programs; the expand sums the partials,
which keeps the result deterministic (no atomics) and small decode batches fill the GPU.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class LoRAIndices:
    """One step's tokens grouped by adapter slot, all on the device."""
    token_slots: torch.Tensor  # [num_tokens] int32: the GPU slot of each token's adapter, -1 = none
    sorted_tokens: torch.Tensor  # [num_tokens] int32: token indices, base tokens first, then by slot
    slot_starts: torch.Tensor  # [num_slots + 1] int32: slot s owns sorted_tokens[slot_starts[s]:slot_starts[s+1]]

    @property
    def num_slots(self) -> int:
        return self.slot_starts.shape[0] - 1


def lora_indices(token_slots: torch.Tensor, num_slots: int) -> LoRAIndices:
    """Group tokens by slot with device ops only (a stable sort and a scatter-add into a fixed-size
    count): no host sync, fixed shapes, so it can run right before a graph replay."""
    token_slots = token_slots.to(torch.int32)
    order = torch.sort(token_slots, stable=True).indices.to(torch.int32)
    counts = torch.zeros(num_slots + 1, dtype=torch.int32, device=token_slots.device)
    counts.scatter_add_(0, (token_slots.long() + 1).clamp(0, num_slots), torch.ones_like(token_slots))
    return LoRAIndices(token_slots, order, torch.cumsum(counts, 0).to(torch.int32))


# ---------------------------------------------------------------- references
def lora_shrink_ref(x: torch.Tensor, lora_a: torch.Tensor, token_slots: torch.Tensor) -> torch.Tensor:
    """x: [T, in]; lora_a: [S, N, in]. Returns y [T, N] float32 (zero on base tokens)."""
    y = torch.zeros(x.shape[0], lora_a.shape[1], dtype=torch.float32, device=x.device)
    for slot in torch.unique(token_slots).tolist():
        if slot < 0:
            continue
        rows = (token_slots == slot).nonzero().squeeze(1)
        y[rows] = x[rows].float() @ lora_a[slot].float().t()
    return y


def lora_expand_ref(y: torch.Tensor, lora_b: torch.Tensor, token_slots: torch.Tensor, slice_offsets: list[int],
                    out: torch.Tensor) -> None:
    """y: [T, num_slices * R] float32; lora_b: [S, out_total, R]; slice j covers output columns
    slice_offsets[j]:slice_offsets[j+1] and y's columns j*R:(j+1)*R. Adds into out [T, out_total]."""
    rank = lora_b.shape[2]
    for slot in torch.unique(token_slots).tolist():
        if slot < 0:
            continue
        rows = (token_slots == slot).nonzero().squeeze(1)
        for j in range(len(slice_offsets) - 1):
            lo, hi = slice_offsets[j], slice_offsets[j + 1]
            delta = y[rows, j * rank:(j + 1) * rank] @ lora_b[slot, lo:hi].float().t()
            out[rows, lo:hi] = (out[rows, lo:hi].float() + delta).to(out.dtype)


def add_lora_ref(x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, token_slots: torch.Tensor,
                 slice_offsets: list[int], out: torch.Tensor) -> None:
    if bool((token_slots >= 0).any()):
        lora_expand_ref(lora_shrink_ref(x, lora_a, token_slots), lora_b, token_slots, slice_offsets, out)


try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs use the references
    triton = None


if triton is not None:
    @triton.jit
    def _slot_rows(sorted_ptr, starts_ptr, slot, pid_m, BLOCK_M: tl.constexpr):
        """Token rows of tile pid_m of this slot's tokens, and their mask (all False past its end)."""
        start = tl.load(starts_ptr + slot)
        count = tl.load(starts_ptr + slot + 1) - start
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        mask_m = offs_m < count
        rows = tl.load(sorted_ptr + start + offs_m, mask=mask_m, other=0).to(tl.int64)
        return rows, mask_m, count

    # The split stride of the shrink's partials (tokens x N) changes with the step's token count: it is not
    # specialised on, or a new divisibility would compile a new kernel (about a second) mid-run.
    @triton.jit(do_not_specialize=["stride_ys"])
    def _shrink_kernel(x_ptr, a_ptr, y_ptr, sorted_ptr, starts_ptr, K, N, k_per_split, stride_xm, stride_as,
                       stride_an, stride_ys, stride_ym, num_n_blocks,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                       PRECISION: tl.constexpr):
        """One program: a tile of one slot's tokens, a block of A's rows, one split of in_features.
        Writes its partial sums to y[split]."""
        pid_m = tl.program_id(0)
        split = tl.program_id(1) // num_n_blocks
        pid_n = tl.program_id(1) % num_n_blocks
        slot = tl.program_id(2)
        rows, mask_m, count = _slot_rows(sorted_ptr, starts_ptr, slot, pid_m, BLOCK_M)
        if pid_m * BLOCK_M >= count:
            return
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        k_start = split * k_per_split
        for k0 in range(k_start, k_start + k_per_split, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            mask_k = offs_k < K
            x = tl.load(x_ptr + rows[:, None] * stride_xm + offs_k[None, :], mask=mask_m[:, None] & mask_k[None, :],
                        other=0.0)
            a = tl.load(a_ptr + slot * stride_as + offs_n[:, None] * stride_an + offs_k[None, :],
                        mask=mask_n[:, None] & mask_k[None, :], other=0.0)
            acc += tl.dot(x, tl.trans(a), input_precision=PRECISION)
        tl.store(y_ptr + split * stride_ys + rows[:, None] * stride_ym + offs_n[None, :], acc,
                 mask=mask_m[:, None] & mask_n[None, :])

    @triton.jit(do_not_specialize=["stride_ys"])
    def _expand_kernel(y_ptr, b_ptr, out_ptr, sorted_ptr, starts_ptr, slices_ptr, rank, num_splits, stride_ys,
                       stride_ym, stride_bs, stride_bn, stride_om, num_n_blocks,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
                       PRECISION: tl.constexpr):
        """One program: a tile of one slot's tokens, a block of one slice's output columns. Sums the
        shrink's split partials, multiplies by B and adds into the output (each element has one owner)."""
        pid_m = tl.program_id(0) // num_n_blocks
        pid_n = tl.program_id(0) % num_n_blocks
        j = tl.program_id(1)
        slot = tl.program_id(2)
        rows, mask_m, count = _slot_rows(sorted_ptr, starts_ptr, slot, pid_m, BLOCK_M)
        col0 = tl.load(slices_ptr + j)
        width = tl.load(slices_ptr + j + 1) - col0
        if (pid_m * BLOCK_M >= count) | (pid_n * BLOCK_N >= width):
            return
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = offs_n < width
        cols = col0 + offs_n
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for r0 in range(0, rank, BLOCK_R):
            offs_r = r0 + tl.arange(0, BLOCK_R)
            mask_r = offs_r < rank
            y_ptrs = y_ptr + rows[:, None] * stride_ym + (j * rank + offs_r)[None, :]
            y = tl.zeros([BLOCK_M, BLOCK_R], dtype=tl.float32)
            for s in range(num_splits):
                y += tl.load(y_ptrs + s * stride_ys, mask=mask_m[:, None] & mask_r[None, :], other=0.0)
            b = tl.load(b_ptr + slot * stride_bs + cols[None, :] * stride_bn + offs_r[:, None],
                        mask=mask_r[:, None] & mask_n[None, :], other=0.0)
            acc += tl.dot(y.to(b.dtype), b, input_precision=PRECISION)
        out_ptrs = out_ptr + rows[:, None] * stride_om + cols[None, :]
        mask = mask_m[:, None] & mask_n[None, :]
        base = tl.load(out_ptrs, mask=mask, other=0.0)
        tl.store(out_ptrs, (base.to(tl.float32) + acc).to(out_ptr.dtype.element_ty), mask=mask)


def _block_m(num_tokens: int) -> int:
    return 16 if num_tokens <= 512 else 64


def shrink_splits(in_features: int, block_k: int = 128) -> int:
    """Splits of in_features: about 512 each, so a decode batch's few tiles per slot still spread over
    many programs; fixed per layer (never per step)."""
    return max(1, min(16, in_features // 512, triton.cdiv(in_features, block_k) if triton else 1))


def lora_shrink(x: torch.Tensor, lora_a: torch.Tensor, idx: LoRAIndices) -> torch.Tensor:
    """Triton shrink: [num_splits, T, N] float32 partial sums (summed by lora_expand). Rows of base
    tokens are left unwritten."""
    num_tokens, in_features = x.shape
    num_slots, n, _ = lora_a.shape
    block_k = 128
    splits = shrink_splits(in_features, block_k)
    k_per_split = triton.cdiv(triton.cdiv(in_features, splits), block_k) * block_k
    y = torch.empty(splits, num_tokens, n, dtype=torch.float32, device=x.device)
    if num_tokens == 0:
        return y
    block_m = _block_m(num_tokens)
    block_n = max(16, min(64, triton.next_power_of_2(n)))
    num_n_blocks = triton.cdiv(n, block_n)
    precision = "ieee" if x.dtype == torch.float32 else "tf32"
    grid = (triton.cdiv(num_tokens, block_m), splits * num_n_blocks, num_slots)
    _shrink_kernel[grid](x, lora_a, y, idx.sorted_tokens, idx.slot_starts, in_features, n, k_per_split, x.stride(0),
                         lora_a.stride(0), lora_a.stride(1), y.stride(0), y.stride(1), num_n_blocks,
                         BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, PRECISION=precision, num_warps=4)
    return y


def lora_expand(y: torch.Tensor, lora_b: torch.Tensor, idx: LoRAIndices, slice_offsets: torch.Tensor,
                max_slice: int, out: torch.Tensor) -> None:
    """Triton expand: adds y (summed over splits) @ B^T into out's slices. slice_offsets: [num_slices + 1]
    int32 on the device; max_slice: the widest slice (a layer constant)."""
    splits, num_tokens, _ = y.shape
    num_slots, _, rank = lora_b.shape
    if num_tokens == 0:
        return
    assert out.stride(1) == 1 and lora_b.stride(2) == 1
    block_m = _block_m(num_tokens)
    block_n = 128
    block_r = max(16, min(64, triton.next_power_of_2(rank)))
    num_n_blocks = triton.cdiv(max_slice, block_n)
    precision = "ieee" if out.dtype == torch.float32 else "tf32"
    grid = (triton.cdiv(num_tokens, block_m) * num_n_blocks, slice_offsets.shape[0] - 1, num_slots)
    _expand_kernel[grid](y, lora_b, out, idx.sorted_tokens, idx.slot_starts, slice_offsets, rank, splits,
                         y.stride(0), y.stride(1), lora_b.stride(0), lora_b.stride(1), out.stride(0), num_n_blocks,
                         BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_R=block_r, PRECISION=precision, num_warps=4)


def add_lora(x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, idx: LoRAIndices,
             slice_offsets: torch.Tensor, max_slice: int, out: torch.Tensor) -> None:
    """out += LoRA(x) per token's slot, in place (Triton)."""
    lora_expand(lora_shrink(x, lora_a, idx), lora_b, idx, slice_offsets, max_slice, out)
