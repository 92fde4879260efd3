"""A chat completion's generated text -> what the client reads: reasoning (with --reasoning-parser), content and
tool calls (when the request's tools and tool_choice ask for them), whole or as stream deltas.

Parsers are pure functions of the text so far whose parts only grow, so a stream sends, at each step, what the
parse of the longer text adds: new reasoning and content characters, a new call's id and name, new characters of
its arguments. Tool calls are parsed from the text after reasoning ends.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from loomserve.api.chat_flags import ChatOptions
from loomserve.api.protocol import (
    ChatCompletionRequest,
    ChatResponseMessage,
    DeltaFunctionCall,
    DeltaMessage,
    DeltaToolCall,
    FunctionCall,
    ToolCall,
)
from loomserve.api.reasoning import REASONING_PARSERS, ReasoningParser
from loomserve.api.tool_parsers import PartialCall
from loomserve.api.tool_parsers.choice import ToolMode, tool_mode
from loomserve.platform.request import SamplingParams


@dataclass
class ParsedMessage:
    reasoning: str | None
    content: str
    calls: list[PartialCall]


@dataclass
class ChatOutputParser:
    """How one request's outputs are read (the same for each of its choices)."""

    reasoning: ReasoningParser | None = None
    tools: ToolMode = field(default_factory=ToolMode)
    include_reasoning: bool = True
    parallel_tool_calls: bool = True

    @classmethod
    def for_request(cls, request: ChatCompletionRequest, options: ChatOptions) -> ChatOutputParser:
        """APIError (400) for tools and tool_choice that do not go together."""
        tools = [tool.model_dump(exclude_none=True) for tool in request.tools] if request.tools else None
        choice = request.tool_choice
        mode = tool_mode(tools, choice if isinstance(choice, str | None) else choice.model_dump(),
                         options.tool_call_parser, request.parallel_tool_calls)
        reasoning = REASONING_PARSERS[options.reasoning_parser]() if options.reasoning_parser else None
        return cls(reasoning, mode, request.include_reasoning, request.parallel_tool_calls)

    def constrain_after_reasoning(self, params: SamplingParams, tokenizer: Any,
                                  prompt_token_ids: list[int]) -> SamplingParams:
        """`params` whose structured output (a response format, a forced tool call) starts once the model's
        reasoning ends, when a reasoning parser reads its output."""
        if self.reasoning is None or params.structured_outputs is None:
            return params
        end = self.reasoning.end_token_ids(tokenizer, prompt_token_ids)
        structured = dataclasses.replace(params.structured_outputs, reasoning_end_token_ids=end)
        return dataclasses.replace(params, structured_outputs=structured)

    def parse(self, text: str, final: bool) -> ParsedMessage:
        reasoning, rest, ended = None, text, True
        if self.reasoning is not None:
            split = self.reasoning.split(text, final)
            reasoning, rest, ended = split.reasoning, split.content, split.ended or final
        if not self.include_reasoning:
            reasoning = None
        if self.tools.parser is None or not ended:
            return ParsedMessage(reasoning, rest, [])
        parsed = self.tools.parser.parse(rest, final)
        if final and parsed.calls and not parsed.valid_calls:
            return ParsedMessage(reasoning, rest, [])  # not well-formed calls after all: the text is the answer
        calls = parsed.calls if self.parallel_tool_calls else parsed.calls[:1]
        return ParsedMessage(reasoning, parsed.content, calls)

    def finish_reason(self, reason: str | None, called: bool) -> str | None:
        """A finished output that called tools says so ("tool_calls"), unless it ran out of tokens."""
        if called and reason == "stop" and self.tools.finish_reason is not None:
            return self.tools.finish_reason
        return reason

    def message(self, text: str) -> ChatResponseMessage:
        """The whole answer of one choice."""
        parsed = self.parse(text, final=True)
        calls = [ToolCall(id=self.tools.parser.new_call_id(), function=FunctionCall(name=c.name, arguments=c.arguments))
                 for c in parsed.calls]
        content = parsed.content if parsed.content or not (calls or parsed.reasoning is not None) else None
        return ChatResponseMessage(content=content, tool_calls=calls, reasoning_content=parsed.reasoning,
                                   reasoning=parsed.reasoning)


@dataclass
class ChoiceStream:
    """What one streamed choice has sent so far."""

    parser: ChatOutputParser
    reasoning_sent: int = 0
    content_sent: int = 0
    calls_sent: list[int] = field(default_factory=list)  # per call: characters of its arguments sent

    @property
    def called(self) -> bool:
        return bool(self.calls_sent)

    def delta(self, text: str, final: bool) -> DeltaMessage | None:
        """What the text so far adds to what was sent; None when nothing."""
        fields = self.delta_fields(text, final)
        return DeltaMessage(**fields) if fields is not None else None

    def delta_fields(self, text: str, final: bool) -> dict[str, Any] | None:
        """`delta`'s fields that are not None, in its order (as it serializes), without building the model: what a
        stream chunk writes for each token."""
        parsed = self.parser.parse(text, final)
        reasoning = (parsed.reasoning or "")[self.reasoning_sent:]
        content = parsed.content[self.content_sent:]
        self.reasoning_sent += len(reasoning)
        self.content_sent += len(content)
        calls = self._call_deltas(parsed.calls)
        if not (reasoning or content or calls):
            return None
        fields: dict[str, Any] = {"content": content} if content else {}
        if reasoning:
            fields["reasoning_content"] = fields["reasoning"] = reasoning
        if calls:
            fields["tool_calls"] = calls
        return fields

    def _call_deltas(self, calls: list[PartialCall]) -> list[DeltaToolCall]:
        deltas = []
        for index, call in enumerate(calls):
            if call.name is None:
                break  # later calls wait for this one's name
            if index == len(self.calls_sent):
                self.calls_sent.append(len(call.arguments))
                function = DeltaFunctionCall(name=call.name, arguments=call.arguments or None)
                deltas.append(DeltaToolCall(index=index, id=self.parser.tools.parser.new_call_id(), type="function",
                                            function=function))
            elif len(call.arguments) > self.calls_sent[index]:
                fragment = call.arguments[self.calls_sent[index]:]
                self.calls_sent[index] = len(call.arguments)
                deltas.append(DeltaToolCall(index=index, function=DeltaFunctionCall(arguments=fragment)))
        return deltas
