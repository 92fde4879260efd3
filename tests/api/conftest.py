"""The servers most HTTP tests share: the tiny qwen2 one, the pooling one and the tool-calling one, each started once
per session (tests that want another server start their own with `start_server` or `serve_checkpoint` of
tests/conftest.py)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from pooling_models import CROSS_ENCODER, DECODER_EMBEDDER
from tool_templates import TOOLS_MODEL, template_path

from loomserve.testing.server import Server


@pytest.fixture(scope="session")
def server(start_server) -> Iterator[Server]:
    """The shared server; tests must leave it healthy and idle. It reports cached prompt tokens (tests of the
    prefix cache read them) and takes prompt_embeds."""
    with start_server("--enable-prompt-tokens-details", "--enable-prompt-embeds") as s:
        yield s


@pytest.fixture(scope="session")
def pooling_server(serve_checkpoint) -> Iterator[Server]:
    """The embedded default (a demo chat model plus the real all-MiniLM-L6-v2) with a decoder embedder and a
    cross-encoder beside it: four engines behind one server."""
    from loomserve.testing.pooling_checkpoints import tiny_decoder_embedder, tiny_encoder

    flags = ["--embedding-model", f"{DECODER_EMBEDDER}={tiny_decoder_embedder()}",
             "--rerank-model", f"{CROSS_ENCODER}={tiny_encoder('bert', head='classify')}"]
    with serve_checkpoint(None, *flags) as s:
        yield s


@pytest.fixture(scope="session")
def tools_server(serve_checkpoint) -> Iterator[Server]:
    """A tiny qwen3 with Qwen3's chat template, served as vLLM serves Qwen3: the model's own (Hermes) tool calls
    parsed under tool_choice "auto", and `<think>` reasoning split from the answer. It keeps /v1/responses."""
    from loomserve.testing.checkpoints import tiny_checkpoint

    flags = ["--served-model-name", TOOLS_MODEL, "--chat-template", str(template_path("qwen3")),
             "--enable-auto-tool-choice", "--tool-call-parser", "hermes", "--reasoning-parser", "qwen3",
             "--enable-responses-store"]
    with serve_checkpoint(str(tiny_checkpoint("qwen3")), *flags) as s:
        yield s
