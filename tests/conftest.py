"""Shared fixtures: tiny seeded checkpoints in real Hugging Face format, built once per session."""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    # Triton kernels run under Triton's CPU interpreter here; the switch is read when triton is imported.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from loomserve.tiny_checkpoints import FAMILIES, tiny_checkpoint  # noqa: E402


@pytest.fixture(scope="session", params=FAMILIES)
def family_checkpoint(request) -> tuple[str, str]:
    return request.param, str(tiny_checkpoint(request.param))


@pytest.fixture(scope="session")
def qwen2_checkpoint() -> str:
    return str(tiny_checkpoint("qwen2"))
