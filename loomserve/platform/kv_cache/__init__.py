"""The paged KV cache's bookkeeping: a pool of refcounted blocks, chained block hashes, per-request tables."""

from loomserve.platform.kv_cache.block_pool import BlockPool, KVBlock
from loomserve.platform.kv_cache.manager import KVCacheManager

__all__ = ["BlockPool", "KVBlock", "KVCacheManager"]
