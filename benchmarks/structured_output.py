"""Structured output: time per output token with JSON-schema constraints against the same requests unconstrained.

What it measures
----------------
A model shape preset with dummy weights (default the Qwen2.5-0.5B shape, vocabulary 151,936), B requests (each of
--batch-sizes) of --input-len random prompt ids generating exactly --output-len tokens greedily with EOS ignored,
all submitted at once through `LLM.generate`. Once unconstrained, once with
`structured_outputs=StructuredOutputsParams(json=SCHEMA)`: a list of records (integer, string, number, boolean and
enum fields) whose `minItems` no request reaches, so every constrained request also runs its full --output-len
tokens and both runs do the same work apart from the grammar (compiled once per engine and cached: the first
warm-up pays the compile, reported apart). Each step then fills one bitmask row per request (xgrammar's matchers
together, `BatchGrammarMatcher`) while the step's forward runs (once the step before has landed: async
scheduling keeps its overlap) and masks the logits on the device before sampling.

Per batch size: the mean time per output token (TPOT: each request's (last token time - first token time) /
(tokens - 1), from the engine steps that delivered them, averaged over requests), the constrained run's overhead
over the free one, and output throughput. The constrained outputs are checked token by token against a fresh
xgrammar matcher of the schema (`grammar violations` must be 0). One warm-up run per batch size and kind is
excluded; the best of --repeats runs (fresh prompt ids each) is reported. Target on an H200: overhead <= 10% at
batch 64.

    python -m benchmarks.structured_output --device cpu --shape tiny --batch-sizes 8 --output-len 32 --input-len 32
    python -m benchmarks.structured_output --device cuda --shape qwen2.5-0.5b --batch-sizes 1 16 64 --output-len 256
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from benchmarks.common import PRESETS, build_preset_checkpoint, print_run_header
from benchmarks.spec_decode import Run, TimedEngine, synthetic_prompts
from benchmarks.throughput import add_engine_flags, engine_kwargs
from loomserve.platform.config import resolve_device

RECORD = {
    "type": "object",
    "properties": {
        "id": {"type": "integer"},
        "name": {"type": "string"},
        "score": {"type": "number"},
        "active": {"type": "boolean"},
        "kind": {"enum": ["alpha", "beta", "gamma"]},
    },
    "required": ["id", "name", "score", "active", "kind"],
    "additionalProperties": False,
}
SCHEMA = {
    "type": "object",
    "properties": {"records": {"type": "array", "items": RECORD, "minItems": 100_000}},
    "required": ["records"],
    "additionalProperties": False,
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", choices=sorted(PRESETS), default="qwen2.5-0.5b", help="model shape (dummy weights)")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[64])
    p.add_argument("--input-len", type=int, default=256, help="prompt tokens")
    p.add_argument("--output-len", type=int, default=256)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="also write the results here")
    p.add_argument("--async-scheduling", choices=["auto", "on", "off"], default="auto",
                   help="auto: the engine's default (on with CUDA)")
    add_engine_flags(p)
    return p.parse_args(argv)


def sampling_params(args: argparse.Namespace, constrained: bool) -> Any:
    from loomserve import SamplingParams
    from loomserve.platform.structured import StructuredOutputsParams

    structured = StructuredOutputsParams(json=SCHEMA) if constrained else None
    return SamplingParams(temperature=0.0, max_tokens=args.output_len, ignore_eos=True, structured_outputs=structured)


def measure(args: argparse.Namespace, timed: TimedEngine, constrained: bool, vocab_size: int) -> list[Run]:
    """Per batch size: one warm-up, then --repeats timed runs on fresh prompts; the best kept."""
    name = "json schema" if constrained else "unconstrained"
    params = sampling_params(args, constrained)
    runs = []
    for batch_size in args.batch_sizes:
        start = time.perf_counter()
        timed.run(name, [synthetic_prompts(args, vocab_size, batch_size, 0)], params)
        warm_up_s = time.perf_counter() - start
        best = min((timed.run(name, [synthetic_prompts(args, vocab_size, batch_size, i + 1)], params)
                    for i in range(args.repeats)), key=lambda r: r.itl_s)
        best.extra["warm_up_s"] = warm_up_s
        runs.append(best)
    return runs


def grammar_violations(llm: Any, args: argparse.Namespace, vocab_size: int) -> int:
    """Constrained outputs (the largest batch) checked token by token by a fresh xgrammar matcher of the schema."""
    import xgrammar as xgr

    prompts = synthetic_prompts(args, vocab_size, max(args.batch_sizes), args.repeats + 1)
    outputs = llm.generate(prompts, sampling_params(args, constrained=True))
    info = xgr.TokenizerInfo.from_huggingface(llm.get_tokenizer(), vocab_size=vocab_size)
    compiled = xgr.GrammarCompiler(info).compile_json_schema(json.dumps(SCHEMA), max_whitespace_cnt=32)
    violations = 0
    for out in outputs:
        matcher = xgr.GrammarMatcher(compiled)
        violations += sum(not matcher.accept_token(t) for t in out.outputs[0].token_ids)
    return violations


def format_table(free: list[Run], constrained: list[Run]) -> str:
    rows = ["| batch | TPOT free (ms) | TPOT json schema (ms) | overhead | free tok/s | json tok/s | first json "
            "warm-up (s) |", "|---:|---:|---:|---:|---:|---:|---:|"]
    for f, c in zip(free, constrained, strict=True):
        rows.append(f"| {f.batch_size} | {f.itl_s * 1e3:.2f} | {c.itl_s * 1e3:.2f} | "
                    f"{(c.itl_s / f.itl_s - 1) * 100:+.1f}% | {f.batch_size / f.itl_s:,.0f} | "
                    f"{c.batch_size / c.itl_s:,.0f} | {c.extra['warm_up_s']:.2f} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    from loomserve import LLM

    args = parse_args(argv)
    kwargs = engine_kwargs(args, "dummy")
    kwargs["max_num_seqs"] = max(max(args.batch_sizes), args.max_num_seqs)
    kwargs["async_scheduling"] = {"auto": None, "on": True, "off": False}[args.async_scheduling]
    llm = LLM(str(build_preset_checkpoint(args.shape)), **kwargs)
    vocab_size = llm.config.model_config.vocab_size
    timed = TimedEngine(llm)
    free = measure(args, timed, False, vocab_size)
    constrained = measure(args, timed, True, vocab_size)
    violations = grammar_violations(llm, args, vocab_size)
    env = print_run_header(argv, resolve_device(args.device))
    print(f"# model: {args.shape} (dummy weights); input {args.input_len}, output {args.output_len} tokens; "
          f"async scheduling: {llm.config.async_scheduling}; grammar violations: {violations}")
    print(format_table(free, constrained))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"env": env, "schema": SCHEMA, "violations": violations,
                       "runs": [vars(r) for r in free + constrained]}, f, indent=1)
    return 0 if violations == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
