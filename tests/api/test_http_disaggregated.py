"""Disaggregated prefill/decode over real HTTP on loopback: a prefill instance, a decode instance and
`loomserve proxy` give what one colocated engine gives under greedy decoding, whole and streamed, over TCP and
through shared memory; the prefill instance frees the blocks it held once fetched, or after its timeout; a decode
instance that dies fails the requests in flight cleanly, and once restarted serves the later ones."""

from __future__ import annotations

import concurrent.futures
import json
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from loomserve import LLM, SamplingParams
from loomserve.testing.server import MODEL, Server

PROMPTS = ["the cat sat on the mat and then it walked far away over the hills", "hello world, said the"]
MAX_TOKENS = 12
GREEDY_BODY = {"model": MODEL, "max_tokens": MAX_TOKENS, "temperature": 0.0, "ignore_eos": True}
PRODUCER = ('{"kv_connector": "TcpConnector", "kv_role": "kv_producer", '
            '"kv_connector_extra_config": {"abort_timeout_s": 10}}')
CONSUMER = '{"kv_connector": "TcpConnector", "kv_role": "kv_consumer"}'


def _start_pd(checkpoint: str, logs: Path, producer: str, consumer: str) -> Iterator[tuple[Server, Server, Server]]:
    """(prefill, decode, proxy), each in its own process, started side by side."""
    prefill, decode = (
        Server(checkpoint, ["--served-model-name", MODEL, "--kv-cache-memory", "16MiB", "--block-size", "4",
                            "--kv-transfer-config", config], logs / f"{name}.log")
        for name, config in (("prefill", producer), ("decode", consumer))
    )
    proxy = Server(None, ["--prefill", prefill.url, "--decode", decode.url], logs / "proxy.log", subcommand="proxy")
    servers = (prefill, decode, proxy)
    try:
        with concurrent.futures.ThreadPoolExecutor(len(servers)) as pool:
            list(pool.map(Server.start, servers))
        yield servers
    finally:
        for server in servers:
            server.stop()


@pytest.fixture(scope="module")
def instances(qwen2_checkpoint, tmp_path_factory) -> Iterator[tuple[Server, Server, Server]]:
    yield from _start_pd(qwen2_checkpoint, tmp_path_factory.mktemp("pd"), PRODUCER, CONSUMER)


@pytest.fixture(scope="module")
def shared_memory_dir(tmp_path_factory) -> Path:
    """The directory the shared-memory instances share (/dev/shm by default; a fresh one here, to look into)."""
    return tmp_path_factory.mktemp("shm")


@pytest.fixture(scope="module")
def shm_instances(qwen2_checkpoint, tmp_path_factory, shared_memory_dir) -> Iterator[tuple[Server, Server, Server]]:
    """(prefill, decode, proxy) moving KV through shared memory."""
    extra = {"shared_storage_path": str(shared_memory_dir)}
    producer, consumer = (json.dumps({"kv_connector": "SharedMemoryConnector", "kv_role": role,
                                      "kv_connector_extra_config": extra}) for role in ("kv_producer", "kv_consumer"))
    yield from _start_pd(qwen2_checkpoint, tmp_path_factory.mktemp("pd-shm"), producer, consumer)


@pytest.fixture(scope="module")
def colocated(qwen2_checkpoint) -> list[str]:
    """What one engine answers to PROMPTS."""
    llm = LLM(qwen2_checkpoint, block_size=4, kv_cache_memory="16MiB")
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
    return [o.outputs[0].text for o in llm.generate(PROMPTS, params)]


def _stream_text(http: httpx.Client, body: dict) -> str:
    text = []
    with http.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                text.append(json.loads(line[6:])["choices"][0]["text"])
    return "".join(text)


def _prefill_blocks_in_use(prefill: Server) -> float:
    return prefill.metric("loomserve:kv_cache_usage_perc")


def _eventually(check, timeout_s: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.2)
    return False


def test_completions_through_the_proxy_equal_one_colocated_engine(instances, colocated):
    prefill, decode, proxy = instances
    with proxy.http() as http:
        texts = [http.post("/v1/completions", json={**GREEDY_BODY, "prompt": p}).json()["choices"][0]["text"]
                 for p in PROMPTS]
    assert texts == colocated
    assert decode.metric("loomserve:prefix_cache_hits_total") > 0  # the decode instance started from fetched KV
    assert _eventually(lambda: _prefill_blocks_in_use(prefill) == 0)  # fetched: the prefill instance let go


def test_streamed_completions_through_the_proxy_equal_one_colocated_engine(instances, colocated):
    prefill, _, proxy = instances
    with proxy.http() as http:
        assert [_stream_text(http, {**GREEDY_BODY, "prompt": p}) for p in PROMPTS] == colocated
    # The decode instance had these prompts cached already, yet told the prefill instance to let go (long before
    # its 10 s timeout).
    assert _eventually(lambda: _prefill_blocks_in_use(prefill) == 0, timeout_s=5)


def test_chat_through_the_proxy_is_answered_by_the_decode_instance(instances):
    _, _, proxy = instances
    body = {**GREEDY_BODY, "messages": [{"role": "user", "content": PROMPTS[0]}]}
    with proxy.http() as http:
        r = http.post("/v1/chat/completions", json=body)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == MAX_TOKENS


def test_bad_input_is_refused_by_the_prefill_instance_with_its_error(instances):
    _, _, proxy = instances
    with proxy.http() as http:
        r = http.post("/v1/completions", json={**GREEDY_BODY, "prompt": "hi", "temperature": -1})
    assert r.status_code == 400 and "temperature" in r.json()["error"]["message"]


def test_a_decode_restart_fails_requests_in_flight_cleanly_and_serves_later_ones(instances, colocated):
    prefill, decode, proxy = instances
    long_body = {**GREEDY_BODY, "prompt": PROMPTS[0], "max_tokens": 900}
    with proxy.http() as http, concurrent.futures.ThreadPoolExecutor(1) as pool:
        whole = pool.submit(http.post, "/v1/completions", json=long_body)
        events = []
        with http.stream("POST", "/v1/completions", json={**long_body, "stream": True}) as r:
            lines = r.iter_lines()
            events.append(next(lines))  # the stream has started on the decode instance
            decode._signal_group(signal.SIGKILL)  # the server and its engine, at once
            events += [e for e in lines if e]
        assert whole.result().status_code == 502
    assert any('"error"' in e for e in events) and events[-1] == "data: [DONE]"
    assert _eventually(lambda: _prefill_blocks_in_use(prefill) == 0, timeout_s=30)  # unfetched: freed at timeout
    decode.start()
    with proxy.http() as http:
        r = http.post("/v1/completions", json={**GREEDY_BODY, "prompt": PROMPTS[1]})
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == colocated[1]


def test_through_shared_memory_whole_and_streamed_completions_equal_one_colocated_engine(
    shm_instances, colocated, shared_memory_dir
):
    prefill, decode, proxy = shm_instances
    with proxy.http() as http:
        texts = [http.post("/v1/completions", json={**GREEDY_BODY, "prompt": p}).json()["choices"][0]["text"]
                 for p in PROMPTS]
        streamed = [_stream_text(http, {**GREEDY_BODY, "prompt": p}) for p in reversed(PROMPTS)]
    assert texts == colocated and streamed == colocated[::-1]
    assert decode.metric("loomserve:prefix_cache_hits_total") > 0  # the decode instance started from the KV read
    assert _eventually(lambda: _prefill_blocks_in_use(prefill) == 0)  # written out: the prefill instance let go
    kv_files = [p for p in shared_memory_dir.iterdir() if not p.name.endswith(".lock")]  # the producer's lock stays
    assert kv_files == []  # every KV file was read and removed by the decode instance
