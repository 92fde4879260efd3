"""Reasoning parsers (vLLM's `--reasoning-parser` names): split a model's thinking from its answer."""

from loomserve.api.reasoning.think import DeepSeekR1ReasoningParser, Qwen3ReasoningParser, ReasoningParser

REASONING_PARSERS: dict[str, type[ReasoningParser]] = {
    "deepseek_r1": DeepSeekR1ReasoningParser,
    "qwen3": Qwen3ReasoningParser,
}

__all__ = ["REASONING_PARSERS", "ReasoningParser"]
