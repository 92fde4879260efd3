"""/v1/embeddings of CLIP and SigLIP over real HTTP: text `input` equals transformers' `get_text_features`, chat
`messages` with an image_url part (a data: URL) its `get_image_features` (cosine >= 0.9999 in fp32), texts batched
equal texts one at a time, and an image beside text answers 400."""

from __future__ import annotations

import pytest
import torch
from image_text_reference import ImageTextReference, assert_same_direction
from media_samples import noise_image, png_data_url

from loomserve.testing.clip_checkpoints import tiny_clip_checkpoint

TEXTS = ["the cat sat on the mat", "hello world", "a much longer sentence about cats and dogs and the weather"]
IMAGE = noise_image(30, 40, seed=0)
FAMILIES = ("clip", "siglip")


@pytest.fixture(scope="module")
def server(serve_checkpoint):
    """A CLIP engine and a SigLIP engine behind one server, each named by its family."""
    flags = ["--served-model-name", "clip", "--dtype", "float32",
             "--embedding-model", f"siglip={tiny_clip_checkpoint('siglip')}"]
    with serve_checkpoint(str(tiny_clip_checkpoint("clip")), *flags) as s:
        yield s


@pytest.fixture(scope="module")
def references() -> dict[str, ImageTextReference]:
    return {family: ImageTextReference(tiny_clip_checkpoint(family)) for family in FAMILIES}


def embed(http, family: str, **body) -> torch.Tensor:
    response = http.post("/v1/embeddings", json={"model": family, **body})
    assert response.status_code == 200, response.text
    return torch.tensor([d["embedding"] for d in response.json()["data"]])


def image_message(url: str, text: str | None = None) -> list[dict]:
    parts = [{"type": "image_url", "image_url": {"url": url}}] + ([{"type": "text", "text": text}] if text else [])
    return [{"role": "user", "content": parts}]


@pytest.mark.parametrize("family", FAMILIES)
def test_text_input_equals_get_text_features(http, references, family):
    got = embed(http, family, input=TEXTS)
    assert_same_direction(got, torch.stack([references[family].text(t) for t in TEXTS]))


@pytest.mark.parametrize("family", FAMILIES)
def test_image_url_message_equals_get_image_features(http, references, family):
    got = embed(http, family, messages=image_message(png_data_url(IMAGE)))
    assert_same_direction(got[0], references[family].image(IMAGE))


@pytest.mark.parametrize("family", FAMILIES)
def test_text_message_equals_text_input(http, family):
    got = embed(http, family, messages=[{"role": "user", "content": [{"type": "text", "text": TEXTS[0]}]}])
    torch.testing.assert_close(got, embed(http, family, input=TEXTS[0]))


@pytest.mark.parametrize("family", FAMILIES)
def test_texts_batched_equal_texts_one_at_a_time(http, family):
    alone = torch.cat([embed(http, family, input=t) for t in TEXTS])
    torch.testing.assert_close(embed(http, family, input=TEXTS), alone, atol=1e-5, rtol=1e-5)


def test_an_image_beside_text_answers_400(http):
    response = http.post("/v1/embeddings", json={"model": "clip",
                                                 "messages": image_message(png_data_url(IMAGE), "a cat")})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == "messages"
    assert "no text" in response.json()["error"]["message"]


def test_input_and_messages_together_answer_400(http):
    response = http.post("/v1/embeddings", json={"model": "clip", "input": "a cat",
                                                 "messages": image_message(png_data_url(IMAGE))})
    assert response.status_code == 400, response.text
