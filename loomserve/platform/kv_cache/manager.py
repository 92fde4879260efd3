"""Per-request KV bookkeeping on top of the block pool: prefix hits, slot allocation, freeing."""

from __future__ import annotations

from typing import TYPE_CHECKING

from loomserve.platform.attention.kv_quant import kv_cache_dtype
from loomserve.platform.kv_cache.block_hash import hash_request_blocks
from loomserve.platform.kv_cache.block_pool import BlockPool, KVBlock
from loomserve.platform.request import Request

if TYPE_CHECKING:
    from loomserve.platform.config import CacheConfig, ModelConfig


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def kv_block_bytes(model_config: ModelConfig, cache_config: CacheConfig, num_kv_heads: int | None = None) -> int:
    """Bytes of one KV block across every layer (keys and values, in the cache's dtype: an fp8 cache's are half a
    bf16 one's); `num_kv_heads`: a tensor-parallel rank's."""
    mc = model_config
    heads = num_kv_heads or mc.num_kv_heads
    itemsize = kv_cache_dtype(cache_config.cache_dtype, mc.dtype).itemsize
    return 2 * mc.num_layers * cache_config.block_size * heads * mc.head_dim * itemsize


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, enable_caching: bool) -> None:
        self.block_size = block_size
        self.enable_caching = enable_caching
        self.pool = BlockPool(num_blocks, enable_caching)
        self.req_blocks: dict[str, list[KVBlock]] = {}
        self.req_block_ids: dict[str, list[int]] = {}
        self.req_hashes: dict[str, list[bytes]] = {}
        self.num_cached_blocks: dict[str, int] = {}
        # Prefix-cache counters since the last `take_stats()`, in tokens.
        self.queries = 0
        self.hits = 0

    @property
    def usage(self) -> float:
        return self.pool.usage

    def block_ids(self, request_id: str) -> list[int]:
        return self.req_block_ids[request_id]

    def blocks(self, request_id: str) -> list[KVBlock]:
        return self.req_blocks.get(request_id, [])

    def get_computed_blocks(self, request: Request) -> tuple[list[KVBlock], int]:
        """The longest cached prefix of the request, in whole blocks, leaving at least one token to run."""
        # See PoolingParams.needs_whole_prompt and Request.needs_prompt_logprobs.
        if not self.enable_caching or request.needs_whole_prompt or request.needs_prompt_logprobs:
            return [], 0
        hit = self.cached_prefix(request)
        self.queries += request.num_tokens
        self.hits += len(hit) * self.block_size
        return hit, len(hit) * self.block_size

    def cached_prefix(self, request: Request) -> list[KVBlock]:
        """The request's leading blocks found in the prefix cache (no counters touched)."""
        # Keys are computed only as far as the hit goes: a long new prompt's are computed as its chunks fill blocks,
        # not all at once on arrival (8k tokens take ~1 ms, a stall of every running stream).
        tokens = request.all_token_ids
        hit: list[KVBlock] = []
        while len(hit) < self.max_hit_blocks(request):
            block = self.pool.lookup(self.block_hashes(request, len(hit) + 1, tokens)[len(hit)])
            if block is None:
                break
            hit.append(block)
        return hit

    def max_hit_blocks(self, request: Request) -> int:
        """Most whole blocks a prefix hit may cover: at least one token is left to run (it yields the logits)."""
        return (request.num_tokens - 1) // self.block_size

    def allocate_slots(
        self, request: Request, num_new_tokens: int, computed_blocks: list[KVBlock] | None = None
    ) -> bool:
        """Reserve blocks for `num_new_tokens` more tokens (after any prefix hit); False if the pool is short."""
        computed_blocks = computed_blocks or []
        blocks = self.req_blocks.setdefault(request.request_id, [])
        num_computed = request.num_computed_tokens + len(computed_blocks) * self.block_size
        total = num_computed + num_new_tokens
        num_needed = cdiv(total, self.block_size) - len(blocks) - len(computed_blocks)
        num_reclaimed = sum(1 for b in computed_blocks if b.ref_cnt == 0)
        if num_needed > self.pool.num_free_blocks - num_reclaimed:
            if not blocks:
                self._forget(request.request_id)
            return False
        self.pool.touch(computed_blocks)
        new_blocks = computed_blocks + self.pool.allocate(max(num_needed, 0))
        blocks.extend(new_blocks)
        self.req_block_ids.setdefault(request.request_id, []).extend(b.block_id for b in new_blocks)
        self._cache_full_blocks(request, total)
        return True

    def free(self, request: Request) -> None:
        """Release a finished, aborted or preempted request's blocks, tail blocks first to be evicted."""
        blocks = self.req_blocks.get(request.request_id, [])
        self.pool.free(list(reversed(blocks)))
        self._forget(request.request_id)

    def take_stats(self) -> tuple[int, int]:
        queries, hits = self.queries, self.hits
        self.queries = self.hits = 0
        return queries, hits

    def block_hashes(self, request: Request, num_blocks: int, tokens: list[int] | None = None) -> list[bytes]:
        """The request's block keys, computed up to its first `num_blocks` full blocks."""
        known = self.req_hashes.setdefault(request.request_id, [])
        if len(known) >= num_blocks:
            return known
        mm_spans = [(it.placeholder.offset, it.placeholder.end, it.content_hash) for it in request.mm_items]
        lora_key = request.lora_request.kv_cache_key if request.lora_request is not None else ()
        return hash_request_blocks(
            request.all_token_ids if tokens is None else tokens, self.block_size, known, request.cache_salt, mm_spans,
            lora_key, num_blocks,
        )

    def _cache_full_blocks(self, request: Request, num_tokens: int) -> None:
        """Register blocks that this step fills completely: their tokens are all known already."""
        if not self.enable_caching:
            return
        start = self.num_cached_blocks.get(request.request_id, 0)
        end = min(num_tokens, request.num_tokens) // self.block_size  # tokens still in flight are not known yet
        if end <= start:
            return
        hashes = self.block_hashes(request, end)
        blocks = self.req_blocks[request.request_id]
        for i in range(start, end):
            self.pool.cache(blocks[i], hashes[i])
        self.num_cached_blocks[request.request_id] = end

    def _forget(self, request_id: str) -> None:
        for table in (self.req_blocks, self.req_block_ids, self.req_hashes, self.num_cached_blocks):
            table.pop(request_id, None)
