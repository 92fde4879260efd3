"""vLLM's server options on one server started with all of them, listening on a Unix socket (--uds): the key from
LOOMSERVE_API_KEY, --root-path,
--enable-force-include-usage, usage without prompt_tokens_details by default, --enable-request-id-headers, ORCA
load headers, --enable-tokenizer-info-endpoint, --enable-server-load-tracking and --shutdown-timeout (last: it
stops the server)."""

from __future__ import annotations

import json
import os
import signal
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import openai
import pytest

from loomserve.testing.server import MODEL, Server

KEY = "from-the-environment"
ROOT = "/llm"
AUTH = {"Authorization": f"Bearer {KEY}"}
MESSAGES = [{"role": "user", "content": "Hello there"}]


@dataclass
class UnixSocketServer(Server):
    """A server on a Unix domain socket: --uds, and clients that connect there."""

    socket_path: str = ""

    def http(self, headers: dict[str, str] | None = None) -> httpx.Client:
        return httpx.Client(transport=httpx.HTTPTransport(uds=self.socket_path), base_url="http://uds",
                            timeout=60, headers=headers)

    def client(self, api_key: str = KEY) -> openai.OpenAI:
        return openai.OpenAI(base_url="http://uds/v1", api_key=api_key, max_retries=0,
                             http_client=self.http())

    def _healthy(self) -> bool:
        try:
            with self.http() as c:
                return c.get("/health").status_code == 200
        except httpx.HTTPError:
            return False


@pytest.fixture(scope="module")
def server(qwen2_checkpoint, tmp_path_factory) -> Iterator[Server]:
    folder = tmp_path_factory.mktemp("uds")
    flags = ["--served-model-name", MODEL, "--kv-cache-memory", "16MiB", "--uds", str(folder / "loomserve.sock"),
             "--root-path", ROOT, "--enable-force-include-usage", "--enable-request-id-headers",
             "--enable-tokenizer-info-endpoint", "--enable-server-load-tracking", "--shutdown-timeout", "60"]
    s = UnixSocketServer(qwen2_checkpoint, flags, folder / "server.log", socket_path=str(folder / "loomserve.sock"))
    with pytest.MonkeyPatch.context() as env:
        env.setenv("LOOMSERVE_API_KEY", KEY)  # the server process inherits it
        with s.running():
            yield s


@pytest.fixture(scope="module")
def http(server) -> Iterator[httpx.Client]:
    with server.http(AUTH) as c:
        yield c


def chat(http: httpx.Client, model: str, headers: dict[str, str] | None = None) -> httpx.Response:
    body = {"model": model, "messages": MESSAGES, "max_tokens": 3}
    return http.post("/v1/chat/completions", json=body, headers=headers)


def test_the_server_listens_on_the_unix_socket_only(server):
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{server.url}/health")


def test_the_key_comes_from_the_environment(server, http):
    with server.http() as keyless:
        refused = keyless.get("/v1/models", headers={"X-Request-Id": "no-key"})
        assert (refused.status_code, refused.headers["x-request-id"]) == (401, "no-key")  # refusals carry it too
    assert http.get("/v1/models").status_code == 200


def test_routes_answer_with_and_without_the_root_path(http):
    assert http.get(f"{ROOT}/v1/models").json() == http.get("/v1/models").json()


def test_usage_has_no_prompt_tokens_details_unless_enabled(http, model):
    usage = chat(http, model).json()["usage"]
    assert usage["prompt_tokens_details"] is None and usage["total_tokens"] > 0


def test_forced_usage_ends_a_stream_that_did_not_ask_for_it(server, model):
    chunks = list(server.client().chat.completions.create(
        model=model, messages=MESSAGES, max_tokens=3, stream=True, extra_body={"ignore_eos": True}))
    assert all(c.usage is None for c in chunks[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 3


def test_request_id_header_is_echoed_or_made(http, model):
    assert chat(http, model, headers={"X-Request-Id": "my-id-42"}).headers["x-request-id"] == "my-id-42"
    first, second = chat(http, model).headers["x-request-id"], chat(http, model).headers["x-request-id"]
    assert len(first) == 32 and first != second
    body = {"model": model, "prompt": "hi", "max_tokens": 2, "stream": True}
    with http.stream("POST", "/v1/completions", json=body, headers={"X-Request-Id": "streamed"}) as response:
        assert response.headers["x-request-id"] == "streamed"


def load_report(http: httpx.Client, model: str, kind: str | None) -> str | None:
    headers = {"endpoint-load-metrics-format": kind} if kind else None
    return chat(http, model, headers).headers.get("endpoint-load-metrics")


def test_orca_load_report_in_the_format_asked(http, model):
    as_text = load_report(http, model, "text")
    assert as_text.startswith("TEXT named_metrics.kv_cache_usage_perc=")
    assert "named_metrics.num_requests_waiting=" in as_text
    kind, _, body = load_report(http, model, "JSON").partition(" ")
    assert kind == "JSON" and set(json.loads(body)["named_metrics"]) == {"kv_cache_usage_perc", "num_requests_waiting"}
    assert load_report(http, model, None) is None and load_report(http, model, "bin") is None


def test_tokenizer_info_says_the_tokenizer_config(http):
    info = http.get("/tokenizer_info").json()
    assert isinstance(info["tokenizer_class"], str) and isinstance(info["eos_token"], str)
    assert "<|im_start|>" in info["chat_template"]
    token = next(iter(info["added_tokens_decoder"].values()))
    assert {"content", "special"} <= set(token)
    assert all(key.isdigit() for key in info["added_tokens_decoder"])
    assert "name_or_path" not in info and "vocab_file" not in info  # no server paths


def test_load_counts_requests_being_answered(server, http, model):
    assert http.get("/load").json() == {"server_load": 0}
    body = {"model": model, "prompt": "hi", "max_tokens": 1000, "ignore_eos": True}

    def answer() -> None:
        with server.http(AUTH) as client:
            client.post("/v1/completions", json=body)

    answering = threading.Thread(target=answer)
    answering.start()
    loads = set()
    while answering.is_alive():  # the request is in flight for as long as its 1,000 tokens take
        loads.add(http.get("/load").json()["server_load"])
    answering.join()
    assert 1 in loads and loads <= {0, 1}
    assert http.get("/load").json() == {"server_load": 0}


def test_shutdown_timeout_lets_a_running_stream_finish(server, http, model):
    """Run last: it stops the server."""
    body = {"model": model, "prompt": "hi", "max_tokens": 60, "stream": True, "ignore_eos": True,
            "stream_options": {"include_usage": True}}
    lines: list[str] = []
    started = threading.Event()

    def read() -> None:
        with http.stream("POST", "/v1/completions", json=body) as response:
            for line in response.iter_lines():
                if line:
                    lines.append(line)
                    started.set()

    reader = threading.Thread(target=read)
    reader.start()
    assert started.wait(60)
    os.kill(server.process.pid, signal.SIGINT)
    reader.join(120)
    assert lines[-1] == "data: [DONE]"
    assert json.loads(lines[-2].removeprefix("data: "))["usage"]["completion_tokens"] == 60
    assert server.process.wait(60) is not None
