"""The KV-block hash scheme shared by the engine's prefix cache and the router's KV-aware routing.

A prompt's tokens are cut into blocks of `block_size` tokens; only full blocks are named. Block i is
named by a chained hash:

    h(-1) = sha256(SEED)
    h(i)  = sha256(h(i - 1) || token ids of block i as little-endian int64)

so a block's hash names the whole prefix up to and including it: two prompts share block i's hash
exactly when they share their first (i + 1) * block_size tokens. The engine registers a block under
its hash once its K/V are computed and reports it (a KV event) when it is stored and when it is
evicted; a router hashes the prompts it routes the same way and asks which replica holds the
longest run of them. The seed versions the scheme: change it and old hashes never match new ones.
"""

from __future__ import annotations

import hashlib
from array import array

SEED = b"tensoryard/kv-blocks/v1"
_ROOT = hashlib.sha256(SEED).digest()


def hash_block(parent_hash: bytes | None, token_ids) -> bytes:
    """The hash naming a full block and, through parent_hash (None for the first), all before it."""
    digest = hashlib.sha256(parent_hash if parent_hash is not None else _ROOT)
    digest.update(array("q", token_ids).tobytes())
    return digest.digest()


def block_hashes(token_ids, block_size: int, num_blocks: int | None = None) -> list[bytes]:
    """Hashes of the leading full blocks of token_ids (at most num_blocks of them)."""
    num_full = len(token_ids) // block_size
    if num_blocks is not None:
        num_full = min(num_full, num_blocks)
    hashes: list[bytes] = []
    parent = None
    for i in range(num_full):
        parent = hash_block(parent, token_ids[i * block_size : (i + 1) * block_size])
        hashes.append(parent)
    return hashes


def extend_block_hashes(hashes: list[bytes], token_ids, block_size: int, num_blocks: int) -> list[bytes]:
    """Grows a memoised list of hashes (of token_ids' blocks) to num_blocks entries, in place."""
    while len(hashes) < num_blocks:
        i = len(hashes)
        hashes.append(hash_block(hashes[-1] if hashes else None, token_ids[i * block_size : (i + 1) * block_size]))
    return hashes
