"""Data-parallel routing: which of N EngineCores serves a request.

Each engine is scored by its load as vLLM scores it (waiting x 4 + running, from the stats every engine sends with
its outputs, plus the requests routed to it since) and by prefix-cache affinity as SGLang's cache-aware router
does: a prefix tree of what each engine has been sent, at the granularity and with the keys of the engine's own
prefix cache (`kv_cache/block_hash.py`), so a request goes where its prompt's KV most likely still is. Affinity
wins while it covers enough of the prompt and the engines' loads stay within a margin; otherwise the least loaded
engine takes the request.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from loomserve.platform.kv_cache.block_hash import hash_request_blocks
from loomserve.platform.messages import EngineCoreRequest
from loomserve.platform.stats import SchedulerStats

ROUTINGS = ("cache_aware", "round_robin")


class PrefixTree:
    """The prompts one engine was sent, a node per full KV block keyed by its chained hash (a node's key covers
    its whole path from the root); the least recently used nodes go past `max_blocks`."""

    def __init__(self, max_blocks: int) -> None:
        self.max_blocks = max_blocks
        self.nodes: OrderedDict[bytes, None] = OrderedDict()

    def match(self, block_hashes: list[bytes]) -> int:
        """How many leading blocks of a prompt the tree holds."""
        for i, key in enumerate(block_hashes):
            if key not in self.nodes:
                return i
        return len(block_hashes)

    def insert(self, block_hashes: list[bytes]) -> None:
        for key in block_hashes:
            self.nodes[key] = None
            self.nodes.move_to_end(key)
        while len(self.nodes) > self.max_blocks:
            self.nodes.popitem(last=False)


@dataclass
class EngineLoad:
    waiting: int = 0  # as the engine last reported
    running: int = 0
    routed: int = 0  # requests sent to it since that report

    @property
    def score(self) -> int:
        return (self.waiting + self.routed) * 4 + self.running


class DPRouter:
    def __init__(self, num_engines: int, block_size: int, routing: str = "cache_aware", max_blocks: int = 1 << 16,
                 min_match: float = 0.5, balance_margin: int = 8) -> None:
        if routing not in ROUTINGS:
            raise ValueError(f"unknown data-parallel routing {routing!r}; choose {', '.join(ROUTINGS)}")
        self.block_size, self.routing = block_size, routing
        self.min_match = min_match  # share of a prompt's blocks an engine must hold to win by affinity
        # Load score by which affinity may exceed the least loaded engine: 2 waiting or 8 running requests. With
        # SGLang's 32, cache-aware routing ran 37% fewer req/s than round robin on two engines sharing an H200
        # (RESULTS.md), presumably by leaving the busier engine busier; a request sent away from its prefix costs one
        # prefill there, after which both engines hold that prefix.
        self.balance_margin = balance_margin
        self.loads = [EngineLoad() for _ in range(num_engines)]
        self.trees = [PrefixTree(max_blocks) for _ in range(num_engines)]
        self.next_engine = 0  # round robin

    def route(self, request: EngineCoreRequest) -> int:
        """The engine to send `request` to (its children, n > 1, follow it there)."""
        if self.routing == "round_robin":
            engine, self.next_engine = self.next_engine, (self.next_engine + 1) % len(self.loads)
        else:
            engine = self._cache_aware(request)
        self.loads[engine].routed += 1
        return engine

    def _cache_aware(self, request: EngineCoreRequest) -> int:
        lora_key = request.lora_request.kv_cache_key if request.lora_request is not None else ()
        mm_spans = [(it.placeholder.offset, it.placeholder.end, it.content_hash) for it in request.mm_items]
        hashes = hash_request_blocks(request.prompt_token_ids, self.block_size, [], request.cache_salt, mm_spans,
                                     lora_key)
        least = min(range(len(self.loads)), key=lambda e: self.loads[e].score)
        engine = least
        if hashes:
            matches = [tree.match(hashes) for tree in self.trees]
            best = max(range(len(matches)), key=lambda e: (matches[e], -self.loads[e].score))
            balanced = self.loads[best].score - self.loads[least].score <= self.balance_margin
            if matches[best] >= self.min_match * len(hashes) and balanced:
                engine = best
        self.trees[engine].insert(hashes)
        return engine

    def report(self, engine: int, stats: SchedulerStats) -> None:
        """An engine's stats, sent with its outputs: the requests routed before them are counted in them."""
        self.loads[engine] = EngineLoad(stats.num_waiting, stats.num_running)
