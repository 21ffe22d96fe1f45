"""Block pool: allocation, reference counts, LRU eviction, chained-hash prefix caching."""

from __future__ import annotations

from types import SimpleNamespace

from engine.kv_cache import KVCacheManager, kv_block_bytes


def test_allocate_and_free_returns_every_block():
    kv = KVCacheManager(num_blocks=8, block_size=4)
    table: list[int] = []
    assert kv.allocate(table, 9)  # 3 blocks
    assert len(table) == 3 and kv.num_free_blocks == 5
    assert kv.allocate(table, 12)  # still 3 blocks
    assert len(table) == 3
    assert not kv.allocate(table, 100)  # too many: nothing changes
    assert len(table) == 3 and kv.num_free_blocks == 5
    kv.free_blocks(table)
    assert table == [] and kv.num_free_blocks == 8 and kv.usage == 0


def test_prefix_hit_shares_blocks_and_never_covers_last_token():
    kv = KVCacheManager(num_blocks=16, block_size=4)
    tokens = list(range(12))
    a: list[int] = []
    a_hashes: list[int] = []
    assert kv.allocate(a, 12)
    kv.cache_full_blocks(a, a_hashes, tokens, 12)
    # Same 12 tokens: only 2 full blocks may be reused, the last token must be recomputed.
    hits = kv.find_cached_prefix(tokens)
    assert hits == a[:2]
    # A longer prompt sharing 8 tokens then diverging.
    hits2 = kv.find_cached_prefix(tokens[:8] + [99, 98, 97, 96, 95])
    assert hits2 == a[:2]
    b: list[int] = []
    assert kv.allocate(b, 13, hits2)
    assert b[:2] == a[:2] and kv.ref_counts[a[0]] == 2
    kv.free_blocks(a)
    assert kv.ref_counts[b[0]] == 1 and kv.num_free_blocks == 16 - 4  # a's third block is free, b holds 4


def test_chained_hash_distinguishes_same_block_after_different_prefix():
    kv = KVCacheManager(num_blocks=16, block_size=4)
    x = [1, 2, 3, 4, 5, 6, 7, 8, 0]
    t: list[int] = []
    kv.allocate(t, 9)
    kv.cache_full_blocks(t, [], x, 9)
    assert kv.find_cached_prefix([9, 9, 9, 9, 5, 6, 7, 8, 0]) == []  # second block equal, first differs


def test_freed_cached_blocks_are_revived_then_evicted_in_lru_order():
    kv = KVCacheManager(num_blocks=4, block_size=2)
    tokens = [1, 2, 3, 4, 5]
    t: list[int] = []
    kv.allocate(t, 5)
    kv.cache_full_blocks(t, [], tokens, 5)
    first_two = t[:2]
    kv.free_blocks(t)
    assert kv.num_free_blocks == 4
    hits = kv.find_cached_prefix(tokens)  # still cached after being freed
    assert hits == first_two
    t2: list[int] = []
    assert kv.allocate(t2, 5, hits)
    assert kv.num_free_blocks == 1
    kv.free_blocks(t2)
    other: list[int] = []
    assert kv.allocate(other, 8)  # takes every block, evicting the cached ones
    assert kv.find_cached_prefix(tokens) == []


def test_disabled_prefix_caching_never_hits():
    kv = KVCacheManager(num_blocks=8, block_size=2, enable_prefix_caching=False)
    t: list[int] = []
    kv.allocate(t, 4)
    kv.cache_full_blocks(t, [], [1, 2, 3, 4], 4)
    assert kv.find_cached_prefix([1, 2, 3, 4, 5]) == []


def test_block_bytes_from_config():
    # bench-135m shape: 30 layers, 3 KV heads of 64 (576 / 9 heads) in bf16 -> 16 tokens take 2*30*16*3*64*2 bytes
    config = SimpleNamespace(num_hidden_layers=30, num_key_value_heads=3, num_attention_heads=9, hidden_size=576)
    assert kv_block_bytes(config, 16, 2) == 2 * 30 * 16 * 3 * 64 * 2


def test_drafts_never_take_the_budget_later_running_requests_need():
    """Six decoding requests want 4 draft slots each in a 12-token step: drafts get what is left once
    every running request has its own token, so none of them stalls."""
    from engine.request import Request, RequestStatus, SamplingParams
    from engine.scheduler import Scheduler

    kv = KVCacheManager(num_blocks=64, block_size=16)
    scheduler = Scheduler(kv, max_num_seqs=8, max_num_batched_tokens=12)
    for i in range(6):
        req = Request(f"r{i}", [1, 2, 3], SamplingParams(max_tokens=50), set())
        req.token_ids.append(4)  # one output token: decoding
        req.num_computed_tokens = 3
        req.status = RequestStatus.RUNNING
        assert kv.allocate(req.block_table, 3)
        scheduler.running.append(req)
    out = scheduler.schedule(lambda req: 4)
    assert [item.num_new_tokens for item in out.scheduled] == [1] * 6
    assert sum(item.num_lookahead for item in out.scheduled) == 12 - 6
