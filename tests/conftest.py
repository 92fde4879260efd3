"""Shared fixtures: tiny seeded checkpoints in real Hugging Face format, built once per session, and real servers
of them (loomserve/testing/server.py) for the HTTP tests."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING

import torch

if not torch.cuda.is_available():
    # Triton kernels run under Triton's CPU interpreter here; the switch is read when triton is imported.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import httpx  # noqa: E402
import pytest  # noqa: E402

from loomserve.testing.checkpoints import FAMILIES, tiny_checkpoint  # noqa: E402
from loomserve.testing.server import Server, running_server  # noqa: E402

if TYPE_CHECKING:
    import openai


@pytest.fixture(scope="session", params=FAMILIES)
def family_checkpoint(request) -> tuple[str, str]:
    return request.param, str(tiny_checkpoint(request.param))


@pytest.fixture(scope="session")
def qwen2_checkpoint() -> str:
    return str(tiny_checkpoint("qwen2"))


@pytest.fixture(scope="session")
def serve_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., AbstractContextManager[Server]]:
    """`with serve_checkpoint(path, *extra_flags) as server:` a server of any checkpoint; None: the embedded
    default."""
    return lambda checkpoint, *flags: running_server(checkpoint, tmp_path_factory.mktemp("server"), *flags)


@pytest.fixture(scope="session")
def start_server(
    qwen2_checkpoint: str, serve_checkpoint: Callable[..., AbstractContextManager[Server]]
) -> Callable[..., AbstractContextManager[Server]]:
    """`with start_server(*extra_flags) as server:` a server of the tiny qwen2 checkpoint."""
    return lambda *flags: serve_checkpoint(qwen2_checkpoint, *flags)


# `model`, `client` and `http` are of whichever `server` fixture the test sees: a conftest's or its own module's.
@pytest.fixture(scope="module")
def model(server: Server) -> str:
    return server.model


@pytest.fixture(scope="module")
def client(server: Server) -> openai.OpenAI:
    return server.client()


@pytest.fixture(scope="module")
def http(server: Server) -> Iterator[httpx.Client]:
    with server.http() as c:
        yield c
