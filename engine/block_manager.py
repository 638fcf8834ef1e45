"""Paged KV-cache bookkeeping: fixed-size blocks, reference counts, block tables, prefix caching.

Prefix caching: a full block is identified by the hash of (its parent block's hash, its
token ids, extra keys such as a LoRA id). Blocks whose K/V is computed are registered under
that hash; a new sequence whose leading full blocks hash the same reuses them (ref count + 1).
Freed blocks keep their contents and hash until they are handed out again, in LRU order, so
a later request can still hit them.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

from engine.sequence import Sequence

NO_HASH = -1


@dataclass
class Block:
    block_id: int
    ref_count: int = 0
    hash: int = NO_HASH
    token_ids: tuple[int, ...] = field(default=())


def chain_hash(parent_hash: int, token_ids: tuple[int, ...], extra_key: object = None) -> int:
    return hash((parent_hash, token_ids, extra_key))


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool):
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        # Free blocks in eviction order (least recently freed first); an ordered set.
        self.free_blocks: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self.hash_to_block: dict[int, int] = {}
        self.prefix_queries = 0  # prompt tokens looked up in the prefix cache
        self.prefix_hits = 0  # of those, tokens found

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_blocks)

    def usage(self) -> float:
        return 1.0 - self.num_free_blocks / self.num_blocks

    def blocks_needed(self, seq: Sequence, num_new_tokens: int) -> int:
        total = (seq.num_computed_tokens + num_new_tokens + self.block_size - 1) // self.block_size
        return max(0, total - len(seq.block_table))

    def can_allocate(self, seq: Sequence, num_new_tokens: int) -> bool:
        return self.blocks_needed(seq, num_new_tokens) <= self.num_free_blocks

    def allocate(self, seq: Sequence, num_new_tokens: int) -> None:
        """Give `seq` enough blocks to hold its computed tokens plus `num_new_tokens` more."""
        for _ in range(self.blocks_needed(seq, num_new_tokens)):
            seq.block_table.append(self._take_free_block())

    def _take_free_block(self) -> int:
        block_id, _ = self.free_blocks.popitem(last=False)
        block = self.blocks[block_id]
        assert block.ref_count == 0, f"free block {block_id} has ref_count {block.ref_count}"
        if block.hash != NO_HASH and self.hash_to_block.get(block.hash) == block_id:
            del self.hash_to_block[block.hash]  # evict its cached contents
        block.hash, block.token_ids, block.ref_count = NO_HASH, (), 1
        return block_id

    def match_prefix(self, seq: Sequence, extra_key: object = None) -> int:
        """On first admission: attach cached blocks for the longest cached run of full blocks at the
        start of the sequence. Returns the number of tokens whose K/V came from the cache (the
        scheduler records it as computed). At least one token is always left to compute, since the
        step must produce logits for it."""
        if not self.enable_prefix_caching:
            return 0
        assert not seq.block_table and seq.num_computed_tokens == 0 and not seq.num_pending_tokens
        self.prefix_queries += seq.num_prompt_tokens
        max_blocks = (len(seq.token_ids) - 1) // self.block_size
        parent = NO_HASH
        for i in range(max_blocks):
            tokens = tuple(seq.token_ids[i * self.block_size:(i + 1) * self.block_size])
            h = chain_hash(parent, tokens, extra_key)
            block_id = self.hash_to_block.get(h)
            if block_id is None or self.blocks[block_id].token_ids != tokens:
                break
            block = self.blocks[block_id]
            if block.ref_count == 0:
                del self.free_blocks[block_id]
            block.ref_count += 1
            seq.block_table.append(block_id)
            seq.block_hashes.append(h)
            parent = h
        hit = len(seq.block_table) * self.block_size
        self.prefix_hits += min(hit, seq.num_prompt_tokens)
        return hit

    def register_full_blocks(self, seq: Sequence, num_tokens: int, extra_key: object = None) -> None:
        """Hash the blocks of `seq` that are full once its first `num_tokens` tokens are in the cache, so
        that other requests can share them. Called when a step is scheduled: a sequence admitted later in
        the same step may already use them, since every layer stores the step's K/V before attending.
        `seq.block_hashes` remembers the chain so each block is hashed once."""
        if not self.enable_prefix_caching:
            return
        num_tokens = min(num_tokens, len(seq.token_ids))  # a token still on the device: hash its block later
        num_full = num_tokens // self.block_size
        for i in range(len(seq.block_hashes), num_full):
            parent = seq.block_hashes[-1] if seq.block_hashes else NO_HASH
            block = self.blocks[seq.block_table[i]]
            tokens = tuple(seq.token_ids[i * self.block_size:(i + 1) * self.block_size])
            h = chain_hash(parent, tokens, extra_key)
            if block.hash == NO_HASH:
                block.hash, block.token_ids = h, tokens
                # First writer wins; a duplicate block simply stays unshared.
                self.hash_to_block.setdefault(h, block.block_id)
            seq.block_hashes.append(h)

    def free(self, seq: Sequence) -> None:
        """Drop `seq`'s references. Its tail blocks are queued for eviction before its head blocks,
        so that the shared heads of prompts stay cached longest."""
        for block_id in reversed(seq.block_table):
            block = self.blocks[block_id]
            block.ref_count -= 1
            assert block.ref_count >= 0, f"block {block_id} ref_count went negative"
            if block.ref_count == 0:
                self.free_blocks[block_id] = None
        seq.block_table = []
        seq.block_hashes = []

    def trim(self, seq: Sequence, num_blocks: int) -> None:
        """Drop `seq`'s blocks past the first `num_blocks` (the KV of rejected draft tokens). They were
        never registered in the prefix cache: only full blocks of known tokens are."""
        assert len(seq.block_hashes) <= num_blocks, "a registered block cannot be trimmed"
        for block_id in reversed(seq.block_table[num_blocks:]):
            block = self.blocks[block_id]
            block.ref_count -= 1
            assert block.ref_count >= 0, f"block {block_id} ref_count went negative"
            if block.ref_count == 0:
                self.free_blocks[block_id] = None
        del seq.block_table[num_blocks:]

    def reset_prefix_cache(self) -> bool:
        """Forget every cached block (vLLM's /reset_prefix_cache), so the next request starts cold.
        Blocks in use keep their contents for their sequences but are no longer found by lookups."""
        if not self.enable_prefix_caching:
            return False
        self.hash_to_block.clear()
        for block_id in self.free_blocks:
            self.blocks[block_id].hash, self.blocks[block_id].token_ids = NO_HASH, ()
        return True

    def check_invariants(self, live_seqs: list[Sequence]) -> None:
        """For tests: ref counts equal the number of live block tables holding each block."""
        counts = [0] * self.num_blocks
        for seq in live_seqs:
            for block_id in seq.block_table:
                counts[block_id] += 1
        for block in self.blocks:
            assert block.ref_count == counts[block.block_id], (
                f"block {block.block_id}: ref_count {block.ref_count}, held by {counts[block.block_id]} tables")
            assert (block.ref_count == 0) == (block.block_id in self.free_blocks), f"block {block.block_id} free-list"
