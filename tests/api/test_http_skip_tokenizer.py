"""A server started with --skip-tokenizer-init over a checkpoint without tokenizer files, through the openai client:
token ids in, token ids out (the same ids the shared server with its tokenizer generates), no text; text prompts,
chat and stop strings answer 400 saying why."""

from __future__ import annotations

import shutil
from collections.abc import Iterator

import openai
import pytest

PROMPT_IDS = [12, 7, 99, 41, 3, 250, 18, 64]


@pytest.fixture(scope="module")
def bare_server(serve_checkpoint, qwen2_checkpoint, tmp_path_factory) -> Iterator:
    folder = tmp_path_factory.mktemp("no_tokenizer")
    for name in ("config.json", "generation_config.json", "model.safetensors"):
        shutil.copy(f"{qwen2_checkpoint}/{name}", folder / name)
    with serve_checkpoint(str(folder), "--skip-tokenizer-init") as server:
        yield server


def complete(server, **kwargs):
    return server.client().completions.create(model=server.model, temperature=0, max_tokens=8, **kwargs)


def test_token_ids_in_token_ids_out(bare_server, client, model):
    answer = complete(bare_server, prompt=PROMPT_IDS, echo=True, extra_body={"return_token_ids": True})
    with_tokenizer = client.completions.create(model=model, prompt=PROMPT_IDS, temperature=0, max_tokens=8,
                                               extra_body={"return_token_ids": True})
    choice = answer.choices[0]
    assert choice.token_ids == with_tokenizer.choices[0].token_ids and len(choice.token_ids) > 0
    assert choice.prompt_token_ids == PROMPT_IDS
    assert choice.text == ""


@pytest.mark.parametrize("call", [
    lambda s: complete(s, prompt="hello there"),
    lambda s: s.client().chat.completions.create(model=s.model, messages=[{"role": "user", "content": "hi"}]),
    lambda s: complete(s, prompt=PROMPT_IDS, stop=["."]),
], ids=["text prompt", "chat", "stop strings"])
def test_what_needs_the_tokenizer_is_a_400(bare_server, call):
    with pytest.raises(openai.BadRequestError, match="--skip-tokenizer-init"):
        call(bare_server)
    assert complete(bare_server, prompt=PROMPT_IDS).choices[0].finish_reason is not None
