"""`prompt_embeds` on /v1/completions (vLLM's field): base64 of a `torch.save`d [seq_len, hidden] tensor, taken with
--enable-prompt-embeds (the shared server has it), refused with 400 otherwise or when it is not such a tensor."""

from __future__ import annotations

import base64
import io

import pytest
import torch
from tool_templates import TOOLS_MODEL
from transformers import AutoModelForCausalLM, AutoTokenizer

PROMPT = "the cat sat on the mat"


def encoded(value) -> str:
    buffer = io.BytesIO()
    torch.save(value, buffer)
    return base64.b64encode(buffer.getvalue()).decode()


@pytest.fixture(scope="module")
def ids(server) -> list[int]:
    return AutoTokenizer.from_pretrained(server.checkpoint)(PROMPT).input_ids


@pytest.fixture(scope="module")
def embeds(server, ids) -> torch.Tensor:
    hf = AutoModelForCausalLM.from_pretrained(server.checkpoint, dtype=torch.float32)
    with torch.no_grad():
        return hf.get_input_embeddings()(torch.tensor(ids))  # [seq_len, hidden]


def complete(http, model: str, **body):
    return http.post("/v1/completions", json={"model": model, "max_tokens": 8, "temperature": 0, **body})


def test_prompt_embeds_generate_what_their_tokens_do(client, model, ids, embeds):
    from_ids = client.completions.create(model=model, prompt=ids, max_tokens=8, temperature=0)
    from_embeds = client.completions.create(model=model, prompt="", max_tokens=8, temperature=0,
                                            extra_body={"prompt_embeds": encoded(embeds)})
    assert from_embeds.choices[0].text == from_ids.choices[0].text
    assert from_embeds.usage.prompt_tokens == len(ids)


def test_prompt_embeds_stream_as_they_answer_whole(client, model, embeds):
    body = {"model": model, "prompt": "", "max_tokens": 8, "temperature": 0,
            "extra_body": {"prompt_embeds": encoded(embeds.to(torch.bfloat16))}}
    whole = client.completions.create(**body).choices[0].text
    assert "".join(chunk.choices[0].text for chunk in client.completions.create(**body, stream=True)) == whole


def test_prompt_embeds_come_before_text_prompts(http, model, ids, embeds):
    shifted = embeds + 0.5
    answer = complete(http, model, prompt=PROMPT, prompt_embeds=[encoded(shifted), encoded(embeds)]).json()
    alone = [complete(http, model, prompt_embeds=encoded(e)).json()["choices"][0]["text"] for e in (shifted, embeds)]
    text = complete(http, model, prompt=PROMPT).json()["choices"][0]["text"]
    assert [c["text"] for c in sorted(answer["choices"], key=lambda c: c["index"])] == [*alone, text]


@pytest.mark.parametrize("value", [
    "not base64!",
    base64.b64encode(b"not a torch file").decode(),
    encoded({"embeds": [1.0, 2.0]}),
    encoded(torch.zeros(3, 7)),
    encoded(torch.zeros(3, 64, dtype=torch.long)),
], ids=["bad-base64", "not-torch-save", "not-a-tensor", "wrong-hidden-size", "integer-tensor"])
def test_invalid_prompt_embeds_are_refused(http, model, value):
    answer = complete(http, model, prompt_embeds=value)
    assert answer.status_code == 400
    assert answer.json()["error"]["param"] == "prompt_embeds"


def test_echo_with_prompt_embeds_is_refused(http, model, embeds):
    assert complete(http, model, prompt_embeds=encoded(embeds), echo=True).status_code == 400


def test_prompt_embeds_without_the_flag_are_refused(tools_server, embeds):
    with tools_server.http() as http:
        answer = complete(http, TOOLS_MODEL, prompt_embeds=encoded(embeds))
    assert answer.status_code == 400
    assert "--enable-prompt-embeds" in answer.json()["error"]["message"]
