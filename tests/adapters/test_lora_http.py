"""Adapters over HTTP: start-up adapters, run-time load and unload, every refusal, and requests that keep
running while adapters come and go, beside an embedding model served by the same server. A real server
(`python -m loomserve.api.cli serve`) on loopback."""

from __future__ import annotations

import json
import shutil
import tempfile
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest
from peft_reference import PROMPTS, SHAPES, peft_greedy, tokenizer
from safetensors.torch import load_file, save_file

from loomserve.api.lora_paths import NO_ADAPTER
from loomserve.testing.pooling_checkpoints import tiny_decoder_embedder
from loomserve.testing.server import MODEL, Server

BASE = MODEL  # the name the server gives `base`
EMBEDDER = "tiny-embedder"  # a second model of the server, with an engine of its own


@pytest.fixture(scope="module")
def base(qwen2_checkpoint) -> str:
    return qwen2_checkpoint


@pytest.fixture(scope="module")
def adapters(base, make_lora) -> dict[str, str]:
    made = {name: make_lora(base, name, seed=i + 1, **SHAPES[name]) for i, name in enumerate(SHAPES)}
    made["rank32"] = make_lora(base, "rank32", seed=9, r=32, target_modules=["q_proj"])
    made["dora"] = make_lora(base, "dora", seed=10, r=4, target_modules=["q_proj"], use_dora=True)
    return made


@pytest.fixture(scope="module")
def server(start_server, adapters, tmp_path_factory) -> Iterator[Server]:
    flags = [
        "--enable-lora", "--max-loras", "2", "--max-cpu-loras", "2", "--max-lora-rank", "16",
        "--allowed-lora-paths", str(tmp_path_factory.getbasetemp()),  # the made adapters and each test's tmp_path
        "--lora-modules", f"qv={adapters['qv-r8']}", json.dumps({"name": "all", "path": adapters["all-r16"]}),
        "--embedding-model", f"{EMBEDDER}={tiny_decoder_embedder()}",
    ]
    with start_server(*flags) as s:
        yield s


def complete(client: openai.OpenAI, model: str, prompt: str = PROMPTS[1], max_tokens: int = 12):
    return client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens, temperature=0.0,
                                     extra_body={"ignore_eos": True})


def expected_text(base: str, adapter: str | None, prompt: str = PROMPTS[1], max_tokens: int = 12) -> str:
    ids = peft_greedy(base, adapter, (prompt,), max_tokens)[0]
    return tokenizer(base).decode(ids, skip_special_tokens=True)


def load(http: httpx.Client, name: str, path: str, **extra) -> httpx.Response:
    return http.post("/v1/load_lora_adapter", json={"lora_name": name, "lora_path": path, **extra})


def unload(http: httpx.Client, name: str) -> httpx.Response:
    return http.post("/v1/unload_lora_adapter", json={"lora_name": name})


def models(http: httpx.Client) -> dict[str, dict]:
    return {card["id"]: card for card in http.get("/v1/models").json()["data"]}


def test_models_lists_start_up_adapters_with_their_parent(http, adapters):
    cards = models(http)
    assert cards["qv"]["parent"] == cards["all"]["parent"] == BASE and cards[BASE]["parent"] is None
    assert cards["qv"]["root"] == "qv"  # not the adapter's folder: /v1/models shows no server paths
    assert adapters["qv-r8"] not in json.dumps(cards)
    assert cards[EMBEDDER]["parent"] is None


def test_adapters_and_an_embedding_model_share_the_server(http, client, adapters):
    assert len(client.embeddings.create(model=EMBEDDER, input=["hello"]).data[0].embedding) > 0
    with pytest.raises(openai.BadRequestError, match=f"`qv` does not support /v1/embeddings.*can: {EMBEDDER}"):
        client.embeddings.create(model="qv", input=["hello"])
    reply = load(http, EMBEDDER, adapters["rslora"])
    assert reply.status_code == 400 and "another model served here" in reply.json()["error"]["message"]


def test_the_model_field_picks_the_adapter(client, base, adapters):
    for name, path in [("qv", adapters["qv-r8"]), ("all", adapters["all-r16"]), (BASE, None)]:
        reply = complete(client, name)
        assert reply.model == name
        assert reply.choices[0].text == expected_text(base, path), name
    chat = client.chat.completions.create(model="all", messages=[{"role": "user", "content": "Hi"}], max_tokens=4)
    assert chat.model == "all" and chat.choices[0].finish_reason in ("stop", "length")
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        complete(client, "nobody")


def test_runtime_load_serves_and_unload_stops_new_requests(http, client, base, adapters):
    assert load(http, "rs", adapters["rslora"]).status_code == 200
    assert models(http)["rs"]["parent"] == BASE
    assert complete(client, "rs").choices[0].text == expected_text(base, adapters["rslora"])
    assert unload(http, "rs").status_code == 200
    assert "rs" not in models(http)
    with pytest.raises(openai.NotFoundError):
        complete(client, "rs")
    reply = unload(http, "rs")
    assert reply.status_code == 404 and "The lora adapter 'rs' cannot be found." in reply.json()["error"]["message"]


def test_load_inplace_replaces_a_loaded_adapter_under_its_name(http, client, base, adapters):
    assert load(http, "swap", adapters["rslora"]).status_code == 200
    again = load(http, "swap", adapters["qv-r8"])
    assert again.status_code == 400 and "set 'load_inplace' to True" in again.json()["error"]["message"]
    assert complete(client, "swap").choices[0].text == expected_text(base, adapters["rslora"])
    assert load(http, "swap", adapters["qv-r8"], load_inplace=True).status_code == 200
    assert complete(client, "swap").choices[0].text == expected_text(base, adapters["qv-r8"])
    assert list(models(http)).count("swap") == 1
    assert unload(http, "swap").status_code == 200


def test_a_path_without_an_adapter_answers_404(http, tmp_path):
    reply = load(http, "x0", str(tmp_path / "nowhere"))
    assert (reply.status_code, reply.json()["error"]["message"]) == (404, NO_ADAPTER)


def test_load_errors_answer_400_with_the_reason(http, base, adapters, tmp_path):
    bad_json = tmp_path / "bad-json"
    shutil.copytree(adapters["qv-r8"], bad_json)
    (bad_json / "adapter_config.json").write_text("{oops")
    big_config = shutil.copytree(adapters["qv-r8"], tmp_path / "big-config")  # vLLM's case: only the config says so
    config = json.loads((big_config / "adapter_config.json").read_text())
    (big_config / "adapter_config.json").write_text(json.dumps({**config, "r": 1024}))
    other_model = tmp_path / "other-model"  # made for a model with more layers
    shutil.copytree(adapters["qv-r8"], other_model)
    tensors = load_file(other_model / "adapter_model.safetensors")
    save_file({k.replace("layers.1.", "layers.5."): v for k, v in tensors.items()},
              other_model / "adapter_model.safetensors")
    cases = {
        "unreadable": (load(http, "x2", str(bad_json)), "cannot read"),
        "duplicate name": (load(http, "qv", adapters["rslora"]), "has already been loaded"),
        "base name": (load(http, BASE, adapters["rslora"]), "base model's name"),
        "rank over limit": (load(http, "x3", adapters["rank32"]), "LoRA rank 32 is greater than max_lora_rank 16"),
        "config rank over limit": (load(http, "x6", str(big_config)), "LoRA rank 1024 is greater than max_lora_rank"),
        "missing target": (load(http, "x4", str(other_model)), "which this model does not have"),
        "DoRA": (load(http, "x5", adapters["dora"]), "DoRA"),
    }
    for case, (reply, reason) in cases.items():
        assert reply.status_code == 400, case
        assert reason in reply.json()["error"]["message"], (case, reply.json())
    assert set(models(http)) == {BASE, "qv", "all", EMBEDDER}
    assert load(http, "x1", adapters["rslora"]).status_code == 200  # a failed load left the name free
    assert unload(http, "x1").status_code == 200


def test_adapter_path_errors_do_not_tell_whether_a_path_exists(http, adapters, tmp_path):
    (tmp_path / "empty").mkdir()
    outside = shutil.copytree(adapters["qv-r8"], Path(tempfile.mkdtemp()) / "outside")  # a real adapter, not allowed
    try:
        paths = [str(tmp_path / "nowhere"), str(tmp_path / "empty"), "/etc", "/nonexistent/x", str(outside),
                 str(tmp_path / ".." / ".." / "..")]
        replies = [load(http, "probe", path) for path in paths]
    finally:
        shutil.rmtree(outside.parent)
    assert {(r.status_code, r.json()["error"]["message"]) for r in replies} == {(404, NO_ADAPTER)}


def test_an_adapter_whose_folder_vanished_answers_404_and_leaves_the_listing(http, client, adapters, tmp_path):
    folder = shutil.copytree(adapters["rslora"], tmp_path / "soon-gone")
    assert load(http, "gone", str(folder)).status_code == 200
    shutil.rmtree(folder)
    with pytest.raises(openai.NotFoundError, match="its files are gone from the server"):
        complete(client, "gone")
    assert "gone" not in models(http)
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        complete(client, "gone")


def test_requests_run_on_while_one_adapter_loads_and_another_unloads(http, client, base, adapters):
    """A stream of adapter `s` keeps going, and ends right, while `t` loads and `s` itself is unloaded."""
    assert load(http, "s", adapters["rslora"]).status_code == 200
    started = threading.Event()

    def stream() -> str:
        chunks = client.completions.create(model="s", prompt=PROMPTS[0], max_tokens=300, temperature=0.0,
                                           stream=True, extra_body={"ignore_eos": True})
        text = ""
        for chunk in chunks:
            text += chunk.choices[0].text if chunk.choices else ""
            started.set()
        return text

    with ThreadPoolExecutor(2) as pool:
        running = pool.submit(stream)
        assert started.wait(60)
        assert load(http, "t", adapters["qv-r8"]).status_code == 200
        other = pool.submit(complete, client, "t", PROMPTS[2])
        assert unload(http, "s").status_code == 200
        with pytest.raises(openai.NotFoundError):
            complete(client, "s")
        assert not running.done()  # the unload did not wait for the stream
        assert running.result() == expected_text(base, adapters["rslora"], PROMPTS[0], 300)
        assert other.result().choices[0].text == expected_text(base, adapters["qv-r8"], PROMPTS[2])
    assert unload(http, "t").status_code == 200


def test_lora_module_flag_forms(tmp_path):
    from loomserve.api.frontend_flags import lora_module

    (tmp_path / "adapter_config.json").write_text("{}")
    assert lora_module(f"a={tmp_path}") == ("a", str(tmp_path))
    assert lora_module(json.dumps({"name": "b", "path": str(tmp_path), "base_model_name": "m"})) == ("b", str(tmp_path))
    for bad in ("noequals", "=path", '{"name": "c"}'):
        with pytest.raises(Exception, match="expected"):
            lora_module(bad)
    with pytest.raises(Exception, match="no adapter folder"):
        lora_module("a=/x/y")
