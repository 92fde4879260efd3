"""The real all-MiniLM-L6-v2 through `LLM.embed` equals sentence-transformers, single texts and mixed batches.

Tolerances: cosine similarity >= 0.99999 and max abs difference <= 1e-5 per vector (fp32 on CPU; measured
differences are ~1e-7, from a different summation order in packed vs padded batches).
"""

from __future__ import annotations

import pytest
import torch

from loomserve import LLM, PoolingParams

TEXTS = [
    "hello world",
    "A man is eating food.",
    "The new movie is awesome and I would watch it again with my friends this weekend.",
    "",
    "Ünïcödé and emoji 🚀 survive tokenization",
    " ".join(["a longer passage about the history of embeddings, retrieval and search engines"] * 4),
]
COSINE_MIN = 0.99999
MAX_ABS = 1e-5


@pytest.fixture(scope="module")
def llm(minilm_path) -> LLM:
    return LLM(minilm_path)


@pytest.fixture(scope="module")
def reference(minilm_path):
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(minilm_path, device="cpu")
    return lambda texts: torch.from_numpy(model.encode(texts, batch_size=4))


def assert_same_vectors(got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.shape == want.shape
    assert torch.nn.functional.cosine_similarity(got, want, dim=-1).min() >= COSINE_MIN
    assert (got - want).abs().max() <= MAX_ABS


def vectors(outputs) -> torch.Tensor:
    return torch.tensor([o.outputs.embedding for o in outputs])


def test_checkpoint_defaults_are_read_from_sentence_transformers_files(llm):
    config = llm.config.model_config
    assert (config.task, config.encoder_only, config.max_model_len) == ("embed", True, 256)  # max_seq_length 256
    assert (config.pooler_config.pooling_type, config.pooler_config.normalize) == ("MEAN", True)


@pytest.mark.parametrize("text", ["hello world", TEXTS[2]])
def test_single_text_equals_sentence_transformers(llm, reference, text):
    [out] = llm.embed(text)
    assert len(out.outputs.embedding) == 384 == out.outputs.hidden_size
    assert_same_vectors(vectors([out]), reference([text]))


def test_hello_world_matches_the_published_first_dimensions(llm):
    first = llm.embed("hello world")[0].outputs.embedding[:5]
    assert first == pytest.approx([-0.034477, 0.031023, 0.006735, 0.026109, -0.039362], abs=1e-6)


def test_mixed_length_batch_equals_sentence_transformers(llm, reference):
    outputs = llm.embed(TEXTS)
    assert [o.prompt_token_ids for o in outputs] == [llm.get_tokenizer().encode(t) for t in TEXTS]
    assert_same_vectors(vectors(outputs), reference(TEXTS))


def test_batched_equals_unbatched(llm):
    batched = vectors(llm.embed(TEXTS))
    alone = torch.cat([vectors(llm.embed(t)) for t in TEXTS])
    assert (batched - alone).abs().max() <= 1e-6


def test_token_ids_embed_like_their_text(llm):
    ids = llm.get_tokenizer().encode(TEXTS[1])
    by_ids, by_dict = llm.embed([ids, {"prompt_token_ids": ids}])
    assert by_ids.outputs.embedding == by_dict.outputs.embedding == llm.embed(TEXTS[1])[0].outputs.embedding


def test_texts_tokenize_as_transformers_tokenizes_them_before_and_after_a_truncated_call(llm):
    tokenizer = llm.get_tokenizer()
    want = tokenizer(TEXTS)["input_ids"]
    assert [o.prompt_token_ids for o in llm.embed(TEXTS)] == want
    llm.embed(TEXTS[-1], truncate_prompt_tokens=8)  # leaves truncation set on the Rust tokenizer
    assert [o.prompt_token_ids for o in llm.embed(TEXTS)] == want


def test_over_long_input_is_refused_unless_truncated(llm, reference):
    text = "many words " * 200  # ~400 tokens: more than max_seq_length 256
    with pytest.raises(ValueError, match="maximum context length is 256 tokens"):
        llm.embed(text)
    truncated = llm.embed(text, truncate_prompt_tokens=-1)[0]
    assert len(truncated.prompt_token_ids) == 256
    assert_same_vectors(vectors([truncated]), reference([text]))  # sentence-transformers truncates at 256 too


def test_dimensions_are_refused_for_a_model_without_matryoshka_training(llm):
    with pytest.raises(ValueError, match="does not support matryoshka"):
        llm.embed("hello", PoolingParams(dimensions=128))


def test_a_pooling_model_cannot_generate(llm):
    with pytest.raises(ValueError, match="cannot generate"):
        llm.generate("hello")
