"""The KV block pool: free list, reference counts and prefix caching by chained block hashes.

It deals in block ids only. Requests own their block tables (lists of ids); the tensors holding
the keys and values live in the model runner. A block whose reference count drops to zero keeps
its hash and contents until it is handed out again, so a later request with the same prefix can
pick it back up; the free list is in LRU order, so the least recently freed block goes first.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from collections.abc import Sequence

from engine.config import head_dim


def hash_block(parent: bytes | None, token_ids: Sequence[int]) -> bytes:
    """Chained SHA-256: a block's identity includes everything before it, and a crafted prompt cannot
    collide with another tenant's prefix (Python's hash() could be made to)."""
    return hashlib.sha256((parent or b"") + array("q", token_ids).tobytes()).digest()


def kv_block_bytes(hf_config, block_size: int, dtype_bytes: int) -> int:
    """Bytes one block of K and V takes across every layer of a model (Hugging Face config)."""
    return 2 * hf_config.num_hidden_layers * block_size * hf_config.num_key_value_heads * head_dim(hf_config) * dtype_bytes


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_counts = [0] * num_blocks
        self.block_hash: list[bytes | None] = [None] * num_blocks
        self.free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self.cached: dict[bytes, int] = {}  # block hash -> block id
        self.prefix_queries = 0  # prompt tokens of admitted requests that looked up the cache
        self.prefix_hits = 0  # of those, tokens found cached

    @property
    def num_free_blocks(self) -> int:
        return len(self.free)

    @property
    def usage(self) -> float:
        """Fraction of blocks held by requests (cached-but-free blocks count as free)."""
        return 1.0 - len(self.free) / self.num_blocks

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def find_cached_prefix(self, token_ids: Sequence[int], root: bytes | None = None) -> list[int]:
        """Cached blocks matching the longest full-block prefix of ``token_ids``; ``root`` is the hash
        chain's start (a LoRA adapter's identity; None: the base model), so blocks computed by another
        adapter never match. The last token is never covered: its logits must be computed to sample
        the next token.
        """
        hits: list[int] = []
        if self.enable_prefix_caching:
            parent = root
            for start in range(0, len(token_ids) - 1 - self.block_size + 1, self.block_size):
                parent = hash_block(parent, token_ids[start:start + self.block_size])
                block = self.cached.get(parent)
                if block is None:
                    break
                hits.append(block)
        return hits

    def allocate(self, block_table: list[int], num_tokens: int, cached_prefix: Sequence[int] = ()) -> bool:
        """Grow ``block_table`` (in place) to hold ``num_tokens`` slots, reusing ``cached_prefix`` first.

        Returns False, changing nothing, when there are not enough free blocks.
        """
        num_new = self.blocks_needed(num_tokens) - len(block_table) - len(cached_prefix)
        revived = sum(1 for b in cached_prefix if self.ref_counts[b] == 0)
        if max(num_new, 0) + revived > len(self.free):
            return False
        for block in cached_prefix:
            if self.ref_counts[block] == 0:
                del self.free[block]
            self.ref_counts[block] += 1
            block_table.append(block)
        for _ in range(num_new):
            block, _ = self.free.popitem(last=False)
            old_hash = self.block_hash[block]
            if old_hash is not None:
                if self.cached.get(old_hash) == block:
                    del self.cached[old_hash]
                self.block_hash[block] = None
            self.ref_counts[block] = 1
            block_table.append(block)
        return True

    def cache_full_blocks(self, block_table: list[int], block_hashes: list[bytes], token_ids: Sequence[int],
                          num_computed_tokens: int, root: bytes | None = None) -> None:
        """Register the hashes of blocks whose KV is now fully computed (extends ``block_hashes``);
        ``root`` as in find_cached_prefix."""
        if not self.enable_prefix_caching:
            return
        num_full = num_computed_tokens // self.block_size
        for i in range(len(block_hashes), num_full):
            parent = block_hashes[-1] if block_hashes else root
            h = hash_block(parent, token_ids[i * self.block_size:(i + 1) * self.block_size])
            block_hashes.append(h)
            block = block_table[i]
            if self.block_hash[block] is None and h not in self.cached:
                self.block_hash[block] = h
                self.cached[h] = block

    def free_tail(self, block_table: list[int], num_tokens: int) -> None:
        """Free the blocks past the first ``num_tokens`` slots (unused speculative lookahead)."""
        keep = self.blocks_needed(num_tokens)
        if len(block_table) > keep:
            tail = block_table[keep:]
            del block_table[keep:]
            self.free_blocks(tail)

    def free_blocks(self, block_table: list[int]) -> None:
        """Drop one reference to each block; tail blocks go to the free list first so they are evicted first."""
        for block in reversed(block_table):
            self.ref_counts[block] -= 1
            assert self.ref_counts[block] >= 0, f"block {block} freed twice"
            if self.ref_counts[block] == 0:
                self.free[block] = None
        block_table.clear()
