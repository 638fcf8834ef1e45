"""GPU micro-benchmarks of the kernels: `python -m kernels.bench --out FILE.json`.

Decode attention is memory-bound: its figure of merit is bytes of K/V read per second against the
device's measured copy bandwidth."""
from __future__ import annotations

import argparse
import json
import os
import subprocess

import torch
import triton

from kernels import activation, paged_attention, prefill_attention, rmsnorm, rotary


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


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="kernels-bench.json")
    args = parser.parse_args()
    bandwidth = copy_bandwidth()
    decode = [decode_case(64, 4096, 28, 4, 128), decode_case(256, 1024, 14, 2, 64), decode_case(1, 4096, 28, 4, 128)]
    for d in decode:
        d["fraction_of_copy_bandwidth"] = d["bandwidth_GBps"] * 1e9 / bandwidth
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
    commit = os.environ.get("PAGEDBENCH_COMMIT") or subprocess.run(  # the GPU machine's copy has no .git
        ["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    result = {"commit": commit, "device": torch.cuda.get_device_name(), "command": "python -m kernels.bench",
              "torch": torch.__version__, "triton": triton.__version__, "copy_bandwidth_GBps": bandwidth / 1e9,
              "decode": decode, "prefill": [prefill_case(8, 512, 28, 4, 128), prefill_case(4, 2048, 14, 2, 64)],
              "fused_add_rmsnorm_8192x3584_ms": norm_ms,
              "fused_add_rmsnorm_GBps": 4 * x.numel() * 2 / (norm_ms / 1e3) / 1e9,
              "rotary_8192_tokens_7b_ms": rope_ms, "silu_and_mul_8192x18944_ms": silu_ms,
              "silu_and_mul_GBps": 1.5 * gate_up.numel() * 2 / (silu_ms / 1e3) / 1e9}
    print(json.dumps(result, indent=2))
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
