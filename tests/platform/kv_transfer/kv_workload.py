"""The KV-transfer tests' workload: conversations with long shared prefixes, answered greedily."""

from __future__ import annotations

from loomserve import SamplingParams

MAX_TOKENS = 8
GREEDY = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
# Four conversations of ~37 tokens each (~10 blocks of 4): together well over a 16-block device pool.
PREFIXES = [" ".join(f"w{p}x{i}" for i in range(8)) for p in range(4)]
FIRST_TURNS = [p + " question one" for p in PREFIXES]
SECOND_TURNS = [p + " question two" for p in PREFIXES]
