"""Data parallelism over real HTTP: a server of two engine replicas per model (`--data-parallel-size 2`) answers
chat, LoRA completions (start-up and run-time adapters, which every replica loads) and embeddings with what one
engine computes, under concurrent requests spread over both replicas."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import torch

from loomserve import LLM, SamplingParams
from loomserve.testing.pooling_checkpoints import tiny_decoder_embedder
from loomserve.testing.server import MODEL, Server

sys.path.insert(0, str(Path(__file__).parents[1] / "adapters"))
from peft_reference import PROMPTS, SHAPES, make_adapter, peft_greedy, tokenizer  # noqa: E402

EMBEDDER = "tiny-embedder"
TEXTS = ["hello world", "the cat sat on the mat", "a", "café naïve 日本語 and some more words"]
CHAT = [[{"role": "user", "content": text}] for text in TEXTS]
MAX_TOKENS = 8


@pytest.fixture(scope="module")
def adapters(qwen2_checkpoint, tmp_path_factory) -> dict[str, str]:
    folder = tmp_path_factory.mktemp("dp-adapters")
    return {name: make_adapter(qwen2_checkpoint, folder / name, i + 1, **SHAPES[name])
            for i, name in enumerate(("qv-r8", "all-r16"))}


@pytest.fixture(scope="module")
def server(start_server, adapters) -> Iterator[Server]:
    flags = ["--data-parallel-size", "2", "--enable-lora", "--max-lora-rank", "16",
             "--lora-modules", f"qv={adapters['qv-r8']}", "--allowed-lora-paths", str(Path(adapters["all-r16"]).parent),
             "--embedding-model", f"{EMBEDDER}={tiny_decoder_embedder()}"]
    with start_server(*flags) as s:
        yield s


def in_parallel(fn, items) -> list:
    with ThreadPoolExecutor(len(items)) as pool:
        return list(pool.map(fn, items))


def test_chat_equals_one_engine(client, qwen2_checkpoint) -> None:
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
    expected = [o.outputs[0].text for o in LLM(qwen2_checkpoint, kv_cache_memory="16MiB").chat(CHAT, params)]
    replies = in_parallel(lambda messages: client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=MAX_TOKENS, temperature=0.0, extra_body={"ignore_eos": True}),
        CHAT)
    assert [r.choices[0].message.content for r in replies] == expected


def test_start_up_and_run_time_adapters_equal_peft_on_every_replica(client, http: httpx.Client, qwen2_checkpoint,
                                                                     adapters) -> None:
    reply = http.post("/v1/load_lora_adapter", json={"lora_name": "all", "lora_path": adapters["all-r16"]})
    assert reply.status_code == 200, reply.text
    for name, path in (("qv", adapters["qv-r8"]), ("all", adapters["all-r16"])):
        texts = in_parallel(lambda prompt, name=name: client.completions.create(
            model=name, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0.0,
            extra_body={"ignore_eos": True}).choices[0].text, PROMPTS * 2)
        expected = [tokenizer(qwen2_checkpoint).decode(ids, skip_special_tokens=True)
                    for ids in peft_greedy(qwen2_checkpoint, path, tuple(PROMPTS), MAX_TOKENS)]
        assert texts == expected * 2, name


def test_embeddings_equal_one_engine(client) -> None:
    expected = torch.tensor([o.outputs.embedding for o in LLM(str(tiny_decoder_embedder())).embed(TEXTS)])
    vectors = in_parallel(lambda text: client.embeddings.create(model=EMBEDDER, input=[text]).data[0].embedding,
                          TEXTS)
    assert (torch.tensor(vectors) - expected).abs().max() <= 1e-5
