"""The tiny multimodal checkpoints, built once per session."""

from __future__ import annotations

import pytest

from loomserve.testing.mm_checkpoints import tiny_mm_checkpoint


@pytest.fixture(scope="session")
def mm_checkpoint():
    """mm_checkpoint(family) -> path of the tiny checkpoint."""
    return lambda family: str(tiny_mm_checkpoint(family))
