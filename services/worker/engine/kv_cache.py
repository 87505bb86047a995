"""The paged KV cache: a pool of fixed-size blocks, reference counted, with prefix caching.

Memory layout. One tensor holds every layer's keys and values:
    [num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim]      (2: K then V)
and layer i reads the views k_cache = kv[i, 0], v_cache = kv[i, 1], each
[num_blocks, block_size, num_kv_heads, head_dim]. Token t of a sequence lives in block
block_table[t // block_size] at offset t % block_size, i.e. in slot block_id * block_size + offset.

Blocks. A block in use has ref_count >= 1 (more than one when sequences share a cached prefix). A
block whose ref_count falls to 0 goes back to the free list, unless it holds a registered prefix
hash: then it joins `evictable`, an LRU of cached blocks that can be revived by a later prefix hit
or, when the free list is empty, evicted (least recently freed first) and reused.

Prefix caching. A full block is identified by a chained hash (services/common/kv_blocks.py, the
scheme routers share): sha256(parent block's hash, the block's token ids), so a hash names the whole
prefix up to and including that block. A block is registered under its hash once its K/V have been
computed. A new sequence takes the longest run of registered blocks matching its leading full
blocks, always leaving at least one token to compute so that the step yields logits for it.

KV events. Each registration (a block stored) and each eviction (a block removed) is recorded;
`take_events()` hands them over once per step, and the worker streams them to routers so their
index of which replica caches which prefix follows the cache itself.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from dataclasses import dataclass, field

import torch

from services.common.kv_blocks import extend_block_hashes, hash_block
from services.worker.engine.sequence import Sequence

__all__ = ["Block", "KVCacheManager", "KVEvents", "allocate_kv_tensors", "hash_block", "kv_bytes_per_block",
           "num_blocks_for_budget"]


@dataclass(slots=True)
class Block:
    block_id: int
    ref_count: int = 0
    block_hash: bytes | None = None  # set while the block is registered in the prefix cache


@dataclass(slots=True)
class KVEvents:
    """Blocks that entered (stored) and left (removed) the prefix cache since the last hand-over."""

    stored: list[bytes] = field(default_factory=list)
    removed: list[bytes] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.stored or self.removed)


def kv_bytes_per_block(block_size: int, num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
    element_size = torch.empty((), dtype=dtype).element_size()
    return 2 * num_layers * block_size * num_kv_heads * head_dim * element_size


def num_blocks_for_budget(
    budget_bytes: int, block_size: int, num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype
) -> int:
    return budget_bytes // kv_bytes_per_block(block_size, num_layers, num_kv_heads, head_dim, dtype)


def allocate_kv_tensors(
    num_layers: int,
    num_blocks: int,
    block_size: int,
    num_kv_heads: int,
    head_dim: int,
    dtype: torch.dtype,
    device: str | torch.device,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """One allocation for the pool; returns a (k_cache, v_cache) view per layer."""
    kv = torch.zeros(num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim, dtype=dtype, device=device)
    return [(kv[i, 0], kv[i, 1]) for i in range(num_layers)]


class KVCacheManager:
    """Hands blocks to sequences and takes them back; knows nothing of the tensors themselves."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self._free_ids: deque[int] = deque(range(num_blocks))
        self._evictable: OrderedDict[int, None] = OrderedDict()  # ref_count 0, hashed; oldest first
        self._hash_to_block: dict[bytes, int] = {}
        self.num_query_tokens = 0  # tokens of admitted sequences looked up in the prefix cache
        self.num_hit_tokens = 0  # of which found cached
        self.num_evictions = 0
        self._events = KVEvents()

    @property
    def num_free_blocks(self) -> int:
        return len(self._free_ids) + len(self._evictable)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - self.num_free_blocks

    @property
    def num_cached_blocks(self) -> int:
        return len(self._hash_to_block)

    def cached_block_hashes(self) -> list[bytes]:
        """Every hash registered now: the snapshot a new KV-event subscriber starts from."""
        return list(self._hash_to_block)

    def take_events(self) -> KVEvents:
        """The blocks stored and removed since the last call."""
        events, self._events = self._events, KVEvents()
        return events

    def num_blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def find_cached_blocks(self, seq: Sequence) -> list[Block]:
        """The registered blocks matching seq's leading full blocks (not yet taken)."""
        if not self.enable_prefix_caching:
            return []
        max_blocks = (seq.num_tokens - 1) // self.block_size  # leave a token to compute
        cached = []
        for block_hash in self._block_hashes(seq, max_blocks):
            block_id = self._hash_to_block.get(block_hash)
            if block_id is None:
                break
            cached.append(self.blocks[block_id])
        return cached

    def allocate(self, seq: Sequence, num_tokens: int, cached_blocks: list[Block] | None = None) -> bool:
        """Grows seq's block table to hold num_tokens tokens, first taking cached_blocks (a prefix hit
        for a sequence that holds no blocks). All or nothing: False, and no change, if blocks are short."""
        cached_blocks = cached_blocks or []
        num_new = max(self.num_blocks_for(num_tokens) - len(seq.block_table) - len(cached_blocks), 0)
        num_revived = sum(1 for block in cached_blocks if block.ref_count == 0)  # counted as free now
        if num_new + num_revived > self.num_free_blocks:
            return False
        for block in cached_blocks:
            if block.ref_count == 0:
                del self._evictable[block.block_id]
            block.ref_count += 1
            seq.block_table.append(block.block_id)
        if cached_blocks:
            seq.num_registered_blocks = len(cached_blocks)  # already registered, by whoever computed them
        for _ in range(num_new):
            block = self._take_free_block()
            block.ref_count = 1
            seq.block_table.append(block.block_id)
        return True

    def record_admission(self, seq: Sequence, num_hit_tokens: int) -> None:
        self.num_query_tokens += seq.num_tokens
        self.num_hit_tokens += num_hit_tokens

    def free(self, seq: Sequence) -> None:
        """Releases all of seq's blocks. The one place blocks go back: finish, abort and preemption."""
        for block_id in reversed(seq.block_table):  # tail first: it is evicted before the shared head
            block = self.blocks[block_id]
            block.ref_count -= 1
            if block.ref_count > 0:
                continue
            if block.block_hash is not None:
                self._evictable[block_id] = None
            else:
                self._free_ids.append(block_id)
        seq.block_table.clear()
        seq.num_registered_blocks = 0

    def cache_full_blocks(self, seq: Sequence) -> None:
        """Registers seq's blocks that are full of computed tokens, so later sequences can reuse them."""
        if not self.enable_prefix_caching:
            return
        num_full = seq.num_computed_tokens // self.block_size
        if num_full <= seq.num_registered_blocks:
            return
        hashes = self._block_hashes(seq, num_full)
        for i in range(seq.num_registered_blocks, num_full):
            block = self.blocks[seq.block_table[i]]
            if block.block_hash is None and hashes[i] not in self._hash_to_block:
                block.block_hash = hashes[i]
                self._hash_to_block[hashes[i]] = block.block_id
                self._events.stored.append(hashes[i])
        seq.num_registered_blocks = num_full

    def _block_hashes(self, seq: Sequence, num_blocks: int) -> list[bytes]:
        """Hashes of seq's first num_blocks full blocks, memoised on the sequence (tokens never change)."""
        return extend_block_hashes(seq.block_hashes, seq.token_ids, self.block_size, num_blocks)[:num_blocks]

    def _take_free_block(self) -> Block:
        if self._free_ids:
            return self.blocks[self._free_ids.popleft()]
        block_id, _ = self._evictable.popitem(last=False)
        block = self.blocks[block_id]
        del self._hash_to_block[block.block_hash]
        self._events.removed.append(block.block_hash)
        block.block_hash = None
        self.num_evictions += 1
        return block
