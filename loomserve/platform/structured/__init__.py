"""Structured output: constraining sampled tokens to a JSON schema, regex, choice list or grammar."""

from loomserve.platform.structured.params import StructuredOutputsParams

__all__ = ["StructuredOutputsParams"]
