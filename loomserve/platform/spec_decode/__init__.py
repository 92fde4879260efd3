"""Speculative decoding: proposers (n-gram prompt lookup, a draft model, an EAGLE-3 head) guess the next k tokens of
a request, the target verifies all k + 1 positions in one forward, and the rejection sampler keeps what the target's
distribution allows. The feature's scheduler and runner hooks live in `hooks.py`; the scheduler books 1 + k tokens
and rolls back what was rejected."""
