"""Adapters for the LoRA tests: made once per session by peft on the tiny checkpoints."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from peft_reference import SHAPES, make_adapter


@pytest.fixture(scope="session")
def adapter_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("adapters")


@pytest.fixture(scope="session")
def make_lora(adapter_dir: Path) -> Callable[..., str]:
    """`make_lora(base, name, seed, **LoraConfig fields)` -> folder, built once per (base, name)."""
    made: dict[tuple[str, str], str] = {}

    def make(base: str, name: str, seed: int = 0, **lora) -> str:
        key = (base, name)
        if key not in made:
            made[key] = make_adapter(base, adapter_dir / f"{Path(base).name}-{name}", seed, **lora)
        return made[key]

    return make


@pytest.fixture(scope="session")
def shaped_adapters(make_lora) -> Callable[[str], dict[str, str]]:
    """The SHAPES adapters of a base checkpoint: shape name -> folder."""
    return lambda base: {name: make_lora(base, name, seed=i + 1, **SHAPES[name]) for i, name in enumerate(SHAPES)}
