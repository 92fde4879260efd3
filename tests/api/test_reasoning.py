"""Reasoning parsers: `<think>` text split into `reasoning_content` (and `reasoning`) and the answer into
`content`, by DeepSeek-R1's and Qwen3's rules, whole and streamed; over HTTP on the Qwen3-style tools server."""

from __future__ import annotations

import pytest
from tool_templates import TOOLS_MODEL

from loomserve.api.chat_parsing import ChatOutputParser, ChoiceStream
from loomserve.api.reasoning import REASONING_PARSERS

ASK = [{"role": "user", "content": "Why is the sky blue?"}]


def whole(name: str, text: str, include_reasoning: bool = True) -> tuple[str | None, str | None]:
    message = ChatOutputParser(REASONING_PARSERS[name](), include_reasoning=include_reasoning).message(text)
    assert message.reasoning == message.reasoning_content
    return message.reasoning_content, message.content


def streamed(name: str, text: str, step: int) -> tuple[str | None, str | None]:
    stream = ChoiceStream(ChatOutputParser(REASONING_PARSERS[name]()))
    reasoning, content = "", ""
    for end in [*range(step, len(text), step), len(text)]:
        delta = stream.delta(text[:end], final=end == len(text))
        if delta is not None:
            assert delta.reasoning == delta.reasoning_content
            reasoning += delta.reasoning_content or ""
            content += delta.content or ""
    return reasoning or None, content or None


@pytest.mark.parametrize(("name", "text", "split"), [
    ("deepseek_r1", "<think>Rayleigh scattering.</think>Blue light scatters most.",
     ("Rayleigh scattering.", "Blue light scatters most.")),
    ("deepseek_r1", "Rayleigh scattering.</think>Blue light scatters most.",  # <think> opened by the template
     ("Rayleigh scattering.", "Blue light scatters most.")),
    ("deepseek_r1", "Still thinking about it", ("Still thinking about it", None)),
    ("qwen3", "<think>\nRayleigh scattering.\n</think>\n\nBlue light scatters most.",
     ("\nRayleigh scattering.\n", "\n\nBlue light scatters most.")),
    ("qwen3", "Blue light scatters most.", (None, "Blue light scatters most.")),
    ("qwen3", "<think>Cut short", ("Cut short", None)),
])
def test_reasoning_is_split_from_the_answer(name, text, split):
    assert whole(name, text) == split


@pytest.mark.parametrize("step", [1, 4])
@pytest.mark.parametrize(("name", "text"), [
    ("deepseek_r1", "<think>a < b and </ not yet</think>so a wins"),
    ("deepseek_r1", "no tags at all </thin"),
    ("qwen3", "<think>x</think>answer with <think> inside"),
    ("qwen3", "<thing> is not a think tag"),
])
def test_a_streamed_split_adds_up_to_the_whole_one(name, text, step):
    assert streamed(name, text, step) == whole(name, text)


def test_include_reasoning_false_leaves_the_reasoning_out():
    assert whole("qwen3", "<think>hidden</think>shown", include_reasoning=False) == (None, "shown")


def test_an_answer_without_think_tags_is_content_under_qwen3(tools_server):
    client = tools_server.client()
    answer = client.chat.completions.create(model=TOOLS_MODEL, messages=ASK, max_tokens=8, temperature=0)
    message = answer.choices[0].message
    assert message.content and message.reasoning_content is None


def test_reasoning_and_answer_are_split_over_http_whole_and_streamed(tools_server):
    client = tools_server.client()
    kwargs = {"model": TOOLS_MODEL, "messages": ASK, "max_tokens": 60, "temperature": 0,
              "extra_body": {"structured_outputs": {"regex": r"<think>[a-z ]{3,20}</think>[a-z ]{3,20}"},
                             "chat_template_kwargs": {"enable_thinking": False}}}  # the regex applies from token 1
    message = client.chat.completions.create(**kwargs).choices[0].message
    assert message.reasoning_content and message.reasoning == message.reasoning_content and message.content
    assert "<think>" not in message.content + message.reasoning_content
    chunks = list(client.chat.completions.create(stream=True, **kwargs))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    assert "".join(getattr(d, "reasoning_content", None) or "" for d in deltas) == message.reasoning_content
    assert "".join(d.content or "" for d in deltas) == message.content
