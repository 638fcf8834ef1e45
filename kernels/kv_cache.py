"""Store the step's new K and V into their cache slots."""
import torch


def store_kvcache_ref(key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                      slot_mapping: torch.Tensor) -> None:
    """key/value: [num_tokens, num_kv_heads, head_dim]; slot_mapping: [num_tokens], -1 = skip."""
    keep = slot_mapping >= 0
    slots = slot_mapping[keep]
    k_cache.view(-1, *k_cache.shape[2:])[slots] = key[keep]
    v_cache.view(-1, *v_cache.shape[2:])[slots] = value[keep]


try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs use the references
    triton = None

if triton is not None:
    @triton.jit
    def _store_kvcache_kernel(key_ptr, value_ptr, k_cache_ptr, v_cache_ptr, slot_ptr, stride_kt, stride_vt,
                              ROW: tl.constexpr, BLOCK: tl.constexpr):
        token = tl.program_id(0)
        slot = tl.load(slot_ptr + token)
        if slot >= 0:
            offs = tl.arange(0, BLOCK)
            mask = offs < ROW
            k = tl.load(key_ptr + token * stride_kt + offs, mask=mask)
            v = tl.load(value_ptr + token * stride_vt + offs, mask=mask)
            tl.store(k_cache_ptr + slot * ROW + offs, k, mask=mask)
            tl.store(v_cache_ptr + slot * ROW + offs, v, mask=mask)


def store_kvcache(key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                  slot_mapping: torch.Tensor) -> None:
    """Triton version of store_kvcache_ref: one program per token copies its K and V rows."""
    num_tokens, heads, dim = key.shape
    if num_tokens == 0:
        return
    assert key.stride(2) == 1 and key.stride(1) == dim and value.stride(1) == dim, "rows must be contiguous"
    row = heads * dim
    _store_kvcache_kernel[(num_tokens,)](key, value, k_cache, v_cache, slot_mapping, key.stride(0), value.stride(0),
                                         ROW=row, BLOCK=triton.next_power_of_2(row))
