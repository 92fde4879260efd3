"""Shared fixtures: tiny seeded checkpoints in real Hugging Face format, built once per session."""

from __future__ import annotations

import pytest

from loomserve.tiny_checkpoints import FAMILIES, tiny_checkpoint


@pytest.fixture(scope="session", params=FAMILIES)
def family_checkpoint(request) -> tuple[str, str]:
    return request.param, str(tiny_checkpoint(request.param))


@pytest.fixture(scope="session")
def qwen2_checkpoint() -> str:
    return str(tiny_checkpoint("qwen2"))
