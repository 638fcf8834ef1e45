"""The batched LoRA kernels (shrink, expand) against their torch references, on small odd shapes under
Triton's CPU interpreter: ranks 1, 8 and 16 padded into one stacked buffer, merged layers with
slices of unequal width, and batches mixing adapters with base tokens (slot -1)."""
import os

import pytest
import torch

triton = pytest.importorskip("triton")  # tests/conftest.py turns on its CPU interpreter when there is no GPU

from kernels import lora  # noqa: E402

ON_GPU = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1"
DEVICE = "cuda" if ON_GPU else "cpu"


def stacked_adapters(num_slots, ranks, rank_max, in_features, slice_sizes, dtype=torch.float32, seed=0):
    """A [S, slices * R, in] and B [S, out, R] with adapter s of rank ranks[s] (zero past it)."""
    gen = torch.Generator().manual_seed(seed)
    n_slices, out = len(slice_sizes), sum(slice_sizes)
    a = torch.zeros(num_slots, n_slices * rank_max, in_features)
    b = torch.zeros(num_slots, out, rank_max)
    offsets = [0]
    for size in slice_sizes:
        offsets.append(offsets[-1] + size)
    for s, r in enumerate(ranks):
        for j in range(n_slices):
            a[s, j * rank_max:j * rank_max + r] = torch.randn(r, in_features, generator=gen)
            b[s, offsets[j]:offsets[j + 1], :r] = torch.randn(slice_sizes[j], r, generator=gen)
    return a.to(dtype).to(DEVICE), b.to(dtype).to(DEVICE), offsets


def test_indices_group_tokens_by_slot():
    slots = torch.tensor([2, -1, 0, 2, -1, 0, 0], device=DEVICE)
    idx = lora.lora_indices(slots, num_slots=4)
    assert idx.slot_starts.tolist() == [2, 5, 5, 7, 7]  # two base tokens first; slot 1 and 3 empty
    order = idx.sorted_tokens.tolist()
    assert sorted(order[:2]) == [1, 4]
    assert order[2:5] == [2, 5, 6] and order[5:7] == [0, 3]  # stable within a slot


@pytest.mark.parametrize("slice_sizes,in_features", [([24, 8, 8], 40), ([33], 19), ([20, 20], 600)])
@pytest.mark.parametrize("slot_pattern", ["mixed", "one", "base"])
def test_add_lora_matches_reference(slice_sizes, in_features, slot_pattern):
    num_slots, rank_max, num_tokens = 4, 16, 37
    a, b, offsets = stacked_adapters(num_slots, [1, 8, 16, 0], rank_max, in_features, slice_sizes)
    gen = torch.Generator().manual_seed(1)
    if slot_pattern == "mixed":  # every slot, the empty one (3) included, and base tokens
        slots = torch.randint(-1, num_slots, (num_tokens,), generator=gen)
    elif slot_pattern == "one":
        slots = torch.full((num_tokens,), 1)
    else:
        slots = torch.full((num_tokens,), -1)
    slots = slots.to(DEVICE)
    x = torch.randn(num_tokens, in_features, generator=gen).to(DEVICE)
    base = torch.randn(num_tokens, sum(slice_sizes), generator=gen).to(DEVICE)
    ref = base.clone()
    lora.add_lora_ref(x, a, b, slots, offsets, ref)
    out = base.clone()
    idx = lora.lora_indices(slots, num_slots)
    offsets_t = torch.tensor(offsets, dtype=torch.int32, device=DEVICE)
    lora.add_lora(x, a, b, idx, offsets_t, max(slice_sizes), out)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    untouched = slots < 0
    assert torch.equal(out[untouched], base[untouched])  # base tokens: exactly the base output
    if slot_pattern != "base":
        assert not torch.allclose(out[~untouched], base[~untouched])  # the adapters did something


def test_large_batch_tiles():
    """Past 512 tokens the kernels take 64-token tiles: the same answer."""
    a, b, offsets = stacked_adapters(3, [16, 1, 8], 16, 24, [16, 8])
    slots = torch.randint(-1, 3, (600,), generator=torch.Generator().manual_seed(3)).to(DEVICE)
    x = torch.randn(600, 24).to(DEVICE)
    ref, out = torch.zeros(600, 24, device=DEVICE), torch.zeros(600, 24, device=DEVICE)
    lora.add_lora_ref(x, a, b, slots, offsets, ref)
    lora.add_lora(x, a, b, lora.lora_indices(slots, 3), torch.tensor(offsets, dtype=torch.int32, device=DEVICE), 16,
                  out)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)


def test_shrink_partials_sum_to_reference():
    a, _, _ = stacked_adapters(3, [16, 8, 1], 16, 1100, [16, 16])  # 1100 in_features: two splits
    slots = torch.tensor([0, 1, 2, -1, 1, 0, 2, 2, 0], device=DEVICE)
    x = torch.randn(9, 1100).to(DEVICE)
    y = lora.lora_shrink(x, a, lora.lora_indices(slots, 3))
    assert y.shape[0] == lora.shrink_splits(1100) == 2
    ref = lora.lora_shrink_ref(x, a, slots)
    keep = slots >= 0
    torch.testing.assert_close(y.sum(0)[keep], ref[keep], atol=1e-3, rtol=1e-4)
