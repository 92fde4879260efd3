"""A stream chunk written from plain dicts is byte for byte the SSE event of the pydantic response model."""

from __future__ import annotations

import pytest

from loomserve.api.chat_parsing import ChatOutputParser, ChoiceStream
from loomserve.api.protocol import (
    ChatCompletionStreamResponse,
    ChatLogProb,
    ChatLogProbs,
    ChatLogProbsContent,
    ChatStreamChoice,
    CompletionChoice,
    CompletionLogProbs,
    CompletionResponse,
    DeltaFunctionCall,
    DeltaMessage,
    DeltaToolCall,
    PromptLogprob,
    UsageInfo,
)
from loomserve.api.reasoning import REASONING_PARSERS
from loomserve.api.stream_chunks import ChunkEnvelope
from loomserve.api.streaming import sse
from loomserve.api.tool_parsers.choice import tool_mode

ID, CREATED, MODEL = "chatcmpl-0f1e", 1764806400, "org/model \u00e9"
TEXTS = ["", "plain", "caf\u00e9 \U0001f600 \u4e2d", 'quote " back \\ slash /', "line\nbreak\ttab\r\x00\x1f\x7f",
         "seps \u2028 \u2029 \u0085 end"]
LOGPROBS = ChatLogProbs(content=[ChatLogProbsContent(
    token="\u2028x", logprob=-0.0123456789, bytes=[226, 128, 168, 120],
    top_logprobs=[ChatLogProb(token="a", logprob=-9999.0, bytes=[97]), ChatLogProb(token="b", logprob=-1e-07)],
)])
TOOL_CALL = DeltaMessage(tool_calls=[DeltaToolCall(index=0, id="call_1", type="function",
                                                   function=DeltaFunctionCall(name="f", arguments='{"a": 1}'))])
WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}
USAGES = [None, UsageInfo.of(12, 3, None), UsageInfo.of(12, 3, cached_tokens=8)]


def chat_choice(delta: DeltaMessage, **fields: object) -> tuple[dict, ChatStreamChoice]:
    plain = {"index": 1, "delta": delta, "logprobs": None, "finish_reason": None, "stop_reason": None,
             "token_ids": None, **fields}
    return plain, ChatStreamChoice(**plain)


@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("usage", USAGES)
def test_a_chat_content_chunk_is_the_models_event(text, usage):
    plain, model = chat_choice(DeltaMessage(content=text))
    expected = sse(ChatCompletionStreamResponse(id=ID, created=CREATED, model=MODEL, choices=[model], usage=usage))
    got = ChunkEnvelope(ID, "chat.completion.chunk", CREATED, MODEL).event([plain], usage=usage)
    assert got == expected.encode()


@pytest.mark.parametrize("fields", [
    {"delta": {"role": "assistant", "content": ""}},
    {"delta": TOOL_CALL, "finish_reason": "tool_calls", "stop_reason": 7},
    {"delta": DeltaMessage(reasoning_content="why", reasoning="why"), "logprobs": LOGPROBS, "token_ids": [5, 6]},
    {"delta": {"content": ""}, "finish_reason": "stop", "stop_reason": "</s>"},
])
def test_role_tool_call_reasoning_and_logprob_chunks_are_the_models_events(fields):
    plain, model = chat_choice(**fields)
    envelope = ChunkEnvelope(ID, "chat.completion.chunk", CREATED, MODEL)
    expected = sse(ChatCompletionStreamResponse(id=ID, created=CREATED, model=MODEL, choices=[model],
                                                prompt_token_ids=[1, 2, 3]))
    assert envelope.event([plain], usage=None, prompt_token_ids=[1, 2, 3]) == expected.encode()


def test_a_usage_only_chunk_is_the_models_event():
    usage = UsageInfo.of(4, 9, cached_tokens=0)
    expected = sse(ChatCompletionStreamResponse(id=ID, created=CREATED, model=MODEL, choices=[], usage=usage))
    assert ChunkEnvelope(ID, "chat.completion.chunk", CREATED, MODEL).event([], usage=usage) == expected.encode()


@pytest.mark.parametrize("text", TEXTS)
def test_a_completion_chunk_is_the_models_event(text):
    plain = {
        "index": 3, "text": text,
        "logprobs": CompletionLogProbs(text_offset=[0, 4], token_logprobs=[None, -0.5], tokens=["\u2029a", "b"],
                                       top_logprobs=[None, {"b": -0.5, "\u00e9": -2.25}]),
        "finish_reason": "length", "stop_reason": None,
        "prompt_logprobs": [None, {17: PromptLogprob(logprob=-1.5, rank=1, decoded_token="x")}],
        "prompt_token_ids": [17, 18], "token_ids": [9],
    }
    usage = UsageInfo.of(2, 1, None)
    expected = sse(CompletionResponse(id=ID, created=CREATED, model=MODEL, choices=[CompletionChoice(**plain)],
                                      usage=usage))
    assert ChunkEnvelope(ID, "text_completion", CREATED, MODEL).event([plain], usage=usage) == expected.encode()


@pytest.mark.parametrize("reasoning", [None, "deepseek_r1"])
def test_a_streamed_choices_delta_fields_write_as_its_delta_message(reasoning):
    parser = ChatOutputParser(REASONING_PARSERS[reasoning]() if reasoning else None,
                              tool_mode([WEATHER], "auto", "hermes", True))
    text = ('<think>Cold?</think>Let me check \u2028.\n<tool_call>\n{"name": "get_weather", "arguments": '
            '{"city": "Paris"}}\n</tool_call>')
    stream, envelope = ChoiceStream(parser), ChunkEnvelope(ID, "chat.completion.chunk", CREATED, MODEL)
    kinds = set()
    for end in range(1, len(text) + 1):
        fields = stream.delta_fields(text[:end], final=end == len(text))
        if fields is not None:
            plain, model = chat_choice(fields)
            _, from_model = chat_choice(DeltaMessage(**fields))  # what `ChoiceStream.delta` returns
            expected = sse(ChatCompletionStreamResponse(id=ID, created=CREATED, model=MODEL, choices=[from_model]))
            assert envelope.event([plain]) == expected.encode()
            kinds.update(fields)
    assert kinds == {"content", "tool_calls"} | ({"reasoning", "reasoning_content"} if reasoning else set())
