"""Triton kernels, each beside its plain-torch reference (the `*_ref` functions).

KV-cache layout shared by every kernel: one tensor per layer for K and one for V, each
[num_blocks, block_size, num_kv_heads, head_dim]. A token's slot is
block_id * block_size + offset; slot -1 means "do not store" (padding).
"""
