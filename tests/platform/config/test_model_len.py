"""--max-model-len reads vLLM's human-readable forms."""

from __future__ import annotations

import pytest

from loomserve.platform.config.model import parse_model_len


@pytest.mark.parametrize(("value", "length"), [(8192, 8192), ("8192", 8192), ("8k", 8000), ("8K", 8192),
                                               ("1.5k", 1500), ("1m", 1_000_000), ("1M", 2**20), ("auto", None),
                                               (-1, None), (None, None)])
def test_a_context_length_reads_as_vllm_reads_it(value, length):
    assert parse_model_len(value) == length


def test_a_length_that_is_not_one_is_refused():
    with pytest.raises(ValueError, match="cannot read a context length"):
        parse_model_len("eight")
