"""`--api-server-count 2`: two API server processes share one listening socket and the same engines (here a chat
model over two data-parallel engines, with adapters, beside an embedding model). Every request is answered whichever
process takes it, adapters loaded or unloaded through one process hold at the other (even before the engines' table
reaches it), /metrics from either shows the whole server (an engine step's tokens counted once), engines and API
processes are named apart, and an API process that dies takes the whole group down.

Which process answered is the `server` header's last word (`uvicorn (loomserve api server I)`); a test reaches a
given process by opening connections until one lands there, then keeps that connection."""

from __future__ import annotations

import json
import os
import re
import signal
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing
from pathlib import Path

import httpx
import pytest

from loomserve.platform.engine_group import pid_alive
from loomserve.platform.process_name import API_PREFIX, ENGINE_PREFIX
from loomserve.testing.adapters import tiny_q_proj_lora
from loomserve.testing.pooling_checkpoints import tiny_decoder_embedder
from loomserve.testing.server import MODEL, Server

COUNT = 2
EMBEDDER = "tiny-embedder"
DASHBOARD = json.loads((Path(__file__).parent / "vllm_grafana_metrics.json").read_text())
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "Hello there"}], "max_tokens": 6, "temperature": 0}
COMPLETION = {"model": MODEL, "prompt": "one two three", "max_tokens": 6, "temperature": 0}
STEP_SERIES = ("loomserve:iteration_tokens_total_count", "loomserve:iteration_tokens_total_sum",
               "loomserve:prompt_tokens_total", "loomserve:generation_tokens_total")


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("api-servers-adapters")


@pytest.fixture(scope="module")
def server(start_server, adapter_dir) -> Iterator[Server]:
    flags = ["--api-server-count", str(COUNT), "--data-parallel-size", "2", "--enable-lora", "--max-lora-rank", "4",
             "--allowed-lora-paths", str(adapter_dir), "--metrics-compat", "vllm",
             "--embedding-model", f"{EMBEDDER}={tiny_decoder_embedder()}"]
    with pytest.MonkeyPatch.context() as env:
        env.setenv("LOOMSERVE_LOG_STATS_INTERVAL", "0.5")  # the server inherits it
        with start_server(*flags) as s:
            yield s


def answered_by(reply: httpx.Response) -> int:
    """The index of the API process that sent `reply`."""
    return int(reply.headers["server"].rstrip(")").rsplit(" ", 1)[1])


def process_client(server: Server, index: int, tries: int = 100) -> httpx.Client:
    """A client whose (kept-alive) connection API process `index` accepted; the caller closes it."""
    for _ in range(tries):
        client = httpx.Client(base_url=server.url, timeout=60)
        if answered_by(client.get("/health")) == index:
            return client
        client.close()
    raise AssertionError(f"no connection reached API process {index} in {tries} tries")


def from_each(server: Server, send: Callable[[httpx.Client], httpx.Response]) -> list[httpx.Response]:
    """`send` answered by each API process in turn."""
    replies = []
    for index in range(COUNT):
        with closing(process_client(server, index)) as client:
            reply = send(client)
        assert answered_by(reply) == index
        replies.append(reply)
    return replies


def test_fresh_connections_reach_every_api_process(server):
    seen = set()
    for _ in range(100):
        seen.add(answered_by(httpx.get(f"{server.url}/health")))
        if len(seen) == COUNT:
            return
    raise AssertionError(f"only API processes {seen} answered")


def test_chat_is_answered_alike_by_every_process(server):
    replies = from_each(server, lambda c: c.post("/v1/chat/completions", json=CHAT))
    assert all(r.status_code == 200 for r in replies)
    assert len({r.json()["choices"][0]["message"]["content"] for r in replies}) == 1  # greedy: one answer


def test_streamed_chat_is_well_formed_from_every_process(server):
    replies = from_each(server, lambda c: c.post("/v1/chat/completions", json={**CHAT, "stream": True}))
    texts = []
    for reply in replies:
        events = [line.removeprefix("data: ") for line in reply.text.splitlines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        chunks = [json.loads(event) for event in events[:-1]]
        assert chunks[-1]["choices"][0]["finish_reason"] == "length"
        texts.append("".join(chunk["choices"][0]["delta"].get("content") or "" for chunk in chunks))
    assert len(set(texts)) == 1


def test_completions_and_embeddings_are_answered_alike_by_every_process(server):
    completions = from_each(server, lambda c: c.post("/v1/completions", json=COMPLETION))
    assert len({r.json()["choices"][0]["text"] for r in completions}) == 1
    embeddings = from_each(server, lambda c: c.post("/v1/embeddings", json={"model": EMBEDDER, "input": "hi"}))
    first, second = (r.json()["data"][0]["embedding"] for r in embeddings)
    assert first == pytest.approx(second, abs=1e-6)


def test_an_adapter_loaded_through_one_process_serves_at_the_other_until_unloaded_there(server, adapter_dir):
    path = tiny_q_proj_lora(server.checkpoint, adapter_dir / "q", seed=1)
    ask = {**COMPLETION, "model": "q"}
    first, second = process_client(server, 0), process_client(server, 1)
    with closing(first), closing(second):
        base = first.post("/v1/completions", json=COMPLETION).json()["choices"][0]["text"]
        assert first.post("/v1/load_lora_adapter", json={"lora_name": "q", "lora_path": path}).status_code == 200
        again = second.post("/v1/load_lora_adapter", json={"lora_name": "q", "lora_path": path})
        assert again.status_code == 400 and "has already been loaded" in again.json()["error"]["message"]
        assert "q" in [card["id"] for card in second.get("/v1/models").json()["data"]]
        there, here = (c.post("/v1/completions", json=ask) for c in (second, first))
        assert there.status_code == 200 and there.json()["choices"][0]["text"] == here.json()["choices"][0]["text"]
        assert there.json()["choices"][0]["text"] != base  # the adapter changes the output
        assert second.post("/v1/unload_lora_adapter", json={"lora_name": "q"}).status_code == 200
        deadline = time.monotonic() + 5  # the engine's new table reaches the other process within milliseconds
        while first.post("/v1/completions", json=ask).status_code != 404:
            assert time.monotonic() < deadline, "the unloaded adapter still serves at the other process"
            time.sleep(0.05)
        assert first.post("/v1/unload_lora_adapter", json={"lora_name": "q"}).status_code == 404


def test_metrics_from_either_process_count_the_requests_of_both(server):
    def finished(client: httpx.Client) -> float:
        text = client.get("/metrics").text
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                   if line.startswith(f'loomserve:request_success_total{{engine="0",finished_reason="length",'
                                      f'model_name="{MODEL}"}}'))

    first, second = process_client(server, 0), process_client(server, 1)
    with closing(first), closing(second):
        before = finished(first)
        for client in (first, second):
            assert client.post("/v1/completions", json=COMPLETION).status_code == 200
        assert finished(first) == finished(second) == before + 2
        names = {line.split("{")[0].split(" ")[0] for line in second.get("/metrics").text.splitlines()}
        assert not [name for name in DASHBOARD["names"] if name not in names]


def test_the_stats_line_is_logged_by_one_process_only(server):
    assert re.search(r"\[api-0\] loomserve\.stats: " + MODEL, server.log_path.read_text())
    assert "[api-1] loomserve.stats" not in server.log_path.read_text()


def test_an_adapter_loaded_at_one_process_serves_at_the_other_before_the_table_reaches_it(server, adapter_dir):
    path = tiny_q_proj_lora(server.checkpoint, adapter_dir / "late", seed=2)
    first, second = process_client(server, 0), process_client(server, 1)
    with closing(first), closing(second), ThreadPoolExecutor(1) as pool:
        stopped = api_pid(server, 1)
        os.kill(stopped, signal.SIGSTOP)  # the engines' new adapter table waits, unread, at process 1
        try:
            assert first.post("/v1/load_lora_adapter", json={"lora_name": "late", "lora_path": path}).status_code == 200
            reply = pool.submit(second.post, "/v1/completions", json={**COMPLETION, "model": "late"})
            time.sleep(0.5)  # the request waits beside the table
        finally:
            os.kill(stopped, signal.SIGCONT)
        assert reply.result().status_code == 200
        assert second.post("/v1/unload_lora_adapter", json={"lora_name": "late"}).status_code == 200


def test_iteration_tokens_are_observed_once_per_engine_step_whichever_process_sent_the_requests(server):
    ask = {**COMPLETION, "prompt": " ".join(["alpha"] * 40), "max_tokens": 24, "ignore_eos": True}
    first, second = process_client(server, 0), process_client(server, 1)
    with closing(first), closing(second), ThreadPoolExecutor(2) as pool:
        for client in (first, second):  # each process routes the prompt to the idle first engine, and keeps it there
            assert client.post("/v1/completions", json={**ask, "max_tokens": 1}).status_code == 200
        before = [server.metric(name, model_name=MODEL) for name in STEP_SERIES]
        replies = list(pool.map(lambda client: client.post("/v1/completions", json=ask), (first, second)))
        grew = [server.metric(name, model_name=MODEL) - old for name, old in zip(STEP_SERIES, before)]
    assert [reply.status_code for reply in replies] == [200, 200]
    steps, tokens, prompt, generated = grew
    assert tokens == prompt + generated and generated == 48
    assert steps < 48  # the two requests shared steps: a step counts once, with both requests' tokens


def test_engine_pid_is_an_engine_and_the_api_processes_are_named_apart(server):
    api_pids = [api_pid(server, index) for index in range(COUNT)]
    assert [process_name(pid) for pid in api_pids] == [f"{API_PREFIX}{index}" for index in range(COUNT)]
    engine = server.engine_pid()
    assert engine not in api_pids and process_name(engine).startswith(ENGINE_PREFIX)


def test_a_killed_api_process_takes_the_whole_group_down(server):
    children = server_children(server)
    api_pids = [int(pid) for pid in re.findall(r"Started server process \[(\d+)\]", server.log_path.read_text())]
    assert len(api_pids) == COUNT and set(api_pids) <= set(children)
    os.kill(api_pids[1], signal.SIGKILL)
    assert server.process.wait(30) == 1
    errors = [line for line in server.log_path.read_text().splitlines() if line.startswith("loomserve: error:")]
    assert len(errors) == 1 and re.search(r"API server [01] exited \(killed by SIGKILL\): the server stops", errors[0])
    deadline = time.monotonic() + 10
    while any(pid_alive(pid) for pid in children) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [pid for pid in children if pid_alive(pid)]  # engines and the other API process: no orphans


def api_pid(server: Server, index: int) -> int:
    """The pid of API process `index`, found by its name."""
    (pid,) = [pid for pid in server_children(server) if process_name(pid) == f"{API_PREFIX}{index}"]
    return pid


def process_name(pid: int) -> str:
    return Path(f"/proc/{pid}/comm").read_text().strip()


def server_children(server: Server) -> list[int]:
    assert server.process is not None
    tasks = Path(f"/proc/{server.process.pid}/task").glob("*/children")
    return [int(pid) for task in tasks for pid in task.read_text().split()]
