"""The small routes: /health, /version, /v1/models, /tokenize, /detokenize, /metrics, /reset_prefix_cache."""

from __future__ import annotations

import loomserve


def test_health_and_version(http):
    assert http.get("/health").status_code == 200
    assert http.get("/version").json() == {"version": loomserve.__version__}


def test_models(http, client, model):
    body = http.get("/v1/models").json()
    assert body["object"] == "list"
    [card] = body["data"]
    assert card["id"] == model and card["object"] == "model" and card["owned_by"] == "loomserve"
    assert card["max_model_len"] == 1024  # the tiny checkpoint's max_position_embeddings
    assert [m.id for m in client.models.list()] == [model]


def test_tokenize_round_trip(http, model):
    text = "Hello, world! How are you doing today?"
    body = http.post("/tokenize", json={"model": model, "prompt": text}).json()
    assert body["count"] == len(body["tokens"]) > 1 and body["max_model_len"] == 1024
    assert http.post("/detokenize", json={"model": model, "tokens": body["tokens"]}).json() == {"prompt": text}


def test_tokenize_messages(http):
    messages = [{"role": "user", "content": "Hi"}]
    with_prompt = http.post("/tokenize", json={"messages": messages}).json()["tokens"]
    without = http.post("/tokenize", json={"messages": messages, "add_generation_prompt": False}).json()["tokens"]
    assert with_prompt[: len(without)] == without and len(with_prompt) > len(without)
    text = http.post("/detokenize", json={"tokens": with_prompt}).json()["prompt"]
    assert text == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"


def test_tokenize_needs_exactly_one_input(http):
    assert http.post("/tokenize", json={}).status_code == 400
    both = {"prompt": "a", "messages": [{"role": "user", "content": "a"}]}
    assert http.post("/tokenize", json=both).status_code == 400
    assert http.post("/detokenize", json={"tokens": [10**7]}).status_code == 400


def test_metrics_count_requests(server, http, client, model):
    counters = ("generation_tokens_total", "prompt_tokens_total", "e2e_request_latency_seconds_count",
                "time_to_first_token_seconds_count", "inter_token_latency_seconds_count")
    before = {name: server.metric(f"loomserve:{name}") for name in counters}
    lengths = server.metric("loomserve:request_success_total", finished_reason="length")
    client.completions.create(model=model, prompt="one two three", max_tokens=5, extra_body={"ignore_eos": True})
    grew = {name: server.metric(f"loomserve:{name}") - before[name] for name in counters}
    assert grew["generation_tokens_total"] == 5 and grew["prompt_tokens_total"] > 0
    assert grew["e2e_request_latency_seconds_count"] == grew["time_to_first_token_seconds_count"] == 1
    assert grew["inter_token_latency_seconds_count"] > 0
    assert server.metric("loomserve:request_success_total", finished_reason="length") == lengths + 1
    for name in ("loomserve:num_requests_waiting", "loomserve:prefix_cache_queries_total",
                 "loomserve:prefix_cache_hits_total", "loomserve:num_preemptions_total"):
        assert server.metric(name, model_name=model) >= 0
    assert server.metric("loomserve:num_requests_running") == 0
    assert server.metric("loomserve:kv_cache_usage_perc") == 0
    response = http.get("/metrics")
    assert response.headers["content-type"].startswith("text/plain")
    assert server.metric("loomserve:request_success_total", finished_reason="abort", model_name="tiny-qwen2") >= 0


def test_reset_prefix_cache_makes_the_next_identical_prompt_run_cold(client, http, model):
    prompt = "a prompt long enough to fill several KV blocks of the tiny model, " * 4

    def cached_tokens() -> int:
        usage = client.completions.create(model=model, prompt=prompt, max_tokens=1).usage
        return usage.prompt_tokens_details.cached_tokens

    cached_tokens()
    assert cached_tokens() > 0  # the same prompt again: a prefix-cache hit
    assert http.post("/reset_prefix_cache").status_code == 200
    assert cached_tokens() == 0
