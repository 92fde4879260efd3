"""A Qwen3-Embedding-style decoder embedder equals transformers' last-token hidden state, normalized, and
sentence-transformers with its prompts; chunked prefill and prefix-cache hits leave the vectors unchanged."""

from __future__ import annotations

import functools

import pytest
import torch
from transformers import AutoModel, AutoTokenizer

from loomserve import LLM, PoolingParams
from loomserve.testing.pooling_checkpoints import DECODER_PROMPTS

TEXTS = [
    "hello world",
    "the cat sat on the mat and then it",
    "café naïve 日本語 and some more words so that this prompt crosses several blocks of the cache",
]


@functools.cache
def hidden_states(path: str, text: str) -> torch.Tensor:
    """transformers' last hidden state of `text`, [n, hidden]."""
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path, dtype=torch.float32)
    return model(**tokenizer(text, return_tensors="pt")).last_hidden_state[0].detach()


def last_token(path: str, text: str) -> torch.Tensor:
    return torch.nn.functional.normalize(hidden_states(path, text)[-1], dim=-1)


def vectors(outputs) -> torch.Tensor:
    return torch.tensor([o.outputs.embedding for o in outputs])


@pytest.fixture(scope="module")
def llm(decoder_embedder_path) -> LLM:
    return LLM(decoder_embedder_path, block_size=4, kv_cache_memory="8MiB")


def test_last_token_state_normalized_equals_transformers(llm, decoder_embedder_path):
    config = llm.config.model_config
    assert (config.task, config.encoder_only, config.pooler_config.pooling_type) == ("embed", False, "LAST")
    want = torch.stack([last_token(decoder_embedder_path, t) for t in TEXTS])
    assert torch.allclose(vectors(llm.embed(TEXTS)), want, atol=1e-5)


def test_query_prompt_equals_sentence_transformers(llm, decoder_embedder_path):
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(decoder_embedder_path, device="cpu")
    want = torch.from_numpy(model.encode(TEXTS, prompt_name="query"))
    got = vectors(llm.embed(TEXTS, prompt_name="query"))
    assert torch.allclose(got, want, atol=1e-5)
    assert torch.allclose(got[0], last_token(decoder_embedder_path, DECODER_PROMPTS["query"] + TEXTS[0]), atol=1e-5)


def test_chunked_prefill_gives_the_same_vectors(decoder_embedder_path):
    small_steps = LLM(decoder_embedder_path, block_size=4, kv_cache_memory="8MiB", max_num_batched_tokens=5)
    want = torch.stack([last_token(decoder_embedder_path, t) for t in TEXTS])
    assert torch.allclose(vectors(small_steps.embed(TEXTS)), want, atol=1e-5)


def test_prefix_cache_hits_give_the_same_vectors(decoder_embedder_path):
    llm = LLM(decoder_embedder_path, block_size=4, kv_cache_memory="8MiB")
    first = llm.embed(TEXTS[2])[0]
    again = llm.embed(TEXTS[2])[0]
    assert first.num_cached_tokens == 0 and again.num_cached_tokens >= 16
    assert torch.allclose(vectors([again]), last_token(decoder_embedder_path, TEXTS[2])[None], atol=1e-5)


def test_mean_pooling_skips_the_prefix_cache(decoder_embedder_path):
    llm = LLM(decoder_embedder_path, block_size=4, kv_cache_memory="8MiB", pooler_config={"pooling_type": "MEAN"})
    llm.embed(TEXTS[2])
    again = llm.embed(TEXTS[2])[0]
    assert again.num_cached_tokens == 0
    want = torch.nn.functional.normalize(hidden_states(decoder_embedder_path, TEXTS[2]).mean(0), dim=-1)
    assert torch.allclose(vectors([again])[0], want, atol=1e-5)


def test_matryoshka_dimensions_truncate_then_normalize(llm, decoder_embedder_path):
    [out] = llm.embed(TEXTS[1], PoolingParams(dimensions=16))
    full = hidden_states(decoder_embedder_path, TEXTS[1])[-1]
    assert torch.allclose(torch.tensor(out.outputs.embedding), torch.nn.functional.normalize(full[:16], dim=-1),
                          atol=1e-5)
    with pytest.raises(ValueError, match="dimensions 20 is not supported; this model supports 16, 32, 64"):
        llm.embed(TEXTS[1], PoolingParams(dimensions=20))


def test_empty_text_cannot_be_embedded_without_a_bos_token(llm):
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        llm.embed(["fine", ""])
