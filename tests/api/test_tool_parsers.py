"""Tool-call parsers on model-like text, whole and streamed (the pieces of a stream add up to the whole answer),
the forced formats of tool_choice required / named with vLLM's schemas, and each family's history (assistant
tool calls, tool results) rendered through its chat template exactly as transformers renders it."""

from __future__ import annotations

import json

import pytest
from tool_templates import template

from loomserve.api.chat import TemplateInputs, render_chat
from loomserve.api.chat_parsing import ChatOutputParser, ChoiceStream
from loomserve.api.errors import APIError
from loomserve.api.protocol import ChatMessage
from loomserve.api.reasoning import REASONING_PARSERS
from loomserve.api.tool_parsers.choice import ToolMode, tool_mode

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
                   "required": ["city"]},
}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}
TOOLS = [WEATHER, TIME]

# What each family's model writes to call get_weather(Paris, 3) and then get_time().
MODEL_TEXT = {
    "hermes": 'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": 3}}\n'
              '</tool_call>\n<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>',
    "llama3_json": '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris", "days": 3}}; '
                   '{"name": "get_time", "parameters": {}}',
    "mistral": 'Let me check.[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Paris", "days": 3}}, '
               '{"name": "get_time", "arguments": {}}]',
    "qwen3_xml": "Let me check.\n<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n"
                 "<parameter=days>\n3\n</parameter>\n</function>\n</tool_call>\n<tool_call>\n<function=get_time>\n"
                 "</function>\n</tool_call>",
}
CONTENT = {"hermes": "Let me check.\n", "llama3_json": None, "mistral": "Let me check.", "qwen3_xml": "Let me check.\n"}
CALLS = [("get_weather", {"city": "Paris", "days": 3}), ("get_time", {})]


def auto_parser(name: str, reasoning: str | None = None, parallel: bool = True) -> ChatOutputParser:
    mode = tool_mode(TOOLS, "auto", name, parallel)
    return ChatOutputParser(REASONING_PARSERS[reasoning]() if reasoning else None, mode, parallel_tool_calls=parallel)


def streamed(parser: ChatOutputParser, text: str, step: int) -> dict:
    """The stream of `text` in pieces of `step` characters, added up as a client does."""
    stream = ChoiceStream(parser)
    reasoning, content, calls = "", "", {}
    for end in [*range(step, len(text), step), len(text)]:
        delta = stream.delta(text[:end], final=end == len(text))
        if delta is None:
            continue
        reasoning += delta.reasoning_content or ""
        content += delta.content or ""
        for call in delta.tool_calls or []:
            if call.id is not None:
                assert call.index == len(calls) and call.function.name  # id and name come first, once
                calls[call.index] = [call.function.name, ""]
            calls[call.index][1] += call.function.arguments or ""
    return {"reasoning": reasoning or None, "content": content or None,
            "calls": [(name, json.loads(arguments)) for name, arguments in calls.values()]}


def whole(parser: ChatOutputParser, text: str) -> dict:
    message = parser.message(text)
    return {"reasoning": message.reasoning_content, "content": message.content,
            "calls": [(c.function.name, json.loads(c.function.arguments)) for c in message.tool_calls]}


@pytest.mark.parametrize("name", sorted(MODEL_TEXT))
def test_each_parser_reads_its_familys_calls_and_the_content_before_them(name):
    assert whole(auto_parser(name), MODEL_TEXT[name]) == {"reasoning": None, "content": CONTENT[name],
                                                          "calls": CALLS}


@pytest.mark.parametrize("step", [1, 3, 7])
@pytest.mark.parametrize("name", sorted(MODEL_TEXT))
def test_a_streamed_answer_adds_up_to_the_whole_one(name, step):
    parser = auto_parser(name)
    assert streamed(parser, MODEL_TEXT[name], step) == whole(parser, MODEL_TEXT[name])


@pytest.mark.parametrize("name", sorted(MODEL_TEXT))
def test_text_without_calls_is_content(name):
    text = "The weather in Paris is sunny; {braces} and [brackets] too."
    assert whole(auto_parser(name), text) == {"reasoning": None, "content": text, "calls": []}
    assert streamed(auto_parser(name), text, 2) == whole(auto_parser(name), text)


@pytest.mark.parametrize("name", ["hermes", "mistral", "llama3_json"])
def test_a_call_cut_short_is_served_as_content(name):
    text = MODEL_TEXT[name][: MODEL_TEXT[name].index('"Paris"') + 4]
    assert whole(auto_parser(name), text) == {"reasoning": None, "content": text, "calls": []}


def test_arguments_stream_in_fragments_after_the_id_and_name():
    stream = ChoiceStream(auto_parser("hermes"))
    text = MODEL_TEXT["hermes"]
    deltas = [stream.delta(text[:end], end == len(text)) for end in range(1, len(text) + 1)]
    calls = [call for delta in deltas if delta is not None for call in delta.tool_calls or []]
    first = calls[0].model_dump()
    assert first["type"] == "function" and first["id"].startswith("chatcmpl-tool-")
    assert first["function"] == {"name": "get_weather"}  # character by character: the name before any argument
    fragments = [c.function.arguments for c in calls[1:] if c.index == 0]
    assert len(fragments) > 5 and "".join(fragments) == '{"city": "Paris", "days": 3}'
    assert all(c.id is None and c.function.name is None for c in calls[1:] if c.index == 0)


def test_mistral_v11_calls_and_nine_character_ids():
    parser = auto_parser("mistral")
    text = 'Sure.[TOOL_CALLS]get_weather[ARGS]{"city": "Paris", "days": 3}[TOOL_CALLS]get_time[ARGS]{}'
    assert whole(parser, text) == {"reasoning": None, "content": "Sure.", "calls": CALLS}
    assert streamed(parser, text, 1) == whole(parser, text)
    ids = [call.id for call in parser.message(text).tool_calls]
    assert all(len(i) == 9 and i.isalnum() for i in ids)


def test_qwen3_xml_converts_parameters_by_their_schema_types():
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {
        "n": {"type": "integer"}, "x": {"type": "number"}, "ok": {"type": "boolean"}, "tags": {"type": "array"},
        "s": {"type": "string"}}}}}]
    text = ("<tool_call>\n<function=f>\n<parameter=n>\n7\n</parameter>\n<parameter=x>\n2.5\n</parameter>\n"
            "<parameter=ok>\ntrue\n</parameter>\n<parameter=tags>\n[\"a\", \"b\"]\n</parameter>\n"
            "<parameter=s>\n42\n</parameter>\n</function>\n</tool_call>")
    parser = ChatOutputParser(tools=tool_mode(tools, "auto", "qwen3_xml"))
    arguments = json.loads(parser.message(text).tool_calls[0].function.arguments)
    assert arguments == {"n": 7, "x": 2.5, "ok": True, "tags": ["a", "b"], "s": "42"}


def test_parallel_tool_calls_false_keeps_the_first_call():
    parser = auto_parser("hermes", parallel=False)
    assert whole(parser, MODEL_TEXT["hermes"])["calls"] == CALLS[:1]


def test_tool_calls_are_parsed_after_the_reasoning():
    text = "<think>I need <tool_call> the weather.</think>" + MODEL_TEXT["hermes"]
    parser = auto_parser("hermes", reasoning="qwen3")
    expected = {"reasoning": "I need <tool_call> the weather.", "content": CONTENT["hermes"], "calls": CALLS}
    assert whole(parser, text) == expected
    assert streamed(parser, text, 2) == expected


def test_finish_reason_is_tool_calls_only_for_a_stop_with_calls():
    parser = auto_parser("hermes")
    assert parser.finish_reason("stop", called=True) == "tool_calls"
    assert parser.finish_reason("stop", called=False) == "stop"
    assert parser.finish_reason("length", called=True) == "length"


# ---------------------------------------------------------------- tool_choice


def test_required_forces_vllms_list_schema_and_reads_the_list():
    mode = tool_mode(TOOLS, "required", None)
    assert mode.schema == {"type": "array", "minItems": 1, "items": {"type": "object", "anyOf": [
        {"properties": {"name": {"type": "string", "enum": ["get_weather"]},
                        "parameters": WEATHER["function"]["parameters"]}, "required": ["name", "parameters"]},
        {"properties": {"name": {"type": "string", "enum": ["get_time"]},
                        "parameters": TIME["function"]["parameters"]}, "required": ["name", "parameters"]},
    ]}}
    text = '[{"name": "get_weather", "parameters": {"city": "Paris", "days": 3}}, {"name": "get_time", ' \
           '"parameters": {}}]'
    parser = ChatOutputParser(tools=mode)
    assert whole(parser, text) == {"reasoning": None, "content": None, "calls": CALLS}
    assert streamed(parser, text, 3) == whole(parser, text)
    assert parser.finish_reason("stop", called=True) == "tool_calls"


def test_required_without_parallel_calls_allows_one_item():
    assert tool_mode(TOOLS, "required", None, parallel_tool_calls=False).schema["maxItems"] == 1


def test_required_gathers_defs_of_all_tools():
    tool = {"type": "function", "function": {"name": "g", "parameters": {
        "type": "object", "properties": {"p": {"$ref": "#/$defs/P"}}, "$defs": {"P": {"type": "integer"}}}}}
    schema = tool_mode([tool, TIME], "required", None).schema
    assert schema["$defs"] == {"P": {"type": "integer"}}
    assert "$defs" not in schema["items"]["anyOf"][0]["properties"]["parameters"]
    assert "$defs" in tool["function"]["parameters"]  # the request's own tools stay as given


def test_a_named_function_forces_its_parameters_and_reads_the_arguments():
    mode = tool_mode(TOOLS, {"type": "function", "function": {"name": "get_weather"}}, None)
    assert mode.schema == WEATHER["function"]["parameters"]
    parser = ChatOutputParser(tools=mode)
    assert whole(parser, '{"city": "Paris", "days": 3}') == {"reasoning": None, "content": None, "calls": CALLS[:1]}
    assert streamed(parser, '{"city": "Paris", "days": 3}', 4) == whole(parser, '{"city": "Paris", "days": 3}')
    assert parser.finish_reason("stop", called=True) == "stop"


def test_a_named_function_without_parameters_forces_an_empty_object():
    mode = tool_mode([{"type": "function", "function": {"name": "ping"}}],
                     {"type": "function", "function": {"name": "ping"}}, None)
    assert mode.schema == {"type": "object", "properties": {}}


@pytest.mark.parametrize(("tools", "choice", "parser", "says"), [
    (TOOLS, {"type": "function", "function": {"name": "nope"}}, None, "Tool 'nope' has not been passed"),
    (None, "required", None, "`tools` must be set"),
    (None, {"type": "function", "function": {"name": "get_weather"}}, None, "`tools` must be set"),
    (TOOLS, "auto", None, "--enable-auto-tool-choice"),
    (TOOLS, None, None, "--enable-auto-tool-choice"),
])
def test_inconsistent_tool_choice_is_a_400(tools, choice, parser, says):
    with pytest.raises(APIError) as caught:
        tool_mode(tools, choice, parser)
    assert caught.value.status == 400 and says in caught.value.message and caught.value.param == "tool_choice"


def test_tool_choice_none_reads_plain_content():
    assert tool_mode(TOOLS, "none", "hermes") == ToolMode()


# ---------------------------------------------------------------- history through each family's template

FAMILY_OF = {"qwen3": "qwen3", "llama3.1": "llama", "mistral": "mistral", "qwen3_coder": "qwen3"}


def history(call_id: str, parallel: bool) -> list[dict]:
    """A conversation that called tools, as an OpenAI client sends it (arguments as JSON text)."""
    calls = [{"id": call_id, "type": "function",
              "function": {"name": "get_weather", "arguments": '{"city": "Paris", "days": 3}'}}]
    if parallel:
        calls.append({"id": call_id[::-1], "type": "function", "function": {"name": "get_time", "arguments": "{}"}})
    results = [{"role": "tool", "tool_call_id": call["id"], "content": "sunny"} for call in calls]
    return [{"role": "user", "content": "Weather in Paris?"}, {"role": "assistant", "content": None,
                                                               "tool_calls": calls}, *results]


def as_transformers_expects(messages: list[dict]) -> list[dict]:
    """The same conversation as transformers' chat templates take it: tool-call arguments as objects."""
    out = []
    for message in messages:
        message = {k: v for k, v in message.items() if v is not None}
        if "tool_calls" in message:
            message["tool_calls"] = [{**c, "function": {**c["function"],
                                                        "arguments": json.loads(c["function"]["arguments"])}}
                                     for c in message["tool_calls"]]
        out.append(message)
    return out


@pytest.mark.parametrize("family", sorted(FAMILY_OF))
def test_tool_history_renders_as_transformers_renders_it(family):
    from transformers import AutoTokenizer

    from loomserve.testing.checkpoints import tiny_checkpoint

    tokenizer = AutoTokenizer.from_pretrained(tiny_checkpoint(FAMILY_OF[family]))
    tokenizer.chat_template = template(family)
    messages = history("abc123XYZ", parallel=family != "llama3.1")  # Llama 3.1 takes one call at a time
    ours, _ = render_chat(tokenizer, [ChatMessage.model_validate(m) for m in messages], None,
                          TemplateInputs(tools=TOOLS))
    reference = tokenizer.apply_chat_template(as_transformers_expects(messages), tools=TOOLS, tokenize=False,
                                              add_generation_prompt=True)
    assert ours == reference
    assert "get_weather" in ours and "Paris" in ours and "sunny" in ours


def test_tool_call_arguments_that_are_not_json_are_a_400():
    from transformers import AutoTokenizer

    from loomserve.testing.checkpoints import tiny_checkpoint

    tokenizer = AutoTokenizer.from_pretrained(tiny_checkpoint("qwen3"))
    tokenizer.chat_template = template("qwen3")
    messages = history("abc123XYZ", parallel=False)
    messages[1]["tool_calls"][0]["function"]["arguments"] = "{city: Paris"
    with pytest.raises(APIError, match="not JSON") as caught:
        render_chat(tokenizer, [ChatMessage.model_validate(m) for m in messages], None, TemplateInputs(tools=TOOLS))
    assert caught.value.status == 400
