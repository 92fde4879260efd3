"""Tool calling: the parsers of each model family's tool-call format (vLLM's `--tool-call-parser` names) and the
forced formats of `tool_choice` required / named."""

from loomserve.api.tool_parsers.base import ParsedText, PartialCall, ToolParser
from loomserve.api.tool_parsers.hermes import HermesToolParser
from loomserve.api.tool_parsers.llama3_json import Llama3JsonToolParser
from loomserve.api.tool_parsers.mistral import MistralToolParser
from loomserve.api.tool_parsers.qwen3_xml import Qwen3XmlToolParser

TOOL_PARSERS: dict[str, type[ToolParser]] = {
    "hermes": HermesToolParser,
    "llama3_json": Llama3JsonToolParser,
    "mistral": MistralToolParser,
    "qwen3_xml": Qwen3XmlToolParser,
}

__all__ = ["TOOL_PARSERS", "ParsedText", "PartialCall", "ToolParser"]
