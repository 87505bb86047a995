from __future__ import annotations

import torch

from services.worker.engine.kv_cache import (
    KVCacheManager, allocate_kv_tensors, hash_block, kv_bytes_per_block, num_blocks_for_budget,
)
from tests.engine.builders import make_seq


def computed(kv: KVCacheManager, seq, num_tokens: int) -> None:
    """Pretend the model computed num_tokens of seq (what Scheduler.update does)."""
    seq.num_computed_tokens = num_tokens
    kv.cache_full_blocks(seq)


def test_budget_sets_the_number_of_blocks():
    per_block = kv_bytes_per_block(16, num_layers=2, num_kv_heads=2, head_dim=16, dtype=torch.float16)
    assert per_block == 2 * 2 * 16 * 2 * 16 * 2
    assert num_blocks_for_budget(10 * per_block + 1, 16, 2, 2, 16, torch.float16) == 10


def test_kv_tensors_are_views_of_one_pool():
    caches = allocate_kv_tensors(3, num_blocks=5, block_size=4, num_kv_heads=2, head_dim=8,
                                 dtype=torch.float32, device="cpu")
    assert len(caches) == 3
    k, v = caches[1]
    assert k.shape == v.shape == (5, 4, 2, 8)
    assert k.untyped_storage().data_ptr() == caches[0][0].untyped_storage().data_ptr()


def test_allocate_is_all_or_nothing_and_free_returns_blocks():
    kv = KVCacheManager(num_blocks=4, block_size=4)
    a, b = make_seq(12), make_seq(8)
    assert kv.allocate(a, 12)
    assert kv.num_used_blocks == 3
    assert not kv.allocate(b, 8)
    assert b.block_table == [] and kv.num_used_blocks == 3
    kv.free(a)
    assert kv.num_used_blocks == 0 and a.block_table == []
    assert kv.allocate(b, 8)


def test_allocate_grows_a_block_table_only_when_a_block_fills():
    kv = KVCacheManager(num_blocks=4, block_size=4)
    seq = make_seq(4)
    assert kv.allocate(seq, 4)
    assert len(seq.block_table) == 1
    assert kv.allocate(seq, 5)
    assert len(seq.block_table) == 2
    assert kv.allocate(seq, 8)
    assert len(seq.block_table) == 2


def test_prefix_hit_shares_blocks_and_counts_references():
    kv = KVCacheManager(num_blocks=8, block_size=4)
    prefix = list(range(20, 28))
    first = make_seq(tokens=prefix + [1, 2, 3])
    assert kv.allocate(first, first.num_tokens)
    computed(kv, first, first.num_tokens)
    second = make_seq(tokens=prefix + [4, 5])
    hits = kv.find_cached_blocks(second)
    assert [b.block_id for b in hits] == first.block_table[:2]
    assert kv.allocate(second, second.num_tokens, hits)
    assert second.block_table[:2] == first.block_table[:2]
    assert [kv.blocks[i].ref_count for i in first.block_table] == [2, 2, 1]
    kv.free(first)
    assert [kv.blocks[i].ref_count for i in second.block_table] == [1, 1, 1]


def test_prefix_hit_leaves_a_token_to_compute():
    kv = KVCacheManager(num_blocks=8, block_size=4)
    first = make_seq(tokens=list(range(8)))
    kv.allocate(first, 8)
    computed(kv, first, 8)
    same = make_seq(tokens=list(range(8)))
    assert len(kv.find_cached_blocks(same)) == 1  # the second block would leave nothing to compute


def test_blocks_are_registered_only_once_computed():
    kv = KVCacheManager(num_blocks=8, block_size=4)
    first = make_seq(tokens=list(range(9)))
    kv.allocate(first, 9)
    computed(kv, first, 4)  # first chunk only
    assert kv.num_cached_blocks == 1
    assert len(kv.find_cached_blocks(make_seq(tokens=list(range(9))))) == 1


def test_hash_is_chained_over_the_whole_prefix():
    assert hash_block(None, [1, 2]) != hash_block(hash_block(None, [0, 0]), [1, 2])
    assert hash_block(b"x", [1, 2]) == hash_block(b"x", [1, 2])


def test_freed_cached_blocks_stay_hittable_until_evicted():
    kv = KVCacheManager(num_blocks=4, block_size=4)
    first = make_seq(tokens=list(range(9)))
    kv.allocate(first, 9)
    computed(kv, first, 9)
    kv.free(first)
    assert kv.num_used_blocks == 0 and kv.num_cached_blocks == 2
    again = make_seq(tokens=list(range(9)))
    hits = kv.find_cached_blocks(again)
    assert len(hits) == 2
    assert kv.allocate(again, 9, hits)
    assert kv.num_used_blocks == 3 and kv.num_evictions == 0


def test_lru_evicts_least_recently_freed_block_first():
    kv = KVCacheManager(num_blocks=4, block_size=2)
    old, new = make_seq(tokens=[1, 2, 3, 4]), make_seq(tokens=[5, 6, 7, 8])
    for seq in (old, new):
        kv.allocate(seq, 4)
        computed(kv, seq, 4)
    kv.free(old)  # freed tail first: old's block 2 is the least recently used, then its block 1
    kv.free(new)
    assert kv.num_used_blocks == 0 and kv.num_cached_blocks == 4
    taker = make_seq(tokens=[9, 9])
    assert kv.allocate(taker, 2)
    assert taker.block_table == [1]  # old held blocks [0, 1]: its tail, block 1, goes first
    assert kv.num_evictions == 1
    # old's head block is still cached; its tail (the hash chain's second link) is gone.
    assert len(kv.find_cached_blocks(make_seq(tokens=[1, 2, 3, 4, 0]))) == 1
    assert len(kv.find_cached_blocks(make_seq(tokens=[5, 6, 7, 8, 0]))) == 2


def test_no_prefix_caching_means_no_hits():
    kv = KVCacheManager(num_blocks=4, block_size=2, enable_prefix_caching=False)
    first = make_seq(tokens=[1, 2, 3, 4, 5])
    kv.allocate(first, 5)
    computed(kv, first, 5)
    assert kv.find_cached_blocks(make_seq(tokens=[1, 2, 3, 4, 5])) == []
    kv.free(first)
    assert kv.num_cached_blocks == 0
