"""Tool calling over HTTP through the official openai client, on a tiny qwen3 served as vLLM serves Qwen3 (its
chat template, --enable-auto-tool-choice --tool-call-parser hermes --reasoning-parser qwen3): tools and tool
history rendered as transformers renders them, chat-template fields, inconsistent tool choices refused, and (with
the structured-output engine) tool calls forced by tool_choice required / named or by the model's own format,
parsed whole and streamed."""

from __future__ import annotations

import json

import openai
import pytest
from test_tool_parsers import as_transformers_expects, history
from tool_templates import TOOLS_MODEL, template

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"enum": ["Paris", "Rome"]}, "days": {"enum": [1, 2, 3]}},
                   "required": ["city", "days"], "additionalProperties": False},
}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}}, "required": ["zone"],
    "additionalProperties": False}}}
TOOLS = [WEATHER, TIME]
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def tools_client(tools_server) -> openai.OpenAI:
    return tools_server.client()


@pytest.fixture(scope="module")
def tools_http(tools_server):
    with tools_server.http() as c:
        yield c


@pytest.fixture(scope="module")
def qwen3_tokenizer():
    from transformers import AutoTokenizer

    from loomserve.testing.checkpoints import tiny_checkpoint

    tokenizer = AutoTokenizer.from_pretrained(tiny_checkpoint("qwen3"))
    tokenizer.chat_template = template("qwen3")
    return tokenizer


def chat(client: openai.OpenAI, **kwargs):
    return client.chat.completions.create(model=TOOLS_MODEL, messages=kwargs.pop("messages", ASK), temperature=0,
                                          **kwargs)


def reference_ids(tokenizer, messages: list[dict], **kwargs) -> list[int]:
    return tokenizer.apply_chat_template(as_transformers_expects(messages), tokenize=True, **kwargs)["input_ids"]


def streamed_calls(stream) -> tuple[list[tuple[str, dict]], str | None]:
    """The tool calls a stream adds up to, as a client accumulates them, and its finish reason."""
    calls: dict[int, list[str]] = {}
    finish = None
    for chunk in stream:
        for choice in chunk.choices:
            for call in choice.delta.tool_calls or []:
                if call.id is not None:
                    calls[call.index] = [call.function.name, ""]
                calls[call.index][1] += call.function.arguments or ""
            finish = choice.finish_reason or finish
    return [(name, json.loads(arguments)) for name, arguments in calls.values()], finish


def test_auto_tool_choice_without_a_call_answers_content(tools_client):
    answer = chat(tools_client, tools=TOOLS, max_tokens=8)
    message = answer.choices[0].message
    assert message.tool_calls == [] and message.content
    assert answer.choices[0].finish_reason in ("stop", "length")
    streamed = chat(tools_client, tools=TOOLS, max_tokens=8, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == message.content


def test_tools_and_tool_history_render_as_transformers_renders_them(tools_http, tools_client, qwen3_tokenizer):
    messages = history("call_0", parallel=True)
    expected = reference_ids(qwen3_tokenizer, messages, tools=TOOLS, add_generation_prompt=True)
    tokenized = tools_http.post("/tokenize", json={"model": TOOLS_MODEL, "messages": messages, "tools": TOOLS})
    assert tokenized.status_code == 200 and tokenized.json()["tokens"] == expected
    answer = chat(tools_client, messages=messages, tools=TOOLS, max_tokens=1)
    assert answer.usage.prompt_tokens == len(expected)


def test_chat_template_kwargs_reach_the_template(tools_http, qwen3_tokenizer):
    body = {"model": TOOLS_MODEL, "messages": ASK, "chat_template_kwargs": {"enable_thinking": False}}
    tokens = tools_http.post("/tokenize", json=body).json()["tokens"]
    assert tokens == reference_ids(qwen3_tokenizer, ASK, add_generation_prompt=True, enable_thinking=False)
    assert tokens != reference_ids(qwen3_tokenizer, ASK, add_generation_prompt=True)


def test_continue_final_message_continues_the_assistant_turn(tools_http, tools_client, qwen3_tokenizer):
    messages = [*ASK, {"role": "assistant", "content": "The weather in Paris is"}]
    body = {"model": TOOLS_MODEL, "messages": messages, "continue_final_message": True,
            "add_generation_prompt": False}
    expected = reference_ids(qwen3_tokenizer, messages, continue_final_message=True)
    assert tools_http.post("/tokenize", json=body).json()["tokens"] == expected
    answer = chat(tools_client, messages=messages, max_tokens=1,
                  extra_body={"continue_final_message": True, "add_generation_prompt": False})
    assert answer.usage.prompt_tokens == len(expected)


@pytest.mark.parametrize(("extra", "says"), [
    ({"continue_final_message": True}, "Cannot set both `continue_final_message` and `add_generation_prompt`"),
    ({"chat_template_kwargs": {"tokenize": True}}, "`chat_template_kwargs` must not set `tokenize`"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "book_flight"}}},
     "Tool 'book_flight' has not been passed in `tools`"),
    ({"tool_choice": "required"}, "When using `tool_choice`, `tools` must be set"),
    ({"tool_choice": "sometimes", "tools": TOOLS}, "tool_choice"),
])
def test_inconsistent_chat_fields_are_a_400(tools_client, extra, says):
    with pytest.raises(openai.BadRequestError) as caught:
        chat(tools_client, max_tokens=1, extra_body=extra)
    assert says in caught.value.body["message"]


def test_auto_tool_choice_needs_the_server_flags(client, model):
    with pytest.raises(openai.BadRequestError, match="--enable-auto-tool-choice"):
        client.chat.completions.create(model=model, messages=ASK, tools=TOOLS, max_tokens=1)


# ---------------------------------------------------------------- with the structured-output engine
# Under --reasoning-parser qwen3 structured output starts once reasoning ends (as in vLLM): these requests close the
# think block in the prompt (`enable_thinking: false`), so it applies from the first token.
NO_THINKING = {"chat_template_kwargs": {"enable_thinking": False}}


def valid(name: str, arguments: dict) -> bool:
    """The call names one of TOOLS and its arguments match that tool's schema (enums, all required)."""
    properties = {t["function"]["name"]: t["function"]["parameters"]["properties"] for t in TOOLS}[name]
    return arguments.keys() == properties.keys() and all(arguments[k] in properties[k]["enum"] for k in properties)


def test_required_tool_choice_answers_valid_tool_calls(tools_client):
    # One call: a random model left free would add calls to the list until max_tokens.
    answer = chat(tools_client, tools=TOOLS, tool_choice="required", parallel_tool_calls=False, max_tokens=200,
                  extra_body=NO_THINKING)
    choice = answer.choices[0]
    calls = [(c.function.name, json.loads(c.function.arguments)) for c in choice.message.tool_calls]
    assert len(calls) == 1 and valid(*calls[0])
    assert choice.finish_reason == "tool_calls" and not choice.message.content
    streamed = chat(tools_client, tools=TOOLS, tool_choice="required", parallel_tool_calls=False, max_tokens=200,
                    stream=True, extra_body=NO_THINKING)
    assert streamed_calls(streamed) == (calls, "tool_calls")


def test_a_named_tool_choice_calls_that_tool(tools_client):
    named = {"type": "function", "function": {"name": "get_time"}}
    answer = chat(tools_client, tools=TOOLS, tool_choice=named, max_tokens=100, extra_body=NO_THINKING)
    (call,) = answer.choices[0].message.tool_calls
    assert call.function.name == "get_time" and valid("get_time", json.loads(call.function.arguments))
    streamed = chat(tools_client, tools=TOOLS, tool_choice=named, max_tokens=100, stream=True, extra_body=NO_THINKING)
    assert streamed_calls(streamed)[0] == [("get_time", json.loads(call.function.arguments))]


def test_a_forced_tool_call_waits_for_the_models_reasoning_to_end(tools_client, tools_http):
    """With thinking on, the prompt leaves `<think>` open: the forcing grammar does not start until the model writes
    `</think>`, so a model that keeps thinking writes what it likes (here what a bias makes it write)."""
    (q,) = tools_http.post("/tokenize", json={"model": TOOLS_MODEL, "prompt": "Q",
                                              "add_special_tokens": False}).json()["tokens"]
    answer = chat(tools_client, tools=TOOLS, tool_choice="required", max_tokens=6, logit_bias={str(q): 100})
    message = answer.choices[0].message
    assert message.content == "Q" * 6 and not message.tool_calls


def test_auto_tool_choice_parses_the_models_own_calls(tools_client):
    # The tiny model is forced (by a regex) to write what Qwen3 writes to call a tool, after its reasoning.
    regex = (r'<think>[a-z ]{1,12}</think>\n\n<tool_call>\n\{"name": "get_weather", "arguments": '
             r'\{"city": "(Paris|Rome)", "days": [123]\}\}\n</tool_call>')
    answer = chat(tools_client, tools=TOOLS, max_tokens=200,
                  extra_body={"structured_outputs": {"regex": regex}, **NO_THINKING})
    choice = answer.choices[0]
    (call,) = choice.message.tool_calls
    assert call.function.name == "get_weather" and valid("get_weather", json.loads(call.function.arguments))
    assert choice.finish_reason == "tool_calls" and choice.message.reasoning_content
    streamed = chat(tools_client, tools=TOOLS, max_tokens=200, stream=True,
                    extra_body={"structured_outputs": {"regex": regex}, **NO_THINKING})
    assert streamed_calls(streamed) == ([("get_weather", json.loads(call.function.arguments))], "tool_calls")


# ---------------------------------------------------------------- template inputs and flags, in process

PARTS_TEMPLATE = ("{% for m in messages %}{% if m.content is string %}[{{ m.content }}]{% else %}"
                  "{% for p in m.content %}<{{ p.text }}>{% endfor %}{% endif %}{% endfor %}"
                  "{{ reasoning_effort | default('') }}")
PARTS = [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
         {"role": "user", "content": "c"}]


@pytest.mark.parametrize(("content_format", "rendered"), [
    ("string", "[a\nb][c]"), ("openai", "<a><b><c>"), ("auto", "<a><b><c>")])
def test_content_format_hands_the_template_strings_or_parts(qwen3_tokenizer, content_format, rendered):
    from loomserve.api.chat import TemplateInputs, render_chat
    from loomserve.api.protocol import ChatMessage

    tokenizer = type(qwen3_tokenizer).from_pretrained(qwen3_tokenizer.name_or_path)
    tokenizer.chat_template = PARTS_TEMPLATE
    messages = [ChatMessage.model_validate(m) for m in PARTS]
    text, _ = render_chat(tokenizer, messages, None, TemplateInputs(add_generation_prompt=False,
                                                                    content_format=content_format))
    assert text == rendered


def test_auto_content_format_follows_the_template():
    from loomserve.api.chat import detect_content_format

    assert detect_content_format(PARTS_TEMPLATE) == "openai"
    assert detect_content_format(template("qwen3")) == "string"


def test_reasoning_effort_reaches_the_template(qwen3_tokenizer):
    from loomserve.api.chat import TemplateInputs, render_chat
    from loomserve.api.protocol import ChatCompletionRequest

    tokenizer = type(qwen3_tokenizer).from_pretrained(qwen3_tokenizer.name_or_path)
    tokenizer.chat_template = PARTS_TEMPLATE
    request = ChatCompletionRequest(messages=PARTS[1:], reasoning_effort="high", add_generation_prompt=False)
    text, _ = render_chat(tokenizer, request.messages, None, TemplateInputs.of(request, "string"))
    assert text == "[c]high"


def test_auto_tool_choice_flag_needs_a_parser():
    from loomserve.api.chat_flags import chat_options
    from loomserve.api.cli import make_parser

    ns = make_parser().parse_args(["serve", "m", "--enable-auto-tool-choice"])
    with pytest.raises(ValueError, match="--enable-auto-tool-choice needs --tool-call-parser"):
        chat_options(ns)
    ns = make_parser().parse_args(["serve", "m", "--tool-call-parser", "mistral", "--reasoning-parser", "deepseek_r1",
                                   "--chat-template-content-format", "openai"])
    options = chat_options(ns)
    assert (options.tool_call_parser, options.reasoning_parser, options.content_format) == \
        (None, "deepseek_r1", "openai")  # a parser without --enable-auto-tool-choice parses nothing
