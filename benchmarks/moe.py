"""MoE generation throughput: the fused MoE path against transformers on a mixture-of-experts shape.

What it measures
----------------
`benchmarks/throughput.py`'s offline workload and report (all requests submitted at once, greedy, EOS ignored,
one untimed cold run then the best of --repeats; output tok/s, the baseline, the ratio) on an MoE model:
`--shape qwen3-30b-a3b` (hidden 2048, 48 layers, 32 / 4 heads of 128, 128 experts of 768, 8 per token, vocab
151,936; dummy bf16 weights) or `--shape tiny-moe` for a CPU check, or `--model PATH`. The default shape
is the Qwen3-30B-A3B one.

The bandwidth floor of a pure-decode step counts what an MoE decode step must read: every weight outside the
experts, plus, in each MoE layer, the experts its tokens chose. Dummy weights route about uniformly, so the
number of distinct experts a step of B tokens touches is taken as its expectation under uniform top-k routing,
E * (1 - (1 - k / E) ** B) (at B = 256, k = 8, E = 128 that is every expert; at B = 1, k of them).

    python -m benchmarks.moe --shape tiny-moe --device cpu --num-prompts 8 --input-len-min 16 \\
        --input-len-max 32 --output-len 8 --baseline static
    python -m benchmarks.moe --shape qwen3-30b-a3b --device cuda --num-prompts 256 --input-len-min 100 \\
        --input-len-max 1024 --output-len 256 --baseline generate_batch --max-model-len 2048
"""

from __future__ import annotations

import sys

import torch

from benchmarks.throughput import StepRecord, StepWeightBytes, parse_args, run, weight_bytes_per_step
from loomserve.platform.models.moe import FusedMoE


def moe_weight_bytes(model: torch.nn.Module) -> StepWeightBytes:
    """A decode step's weight bytes: the dense weights, plus each MoE layer's experts the step's tokens are
    expected to choose."""
    layers = [m for m in model.modules() if isinstance(m, FusedMoE)]
    expert_bytes = sum(p.numel() * p.element_size() for m in layers for p in m.parameters())
    dense = weight_bytes_per_step(model) - expert_bytes
    if not layers:
        return lambda record: dense
    per_expert = expert_bytes / (len(layers) * layers[0].num_local_experts)
    num_experts, top_k = layers[0].num_experts, layers[0].top_k

    def step_bytes(record: StepRecord) -> int:
        touched = num_experts * (1 - (1 - top_k / num_experts) ** record.num_seqs)
        return int(dense + len(layers) * touched * per_expert)

    return step_bytes


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv if "--shape" in argv or "--model" in argv else ["--shape", "qwen3-30b-a3b", *argv])
    return run(args, argv, moe_weight_bytes)


if __name__ == "__main__":
    sys.exit(main())
