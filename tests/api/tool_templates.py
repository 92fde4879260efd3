"""Chat templates of the tool-calling model families (chat_templates/*.jinja), as their models ship them, trimmed
of what the tiny checkpoints cannot use (dates, built-in tools): Qwen3 (Hermes tool calls, `<think>` reasoning,
enable_thinking), Llama 3.1 (JSON tool calls), Mistral v0.3 (`[TOOL_CALLS]`, nine-character ids) and Qwen3-Coder
(XML tool calls). Served with `--chat-template`, and rendered beside transformers in the tests."""

from __future__ import annotations

from pathlib import Path

FOLDER = Path(__file__).parent / "chat_templates"
TOOLS_MODEL = "tiny-qwen3"  # the name the tools server (conftest.py) serves its Qwen3-style model under


def template_path(family: str) -> Path:
    """The template file of `family`: qwen3, llama3.1, mistral or qwen3_coder."""
    return FOLDER / f"{family}.jinja"


def template(family: str) -> str:
    return template_path(family).read_text()
