"""Weight-only quantized matmul (W4A16, W8A16) with the dequantization fused, beside its torch reference.

Layout contract (the AWQ and GPTQ loaders convert their checkpoints into exactly this):

    x        [M, K] fp16 / bf16 / fp32 activations. y = x @ W: [M, N] in x.dtype, no bias.
    W[k, n]  = (q[k, n] - z[g(k), n]) * s[g(k), n]
    qweight  int32 [K // P, N], P = 32 // bits, packed along K (GPTQ v1 order):
             q[k, n] = (qweight[k // P, n] >> ((k % P) * bits)) & (2**bits - 1)
    scales   [G, N], the activation dtype or fp16 (cast inside); G = number of groups
    qzeros   int32 [G, N // P], packed along N the same way:
             z[g, n] = (qzeros[g, n // P] >> ((n % P) * bits)) & (2**bits - 1)
             These are the actual zero points (the loader undoes GPTQ's stored zero - 1).
    group_size  K for a checkpoint's -1; g(k) = k // group_size, or
    g_idx    int32 [K] when given (GPTQ desc_act): g(k) = g_idx[k]
    bits     4 or 8

Kernels (`quant_matmul` picks one from M; both are CUDA-graph safe: no host sync, every buffer sized
by shapes only, split-K partials in a workspace summed by a second kernel, deterministically):

* `_gemv_kernel`, M <= GEMV_MAX_M (decode): memory-bound, so the unpack must cost fewer issue slots
  than its bytes take to arrive. An H200 streams 4.8 TB/s (9.6e12 int4 weights/s) and its 132 SMs
  issue about 33e12 thread-instructions/s: ~3.5 instructions per weight keep up with the peak, ~4
  with a measured copy bandwidth of ~4.2 TB/s. Per weight: one LOP3 masks the field in place and
  ORs in a float exponent chosen so that the word's bits read as 2**e + q exactly
  (no int-to-float conversion, which issues at 1/8 rate), one FADD removes 2**e, one FFMA
  accumulates x * q. Zero point and scale come once per tile and column:
  sum_k x_k (q_k - z) s = s (sum_k x_k q_k - z sum_k x_k), each K tile lying inside one group.
  Each thread holds 8 packed rows x 8 columns (two 128-bit loads per row), so sums over K stay in
  its registers until the one store; x comes in 16-byte rows and is split into fields in
  registers; K is split so that ~4 programs per SM exist. ptxas for sm_90 (run here, no GPU)
  gives ~4.0 instructions per int4 weight in the loop (1.15 LOP3, 1.1 FADD, 1.0 FFMA).
  The field masks are a run-time argument: as immediates ptxas re-creates them before every
  LOP3 (one more instruction per weight).
* `_dot_kernel`, larger M (decode batches and prefill): the same unpack, the tile dequantized to the
  activation dtype in registers and fed to tl.dot, one dot per field position j over the tile's
  BLOCK_K // P packed rows (so no register reshuffle is needed to put K in order: x's columns
  k = row * P + j are read with a stride instead). Split-K as well when the M x N tiles are few.
  About 6.5 instructions per weight at M = 16 (the tile goes through shared memory into the dot's
  layout), which beats re-unpacking per row in the GEMV from M = 2 on.

With g_idx every weight has its own group: s and z are gathered per weight (a slower path; a
loader that sorts K by group could avoid it by permuting x's columns instead).
On CPU tensors outside Triton's interpreter `quant_matmul` runs the reference, so the engine works
without a GPU.
"""
from __future__ import annotations

import os

import torch

from kernels.quant_pack import (  # noqa: F401 (re-exported)
    SUPPORTED_BITS,
    dequantize,
    pack_along_k,
    pack_along_n,
    unpack_along_k,
    unpack_along_n,
    values_per_word,
)

ACT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
GEMV_MAX_M = 1  # the FMA kernel re-unpacks the weights per row: past one row the tensor-core path is cheaper
DECODE_MAX_M = 16  # up to here the dot kernel takes one 16-row tile and splits K like the GEMV
DECODE_PROGRAMS = 528  # about four programs per SM of an H100/H200: enough loads in flight to stream HBM
GEMM_PROGRAMS = 264  # compute-bound tiles: about two waves
MIN_TILES_PER_SPLIT = 4  # fewer K tiles per program and the split's partial sums cost more than they save
# GEMV tile: each thread holds 8 packed rows x 8 columns (two 128-bit loads per row); BLOCK_N follows.
# Chosen by counting the SASS of the loop for sm_90 (ptxas here, no GPU): about 4 instructions per int4
# weight, of which 3 are the unpack and FMA themselves.
GEMV_ROWS = 8
GEMV_COLS_PER_THREAD = 8
GEMV_WARPS = 2


def quant_matmul_reference(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, qzeros: torch.Tensor,
                           bits: int, group_size: int, g_idx: torch.Tensor | None = None) -> torch.Tensor:
    """Dequantize W to float32, then x @ W in float32, rounded to x.dtype."""
    check_args(x, qweight, scales, qzeros, bits, group_size, g_idx)
    w = dequantize(qweight, scales, qzeros, bits, group_size, g_idx)
    return (x.float() @ w).to(x.dtype)


def check_args(x, qweight, scales, qzeros, bits, group_size, g_idx) -> tuple[int, int, int]:
    """(M, K, N) of a call, or a ValueError that names the argument out of contract."""
    p = values_per_word(bits)
    if x.dim() != 2 or x.dtype not in ACT_DTYPES:
        raise ValueError(f"x must be 2-D fp16/bf16/fp32, got {tuple(x.shape)} {x.dtype}")
    if qweight.dtype != torch.int32 or qzeros.dtype != torch.int32:
        raise ValueError(f"qweight and qzeros must be int32, got {qweight.dtype} and {qzeros.dtype}")
    m, k = x.shape
    n = qweight.shape[1]
    if qweight.dim() != 2 or qweight.shape[0] * p != k:
        raise ValueError(f"qweight {tuple(qweight.shape)} does not pack K={k} {bits}-bit along K: want [{k // p}, N]")
    if scales.dim() != 2 or scales.shape[1] != n or scales.dtype not in ACT_DTYPES:
        raise ValueError(f"scales must be [G, {n}] fp16/bf16/fp32, got {tuple(scales.shape)} {scales.dtype}")
    if n % p or tuple(qzeros.shape) != (scales.shape[0], n // p):
        raise ValueError(f"qzeros {tuple(qzeros.shape)} must be [G={scales.shape[0]}, N // {p}] with N={n}")
    if group_size <= 0 or group_size % p:
        raise ValueError(f"group_size={group_size} must be a positive multiple of {p} (K={k} for -1)")
    if g_idx is None and scales.shape[0] != -(-k // group_size):
        raise ValueError(f"{scales.shape[0]} groups of scales, but K={k} / group_size={group_size} needs "
                         f"{-(-k // group_size)}")
    if g_idx is not None and (g_idx.dtype != torch.int32 or tuple(g_idx.shape) != (k,)):
        raise ValueError(f"g_idx must be int32 [{k}], got {tuple(g_idx.shape)} {g_idx.dtype}")
    devices = {t.device for t in (x, qweight, scales, qzeros) + ((g_idx,) if g_idx is not None else ())}
    if len(devices) != 1:
        raise ValueError(f"all tensors must be on one device, got {sorted(map(str, devices))}")
    if not (qweight.is_contiguous() and scales.is_contiguous() and qzeros.is_contiguous()):
        raise ValueError("qweight, scales and qzeros must be contiguous")
    return m, k, n


try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs use the reference
    triton = None


if triton is not None:
    @triton.jit
    def _field(w, hi, fmask, J: tl.constexpr, BITS: tl.constexpr):
        """Field J of every packed word, as an exact float32. Fields 0..16/BITS-1 sit in the low half
        of w, the rest in the low half of hi = w >> 16, so each is masked in place (bits < 16) and
        ORed with the exponent 150 - pos: the float then reads 2**(23 - pos) + q."""
        HALF: tl.constexpr = 16 // BITS
        POS: tl.constexpr = (J % HALF) * BITS
        EXP: tl.constexpr = (150 - POS) << 23
        if J < HALF:
            bits = (w & (fmask << POS)) | EXP
        else:
            bits = (hi & (fmask << POS)) | EXP
        return bits.to(tl.float32, bitcast=True) - (1 << (23 - POS))

    @triton.jit
    def _split_fields(xt, ROWS: tl.constexpr, P: tl.constexpr):
        """[ROWS, P] -> tuple of P [ROWS] columns."""
        if P == 8:
            a, b = tl.split(tl.reshape(xt, [ROWS, 4, 2]))
            a0, a1 = tl.split(tl.reshape(a, [ROWS, 2, 2]))
            b0, b1 = tl.split(tl.reshape(b, [ROWS, 2, 2]))
            c0, c4 = tl.split(a0)
            c2, c6 = tl.split(a1)
            c1, c5 = tl.split(b0)
            c3, c7 = tl.split(b1)
            return (c0, c1, c2, c3, c4, c5, c6, c7)
        else:
            a, b = tl.split(tl.reshape(xt, [ROWS, 2, 2]))
            c0, c2 = tl.split(a)
            c1, c3 = tl.split(b)
            return (c0, c1, c2, c3)

    @triton.jit
    def _scale_zero(s_ptr, z_ptr, g, offs_n, mask, N, BITS: tl.constexpr):
        """s[g, n] and z[g, n] as float32 (g and offs_n broadcast against each other)."""
        P: tl.constexpr = 32 // BITS
        s = tl.load(s_ptr + g * N + offs_n, mask=mask, other=0.0).to(tl.float32)
        zw = tl.load(z_ptr + g * (N // P) + offs_n // P, mask=mask, other=0)
        z = ((zw >> ((offs_n % P) * BITS)) & ((1 << BITS) - 1)).to(tl.float32)
        return s, z

    @triton.jit
    def _tile_scale_zero(s_ptr, z_ptr, k0, rows, offs_n, mask_n, mask_r, N, group_size, BITS: tl.constexpr,
                         TILE_IN_GROUP: tl.constexpr):
        """Scale and zero of a tile's packed rows (no g_idx): one [1, BLOCK_N] row when the tile lies
        in one group, else [BLOCK_K // P, BLOCK_N] (every field of a word shares its group, as P
        divides group_size)."""
        P: tl.constexpr = 32 // BITS
        if TILE_IN_GROUP:
            s, z = _scale_zero(s_ptr, z_ptr, k0 // group_size, offs_n[None, :], mask_n[None, :], N, BITS)
        else:
            s, z = _scale_zero(s_ptr, z_ptr, ((rows * P) // group_size)[:, None], offs_n[None, :],
                               mask_r[:, None] & mask_n[None, :], N, BITS)
        return s, z

    # M, the x stride and the split length change with the batch: not specialised on, or each new
    # divisibility would compile a new kernel (about a second) in the middle of a run.
    @triton.jit(do_not_specialize=["M", "stride_xm", "k_per_split"])
    def _gemv_kernel(x_ptr, qw_ptr, s_ptr, z_ptr, gidx_ptr, out_ptr, M, N, K, stride_xm, k_per_split, group_size, fmask,
                     BITS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, HAS_GIDX: tl.constexpr):
        """One program: row m of x, BLOCK_N output columns, one split of K; FMA on CUDA cores. BLOCK_N
        spans every thread's 128-bit loads side by side, so a thread holds all the tile's packed rows of
        its columns: the sums over K never leave the thread until the one store. Without g_idx the
        host makes each K tile lie inside one group."""
        pid_n = tl.program_id(0)
        split = tl.program_id(1)
        m = tl.program_id(2)
        P: tl.constexpr = 32 // BITS
        BLOCK_KP: tl.constexpr = BLOCK_K // P
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        x_row = x_ptr + m.to(tl.int64) * stride_xm
        acc = tl.zeros([BLOCK_N], dtype=tl.float32)
        k_start = split * k_per_split
        for k0 in range(k_start, tl.minimum(k_start + k_per_split, K), BLOCK_K):
            rows = k0 // P + tl.arange(0, BLOCK_KP)
            mask_r = rows < K // P
            mask_w = mask_r[:, None] & mask_n[None, :]
            w = tl.load(qw_ptr + rows[:, None] * N + offs_n[None, :], mask=mask_w, other=0)
            hi = w >> 16
            if HAS_GIDX:
                part = tl.zeros([BLOCK_KP, BLOCK_N], dtype=tl.float32)
                for j in tl.static_range(P):
                    xj = tl.load(x_row + rows * P + j, mask=mask_r, other=0.0).to(tl.float32)
                    g = tl.load(gidx_ptr + rows * P + j, mask=mask_r, other=0)
                    s, z = _scale_zero(s_ptr, z_ptr, g[:, None], offs_n[None, :], mask_w, N, BITS)
                    part = tl.fma(xj[:, None], (_field(w, hi, fmask, j, BITS) - z) * s, part)
                acc += tl.sum(part, axis=0)
            else:
                # sum_k x_k (q_k - z) s = s (sum_k x_k q_k - z sum_k x_k): s and z once per tile and column.
                t = tl.zeros([BLOCK_KP, BLOCK_N], dtype=tl.float32)
                xt = tl.load(x_row + rows[:, None] * P + tl.arange(0, P)[None, :], mask=mask_r[:, None], other=0.0)
                xt = xt.to(tl.float32)
                xs = _split_fields(xt, BLOCK_KP, P)
                for j in tl.static_range(P):
                    t = tl.fma(xs[j][:, None], _field(w, hi, fmask, j, BITS), t)
                s, z = _scale_zero(s_ptr, z_ptr, k0 // group_size, offs_n, mask_n, N, BITS)
                acc = tl.fma(s, tl.fma(-z, tl.sum(tl.sum(xt, axis=1), axis=0), tl.sum(t, axis=0)), acc)
        out = out_ptr + (split * M + m).to(tl.int64) * N + offs_n
        tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=mask_n)

    @triton.jit(do_not_specialize=["M", "stride_xm", "k_per_split"])
    def _dot_kernel(x_ptr, qw_ptr, s_ptr, z_ptr, gidx_ptr, out_ptr, M, N, K, stride_xm, k_per_split, group_size, fmask,
                    BITS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                    GROUP_M: tl.constexpr, HAS_GIDX: tl.constexpr, TILE_IN_GROUP: tl.constexpr,
                    PRECISION: tl.constexpr):
        """One program: a BLOCK_M x BLOCK_N output tile, one split of K. Tensor cores."""
        # Programs walk GROUP_M row tiles per column tile, so neighbours share weight tiles in L2.
        pid = tl.program_id(0)
        split = tl.program_id(1)
        num_m = tl.cdiv(M, BLOCK_M)
        num_n = tl.cdiv(N, BLOCK_N)
        per_group = GROUP_M * num_n
        first_m = (pid // per_group) * GROUP_M
        group_rows = tl.minimum(num_m - first_m, GROUP_M)
        pid_m = first_m + (pid % per_group) % group_rows
        pid_n = (pid % per_group) // group_rows
        P: tl.constexpr = 32 // BITS
        BLOCK_KP: tl.constexpr = BLOCK_K // P
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        mask_m = offs_m < M
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        k_start = split * k_per_split
        for k0 in range(k_start, tl.minimum(k_start + k_per_split, K), BLOCK_K):
            rows = k0 // P + tl.arange(0, BLOCK_KP)
            mask_r = rows < K // P
            mask_w = mask_r[:, None] & mask_n[None, :]
            w = tl.load(qw_ptr + rows[:, None] * N + offs_n[None, :], mask=mask_w, other=0)
            hi = w >> 16
            if not HAS_GIDX:
                s, z = _tile_scale_zero(s_ptr, z_ptr, k0, rows, offs_n, mask_n, mask_r, N, group_size, BITS,
                                        TILE_IN_GROUP)
                zs = z * s
            for j in tl.static_range(P):
                xj = tl.load(x_rows + (rows * P + j)[None, :], mask=mask_m[:, None] & mask_r[None, :], other=0.0)
                if HAS_GIDX:
                    g = tl.load(gidx_ptr + rows * P + j, mask=mask_r, other=0)
                    s, z = _scale_zero(s_ptr, z_ptr, g[:, None], offs_n[None, :], mask_w, N, BITS)
                    wj = (_field(w, hi, fmask, j, BITS) - z) * s
                else:
                    wj = tl.fma(_field(w, hi, fmask, j, BITS), s, -zs)
                acc = tl.dot(xj, wj.to(xj.dtype), acc, input_precision=PRECISION)
        out = out_ptr + (split * M + offs_m).to(tl.int64)[:, None] * N + offs_n[None, :]
        tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])

    @triton.jit
    def _sum_splits_kernel(ws_ptr, out_ptr, numel, splits, BLOCK: tl.constexpr):
        """out = sum over splits of the fp32 partials [splits, M, N], in the output's dtype."""
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < numel
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for s in range(splits):
            acc += tl.load(ws_ptr + s * numel + offs, mask=mask, other=0.0)
        tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def split_k(k_tiles: int, programs: int, target: int) -> tuple[int, int]:
    """(splits, K tiles per split): enough programs to reach `target`, each with at least
    MIN_TILES_PER_SPLIT tiles, and no empty split. Depends on shapes only (fixed per layer and M)."""
    wanted = max(1, min(_cdiv(target, programs), k_tiles // MIN_TILES_PER_SPLIT))
    per_split = _cdiv(k_tiles, wanted)
    return _cdiv(k_tiles, per_split), per_split


def _tile_k(group_size: int, bits: int, has_gidx: bool, limit: int) -> int:
    """BLOCK_K of the GEMV: the largest power of two <= limit that divides group_size, so that each
    tile lies in one group (then s and z are read once per tile); P divides group_size, so >= P."""
    if has_gidx:
        return limit
    block = values_per_word(bits)
    while block * 2 <= limit and group_size % (block * 2) == 0:
        block *= 2
    return block


def _finish(out: torch.Tensor, m: int, n: int, splits: int, dtype: torch.dtype) -> torch.Tensor:
    """The kernels wrote [splits, M, N]: sum the splits into [M, N] of dtype (nothing to do for one)."""
    if splits == 1:
        return out.view(m, n)
    y = torch.empty(m, n, dtype=dtype, device=out.device)
    block = 1024
    _sum_splits_kernel[(_cdiv(m * n, block),)](out, y, m * n, splits, BLOCK=block, num_warps=4)
    return y


def _prepare(x, qweight, scales, qzeros, bits, group_size, g_idx, block_k, programs_per_split, splits, target):
    """Checks, a unit-stride x, and the split of K: (x, m, n, k, splits, per_split in tiles, workspace)."""
    m, k, n = check_args(x, qweight, scales, qzeros, bits, group_size, g_idx)
    x = x if x.stride(1) == 1 else x.contiguous()
    k_tiles = _cdiv(k, block_k)
    if splits is None:
        splits, per_split = split_k(k_tiles, max(1, programs_per_split), target)
    else:
        per_split = _cdiv(k_tiles, splits)
    # One split writes the output itself; more write float32 partials that _finish sums.
    out = torch.empty(splits, m, n, dtype=x.dtype if splits == 1 else torch.float32, device=x.device)
    return x, m, n, k, splits, per_split, out


def gemv_quant_matmul(x, qweight, scales, qzeros, bits, group_size, g_idx=None, *, splits=None) -> torch.Tensor:
    """quant_matmul through the FMA kernel (one program per row of x). `splits` overrides the
    split-K heuristic (tests)."""
    block_n = GEMV_COLS_PER_THREAD * 32 * GEMV_WARPS
    block_k = _tile_k(group_size, bits, g_idx is not None, GEMV_ROWS * values_per_word(bits))
    n_blocks = _cdiv(qweight.shape[1], block_n)
    x, m, n, k, splits, per_split, out = _prepare(x, qweight, scales, qzeros, bits, group_size, g_idx, block_k,
                                                  n_blocks * x.shape[0], splits, DECODE_PROGRAMS)
    if m:
        _gemv_kernel[(n_blocks, splits, m)](
            x, qweight, scales, qzeros, qweight if g_idx is None else g_idx, out, m, n, k, x.stride(0),
            per_split * block_k, group_size, (1 << bits) - 1, BITS=bits, BLOCK_N=block_n, BLOCK_K=block_k,
            HAS_GIDX=g_idx is not None, num_warps=GEMV_WARPS)
    return _finish(out, m, n, splits, x.dtype)


def dot_quant_matmul(x, qweight, scales, qzeros, bits, group_size, g_idx=None, *, splits=None,
                     block_m=None, block_n=128) -> torch.Tensor:
    """quant_matmul through the tensor-core kernel. block_m defaults from M (16 for decode batches)."""
    m = x.shape[0]
    if block_m is None:
        block_m = 16 if m <= DECODE_MAX_M else 32 if m <= 32 else 64 if m <= 128 else 128
        if x.dtype == torch.float32:  # fp32 dots run on CUDA cores: bigger tiles only spill registers
            block_m = min(block_m, 32)
    block_k = 16 * values_per_word(bits)  # 16 packed rows: the K of one tl.dot per field position
    tiles = _cdiv(m, block_m) * _cdiv(qweight.shape[1], block_n)
    x, m, n, k, splits, per_split, out = _prepare(x, qweight, scales, qzeros, bits, group_size, g_idx, block_k,
                                                  tiles, splits,
                                                  DECODE_PROGRAMS if m <= DECODE_MAX_M else GEMM_PROGRAMS)
    if m:
        _dot_kernel[(tiles, splits)](
            x, qweight, scales, qzeros, qweight if g_idx is None else g_idx, out, m, n, k, x.stride(0),
            per_split * block_k, group_size, (1 << bits) - 1, BITS=bits, BLOCK_M=block_m, BLOCK_N=block_n,
            BLOCK_K=block_k, GROUP_M=8, HAS_GIDX=g_idx is not None, TILE_IN_GROUP=group_size % block_k == 0,
            PRECISION="ieee" if x.dtype == torch.float32 else "tf32", num_warps=4 if block_m <= 64 else 8,
            num_stages=3)
    return _finish(out, m, n, splits, x.dtype)


def _use_triton(x: torch.Tensor) -> bool:
    return triton is not None and (x.is_cuda or os.environ.get("TRITON_INTERPRET") == "1")


def quant_matmul(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, qzeros: torch.Tensor, bits: int,
                 group_size: int, g_idx: torch.Tensor | None = None) -> torch.Tensor:
    """y = x @ W for the packed W of the module docstring: [M, N] in x.dtype."""
    if not _use_triton(x):
        return quant_matmul_reference(x, qweight, scales, qzeros, bits, group_size, g_idx)
    if x.shape[0] <= GEMV_MAX_M:
        return gemv_quant_matmul(x, qweight, scales, qzeros, bits, group_size, g_idx)
    return dot_quant_matmul(x, qweight, scales, qzeros, bits, group_size, g_idx)
