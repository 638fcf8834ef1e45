"""Decode attention over the paged KV cache: one new query token per sequence."""
import torch


def gather_kv(cache: torch.Tensor, block_table: torch.Tensor, length: int) -> torch.Tensor:
    """The first `length` cached tokens of one sequence: [length, num_kv_heads, head_dim]."""
    block_size = cache.shape[1]
    num_blocks = (length + block_size - 1) // block_size
    return cache[block_table[:num_blocks].long()].flatten(0, 1)[:length]


def paged_decode_attention_ref(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                               block_tables: torch.Tensor, context_lens: torch.Tensor, scale: float) -> torch.Tensor:
    """q: [num_seqs, num_heads, head_dim]; block_tables: [num_seqs, max_blocks] int32;
    context_lens: [num_seqs] (tokens in cache, the new one included). Returns [num_seqs, num_heads, head_dim]."""
    num_seqs, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[2]
    group = num_heads // num_kv_heads
    block_size = k_cache.shape[1]
    max_len = int(context_lens.max().item()) if num_seqs else 0
    num_blocks = (max_len + block_size - 1) // block_size
    # Gather every sequence's blocks at once: [num_seqs, max_len, kv_heads, head_dim].
    table = block_tables[:, :num_blocks].long().clamp(min=0)
    keys = k_cache[table].flatten(1, 2)[:, :max_len].float()
    values = v_cache[table].flatten(1, 2)[:, :max_len].float()
    keys = keys.repeat_interleave(group, dim=2)
    values = values.repeat_interleave(group, dim=2)
    positions = torch.arange(max_len, device=q.device)
    beyond = positions[None, :] >= context_lens[:, None]  # [num_seqs, max_len]
    # Slots past a sequence's end hold whatever the cache had (possibly NaN bits): zero them so that a
    # masked position contributes exactly nothing (0 * NaN would still be NaN).
    values = values.masked_fill(beyond[:, :, None, None], 0.0)
    scores = torch.einsum("shd,slhd->shl", q.float(), keys.masked_fill(beyond[:, :, None, None], 0.0)) * scale
    scores.masked_fill_(beyond[:, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    return torch.einsum("shl,slhd->shd", probs, values).to(q.dtype)


try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs use the references
    triton = None

NUM_SMS_TARGET = 264  # about two programs per SM of an H100; more splits than this only add reduce work


if triton is not None:
    @triton.jit
    def load_kv_tile(k_ptr, v_ptr, tables_ptr, table_row, offs_n, mask_n, offs_d, kh, stride_kt, stride_kh,
                     BLOCK_SIZE: tl.constexpr):
        """K and V rows of context positions `offs_n` of one KV head, found through the sequence's
        block table (which starts at `tables_ptr + table_row`)."""
        block = tl.load(tables_ptr + table_row + offs_n // BLOCK_SIZE, mask=mask_n, other=0)
        rows = (block.to(tl.int64) * BLOCK_SIZE + offs_n % BLOCK_SIZE) * stride_kt + kh * stride_kh
        k = tl.load(k_ptr + rows[:, None] + offs_d[None, :], mask=mask_n[:, None], other=0.0)
        v = tl.load(v_ptr + rows[:, None] + offs_d[None, :], mask=mask_n[:, None], other=0.0)
        return k, v

    @triton.jit
    def online_softmax_step(qk, v, m_i, l_i, acc, PRECISION: tl.constexpr):
        """Fold one tile of scores (-inf where masked) and its values into the running max, sum and
        weighted values: flash attention's online softmax."""
        m_new = tl.maximum(m_i, tl.max(qk, axis=1))
        alpha = tl.exp(m_i - m_new)
        prob = tl.exp(qk - m_new[:, None])
        l_i = l_i * alpha + tl.sum(prob, axis=1)
        acc = acc * alpha[:, None] + tl.dot(prob.to(v.dtype), v, input_precision=PRECISION)
        return m_new, l_i, acc

    # Values that change from step to step are not specialised on: each new value would compile a
    # new kernel (about a second) in the middle of a run.
    @triton.jit(do_not_specialize=["stride_bt", "num_splits", "partition"])
    def _decode_partial_kernel(q_ptr, k_ptr, v_ptr, tables_ptr, lens_ptr, m_ptr, l_ptr, acc_ptr,
                               stride_qs, stride_qh, stride_kt, stride_kh, stride_bt, scale, group,
                               num_splits, num_heads, partition,
                               BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_G: tl.constexpr,
                               BLOCK_N: tl.constexpr, PRECISION: tl.constexpr):
        """One program: sequence s, KV head kh, partition p of the context, all query heads of the group.
        Each K/V row is read once for the whole group (GQA), and the partition's partial softmax state
        (max, sum, weighted values) goes to scratch buffers for the reduce kernel."""
        s = tl.program_id(0)
        kh = tl.program_id(1)
        p = tl.program_id(2)
        offs_g = tl.arange(0, BLOCK_G)
        offs_d = tl.arange(0, HEAD_DIM)
        mask_g = offs_g < group
        heads = kh * group + offs_g
        q = tl.load(q_ptr + s * stride_qs + heads[:, None] * stride_qh + offs_d[None, :], mask=mask_g[:, None],
                    other=0.0)
        ctx = tl.load(lens_ptr + s)
        start = p * partition
        end = tl.minimum(start + partition, ctx)
        m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_G], tl.float32)
        acc = tl.zeros([BLOCK_G, HEAD_DIM], tl.float32)
        for n0 in range(start, end, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            mask_n = offs_n < end
            k, v = load_kv_tile(k_ptr, v_ptr, tables_ptr, s * stride_bt, offs_n, mask_n, offs_d, kh, stride_kt,
                                stride_kh, BLOCK_SIZE)
            qk = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
            qk = tl.where(mask_n[None, :], qk, float("-inf"))
            m_i, l_i, acc = online_softmax_step(qk, v, m_i, l_i, acc, PRECISION)
        state = (s * num_heads + heads) * num_splits + p
        tl.store(m_ptr + state, m_i, mask=mask_g)
        tl.store(l_ptr + state, l_i, mask=mask_g)
        tl.store(acc_ptr + state[:, None] * HEAD_DIM + offs_d[None, :], acc, mask=mask_g[:, None])

    @triton.jit(do_not_specialize=["num_splits"])
    def _decode_reduce_kernel(m_ptr, l_ptr, acc_ptr, out_ptr, stride_os, stride_oh, num_splits, num_heads,
                              HEAD_DIM: tl.constexpr, BLOCK_S: tl.constexpr):
        s = tl.program_id(0)
        h = tl.program_id(1)
        offs_p = tl.arange(0, BLOCK_S)
        offs_d = tl.arange(0, HEAD_DIM)
        mask_p = offs_p < num_splits
        state = (s * num_heads + h) * num_splits + offs_p
        m = tl.load(m_ptr + state, mask=mask_p, other=float("-inf"))
        l_part = tl.load(l_ptr + state, mask=mask_p, other=0.0)
        acc = tl.load(acc_ptr + state[:, None] * HEAD_DIM + offs_d[None, :], mask=mask_p[:, None], other=0.0)
        m_max = tl.max(m, axis=0)
        weight = tl.where(l_part > 0, tl.exp(m - m_max), 0.0)  # empty partitions (past the end) weigh 0
        total = tl.sum(weight * l_part, axis=0)
        out = tl.sum(weight[:, None] * acc, axis=0) / total
        tl.store(out_ptr + s * stride_os + h * stride_oh + offs_d, out.to(out_ptr.dtype.element_ty))


def decode_partition(num_seqs: int, num_kv_heads: int, max_context_len: int, block_n: int) -> int:
    """Tokens per partition: split long contexts so that small batches still fill the GPU."""
    wanted = max(1, -(-NUM_SMS_TARGET // max(1, num_seqs * num_kv_heads)))
    splits = max(1, min(wanted, -(-max_context_len // block_n)))
    per_split = -(-max_context_len // splits)
    return -(-per_split // block_n) * block_n


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                           context_lens: torch.Tensor, scale: float,
                           max_context_len: int | None = None) -> torch.Tensor:
    """Triton version of paged_decode_attention_ref (flash-decoding). CUDA-graph safe when
    max_context_len is given: no host syncs, and scratch sizes depend only on shapes."""
    num_seqs, num_heads, head_dim = q.shape
    out = torch.empty_like(q)
    if num_seqs == 0:
        return out
    num_kv_heads, block_size = k_cache.shape[2], k_cache.shape[1]
    group = num_heads // num_kv_heads
    if max_context_len is None:
        max_context_len = int(context_lens.max().item())
    block_n = 64 if head_dim <= 128 else 32
    partition = decode_partition(num_seqs, num_kv_heads, max_context_len, block_n)
    num_splits = -(-max_context_len // partition)
    m = torch.empty(num_seqs, num_heads, num_splits, dtype=torch.float32, device=q.device)
    l_sum = torch.empty_like(m)
    acc = torch.empty(num_seqs, num_heads, num_splits, head_dim, dtype=torch.float32, device=q.device)
    precision = "ieee" if q.dtype == torch.float32 else "tf32"
    _decode_partial_kernel[(num_seqs, num_kv_heads, num_splits)](
        q, k_cache, v_cache, block_tables, context_lens, m, l_sum, acc, q.stride(0), q.stride(1),
        k_cache.stride(1), k_cache.stride(2), block_tables.stride(0), scale, group, num_splits, num_heads, partition,
        BLOCK_SIZE=block_size, HEAD_DIM=head_dim, BLOCK_G=max(16, triton.next_power_of_2(group)), BLOCK_N=block_n,
        PRECISION=precision, num_warps=4)
    _decode_reduce_kernel[(num_seqs, num_heads)](m, l_sum, acc, out, out.stride(0), out.stride(1), num_splits,
                                                 num_heads, HEAD_DIM=head_dim,
                                                 BLOCK_S=triton.next_power_of_2(num_splits), num_warps=4)
    return out
