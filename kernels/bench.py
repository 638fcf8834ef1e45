"""GPU micro-benchmarks of the kernels: `python -m kernels.bench --out FILE.json [--only SECTION ...]`.

Decode attention is memory-bound: its figure of merit is bytes of K/V read per second against the
device's measured copy bandwidth. So is the W4A16 matmul at M = 1 (`quant`): int4 weight bytes
read per second against the same copy bandwidth, beside torch's bf16 matmul at the same shape."""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import torch
import triton

from kernels import activation, paged_attention, prefill_attention, quant_gemm, rmsnorm, rotary


def median_ms(fn) -> float:
    return triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median")


def copy_bandwidth(nbytes: int = 2 << 30) -> float:
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src))
    return 2 * nbytes / (ms / 1e3)  # read + write


def decode_case(batch: int, context: int, heads: int, kv_heads: int, head_dim: int, block: int = 16) -> dict:
    blocks_per_seq = context // block
    num_blocks = batch * blocks_per_seq
    k_cache = torch.randn(num_blocks, block, kv_heads, head_dim, device="cuda", dtype=torch.bfloat16)
    v_cache = torch.randn_like(k_cache)
    tables = torch.randperm(num_blocks, device="cuda", dtype=torch.int32).view(batch, blocks_per_seq)
    lens = torch.full((batch,), context, dtype=torch.int32, device="cuda")
    q = torch.randn(batch, heads, head_dim, device="cuda", dtype=torch.bfloat16)
    ms = median_ms(lambda: paged_attention.paged_decode_attention(q, k_cache, v_cache, tables, lens,
                                                                  head_dim ** -0.5, max_context_len=context))
    nbytes = 2 * k_cache.numel() * 2 + 2 * q.numel() * 2
    return {"batch": batch, "context": context, "heads": heads, "kv_heads": kv_heads, "head_dim": head_dim,
            "block_size": block, "ms": ms, "bytes": nbytes, "bandwidth_GBps": nbytes / (ms / 1e3) / 1e9}


def prefill_case(seqs: int, length: int, heads: int, kv_heads: int, head_dim: int) -> dict:
    block = 16
    blocks = seqs * length // block
    k_cache = torch.randn(blocks, block, kv_heads, head_dim, device="cuda", dtype=torch.bfloat16)
    v_cache = torch.randn_like(k_cache)
    tables = torch.arange(blocks, device="cuda", dtype=torch.int32).view(seqs, -1)
    lens = torch.full((seqs,), length, dtype=torch.int32, device="cuda")
    cu = torch.arange(0, (seqs + 1) * length, length, dtype=torch.int32, device="cuda")
    q = torch.randn(seqs * length, heads, head_dim, device="cuda", dtype=torch.bfloat16)
    ours = median_ms(lambda: prefill_attention.paged_prefill_attention(q, k_cache, v_cache, tables, cu, lens,
                                                                       head_dim ** -0.5, max_query_len=length))
    qs = q.view(seqs, length, heads, head_dim).transpose(1, 2)
    ks = k_cache.view(seqs, length, kv_heads, head_dim).transpose(1, 2).repeat_interleave(heads // kv_heads, 1)
    vs = v_cache.view(seqs, length, kv_heads, head_dim).transpose(1, 2).repeat_interleave(heads // kv_heads, 1)
    sdpa = median_ms(lambda: torch.nn.functional.scaled_dot_product_attention(qs, ks, vs, is_causal=True))
    flops = 4 * seqs * heads * head_dim * length * length / 2
    return {"seqs": seqs, "length": length, "heads": heads, "kv_heads": kv_heads, "head_dim": head_dim,
            "ms": ours, "torch_sdpa_contiguous_ms": sdpa, "tflops": flops / (ours / 1e3) / 1e12}


L2_BYTES = 50 << 20  # H100 and H200 L2: a working set of several times this is read from HBM


def graph_ms_per_call(calls: list) -> float:
    """Time of one call when `calls` run back to back as one CUDA graph: no launch gaps between the
    small kernels of a decode-sized matmul (eager launches would dominate a 10 us kernel)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # compile and warm up outside the capture
        for call in calls:
            call()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for call in calls:
            call()
    return median_ms(graph.replay) / len(calls)


def quant_case(m: int, k: int, n: int, bandwidth: float, group_size: int = 128) -> dict:
    """W4A16 (bf16 activations, AWQ/GPTQ-style zero points) against bf16 torch.matmul at one shape.
    Each call reads its own copy of the weights, the copies together several times L2, so neither
    side is timed out of cache."""
    def weights():
        return (torch.randint(-2 ** 31, 2 ** 31, (k // 8, n), dtype=torch.int32, device="cuda"),
                (torch.rand(k // group_size, n, device="cuda") * 0.01).to(torch.bfloat16),
                torch.randint(-2 ** 31, 2 ** 31, (k // group_size, n // 8), dtype=torch.int32, device="cuda"))

    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    qbytes = k * n // 2
    sets = [weights() for _ in range(max(2, -(-3 * L2_BYTES // qbytes)))]
    ms = graph_ms_per_call([lambda w=w: quant_gemm.quant_matmul(x, *w, 4, group_size) for w in sets])
    copies = max(2, -(-3 * L2_BYTES // (2 * k * n)))
    dense = [torch.randn(k, n, device="cuda", dtype=torch.bfloat16) for _ in range(copies)]
    bf16_ms = graph_ms_per_call([lambda w=w: torch.matmul(x, w) for w in dense])
    weight_bps = (qbytes + sum(t.nbytes for t in sets[0][1:])) / (ms / 1e3)
    return {"m": m, "k": k, "n": n, "bits": 4, "group_size": group_size, "activation": "bfloat16",
            "kernel": "gemv" if m <= quant_gemm.GEMV_MAX_M else "dot", "ms": ms,
            "int4_weight_bytes": qbytes, "weight_GBps": qbytes / (ms / 1e3) / 1e9,
            "fraction_of_copy_bandwidth": qbytes / (ms / 1e3) / bandwidth,
            "weights_scales_zeros_GBps": weight_bps / 1e9,
            "bf16_matmul_ms": bf16_ms, "speedup_vs_bf16": bf16_ms / ms}


def quant_cases(bandwidth: float) -> list[dict]:
    """Qwen2.5-7B's MLP: gate/up (K = 3584, N = 18944) and down (K = 18944, N = 3584)."""
    return [quant_case(m, k, n, bandwidth) for m in (1, 8) for k, n in [(3584, 18944), (18944, 3584)]]


def misc_cases() -> dict:
    x = torch.randn(8192, 3584, device="cuda", dtype=torch.bfloat16)
    w = torch.ones(3584, device="cuda", dtype=torch.bfloat16)
    norm_ms = median_ms(lambda: rmsnorm.fused_add_rmsnorm(x, x, w, 1e-6))
    cos = torch.randn(32768, 64, device="cuda")
    q = torch.randn(8192, 28, 128, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(8192, 4, 128, device="cuda", dtype=torch.bfloat16)
    pos = torch.randint(0, 32768, (8192,), device="cuda")
    rope_ms = median_ms(lambda: rotary.rotary_embedding(pos, q, k, cos, cos))
    gate_up = torch.randn(8192, 2 * 18944, device="cuda", dtype=torch.bfloat16)
    silu_ms = median_ms(lambda: activation.silu_and_mul(gate_up))
    return {"fused_add_rmsnorm_8192x3584_ms": norm_ms,
            "fused_add_rmsnorm_GBps": 4 * x.numel() * 2 / (norm_ms / 1e3) / 1e9,
            "rotary_8192_tokens_7b_ms": rope_ms, "silu_and_mul_8192x18944_ms": silu_ms,
            "silu_and_mul_GBps": 1.5 * gate_up.numel() * 2 / (silu_ms / 1e3) / 1e9}


def decode_cases(bandwidth: float) -> list[dict]:
    decode = [decode_case(64, 4096, 28, 4, 128), decode_case(256, 1024, 14, 2, 64), decode_case(1, 4096, 28, 4, 128)]
    for d in decode:
        d["fraction_of_copy_bandwidth"] = d["bandwidth_GBps"] * 1e9 / bandwidth
    return decode


SECTIONS = {  # name -> (result key or None to merge, function of the copy bandwidth)
    "decode": ("decode", decode_cases),
    "prefill": ("prefill", lambda bw: [prefill_case(8, 512, 28, 4, 128), prefill_case(4, 2048, 14, 2, 64)]),
    "misc": (None, lambda bw: misc_cases()),
    "quant": ("quant", quant_cases),
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="kernels-bench.json")
    parser.add_argument("--only", nargs="+", choices=list(SECTIONS), help="run these sections (default: all)")
    args = parser.parse_args()
    bandwidth = copy_bandwidth()
    commit = os.environ.get("PAGEDBENCH_COMMIT") or subprocess.run(  # the GPU machine's copy has no .git
        ["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    result = {"commit": commit, "device": torch.cuda.get_device_name(),
              "command": " ".join(["python -m kernels.bench"] + sys.argv[1:]),
              "torch": torch.__version__, "triton": triton.__version__, "copy_bandwidth_GBps": bandwidth / 1e9}
    for name in args.only or list(SECTIONS):
        key, run = SECTIONS[name]
        if key is None:
            result.update(run(bandwidth))
        else:
            result[key] = run(bandwidth)
    print(json.dumps(result, indent=2))
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
