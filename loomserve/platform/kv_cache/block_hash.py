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
    adapter_key: tuple = (),
    num_blocks: int | None = None,
) -> list[bytes]:
    """Extend `known` (the hashes already computed) to cover the first `num_blocks` full blocks of `token_ids`
    (default: every full block), each keyed with its `block_extra_keys`."""
    full = len(token_ids) // block_size
    for i in range(len(known), full if num_blocks is None else min(num_blocks, full)):
        parent = known[-1] if known else None
        start, end = i * block_size, (i + 1) * block_size
        extra = block_extra_keys(start, end, cache_salt, mm_spans, adapter_key)
        known.append(hash_block(parent, token_ids[start:end], extra))
    return known


def block_extra_keys(
    start: int, end: int, cache_salt: str | None, mm_spans: Sequence[tuple[int, int, str]], adapter_key: tuple
) -> tuple:
    """What besides its tokens changes the KV of the block covering tokens [start, end), as vLLM keys it: the
    cache salt (first block; the chain carries it on), the adapter's identity (every block), and the content
    hash of each media item whose placeholder (start, end, hash) in `mm_spans` overlaps the block. Each extra
    is tagged by its kind, so one kind's value can never pass for another's."""
    salt = (("salt", cache_salt),) if start == 0 and cache_salt else ()
    adapter = (adapter_key,) if adapter_key else ()
    return salt + adapter + tuple(("mm", h) for lo, hi, h in mm_spans if lo < end and hi > start)
