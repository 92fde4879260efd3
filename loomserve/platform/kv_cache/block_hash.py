"""Prefix-cache keys: SHA-256 chained over parent key, token ids and every extra that changes the KV."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import msgpack


def hash_block(parent: bytes | None, token_ids: Sequence[int], extra_keys: tuple = ()) -> bytes:
    """A block's key; equal keys imply equal KV because the chain covers the whole prefix."""
    payload = msgpack.packb([parent or b"", list(token_ids), list(extra_keys)])
    return hashlib.sha256(payload).digest()


def hash_request_blocks(
    token_ids: Sequence[int],
    block_size: int,
    known: list[bytes],
    cache_salt: str | None = None,
    mm_spans: Sequence[tuple[int, int, str]] = (),
) -> list[bytes]:
    """Extend `known` (the hashes already computed) to cover every full block of `token_ids`. `mm_spans` are
    the (start, end, content hash) of media placeholders: a block's key includes the hash of each it overlaps."""
    for i in range(len(known), len(token_ids) // block_size):
        parent = known[-1] if known else None
        extra = (cache_salt,) if i == 0 and cache_salt else ()
        start, end = i * block_size, (i + 1) * block_size
        extra += tuple(h for lo, hi, h in mm_spans if lo < end and hi > start)
        known.append(hash_block(parent, token_ids[start:end], extra))
    return known
