"""CLIP and SigLIP embedding models through `LLM.embed`: text prompts equal transformers' `get_text_features`,
image prompts (`{"prompt": "", "multi_modal_data": {"image": ...}}`) its `get_image_features` (cosine >= 0.9999 in
fp32), and a step mixing texts and images gives each prompt what it gets alone."""

from __future__ import annotations

import pytest
import torch
from image_text_reference import ImageTextReference, assert_same_direction
from media_samples import noise_image

from loomserve import LLM
from loomserve.pooling.params import PoolingParams
from loomserve.testing.clip_checkpoints import tiny_clip_checkpoint

TEXTS = ["the cat sat on the mat", "hello world", "a much longer sentence about cats and dogs and the weather"]
IMAGES = [noise_image(30, 40, seed=0), noise_image(64, 48, seed=1), noise_image(28, 28, seed=2, mode="RGBA")]


def image_prompt(image) -> dict:
    return {"prompt": "", "multi_modal_data": {"image": image}}


@pytest.fixture(scope="module", params=["clip", "siglip"])
def family(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def path(family) -> str:
    return str(tiny_clip_checkpoint(family))


@pytest.fixture(scope="module")
def llm(path) -> LLM:
    return LLM(path, dtype="float32", device="cpu")


@pytest.fixture(scope="module")
def reference(path) -> ImageTextReference:
    return ImageTextReference(path)


def vectors(outputs) -> torch.Tensor:
    return torch.stack([torch.as_tensor(o.outputs.embedding) for o in outputs])


def test_text_embeddings_equal_get_text_features(llm, reference):
    got = vectors(llm.embed(TEXTS))
    assert_same_direction(got, torch.stack([reference.text(t) for t in TEXTS]))


def test_image_embeddings_equal_get_image_features(llm, reference):
    got = vectors(llm.embed([image_prompt(im) for im in IMAGES]))
    assert_same_direction(got, torch.stack([reference.image(im) for im in IMAGES]))


def test_embeddings_are_unit_vectors_of_the_projection_width(llm, reference):
    got = vectors(llm.embed([TEXTS[0], image_prompt(IMAGES[0])]))
    assert got.shape == (2, reference.text(TEXTS[0]).shape[0])
    torch.testing.assert_close(got.norm(dim=-1), torch.ones(2))


def test_a_step_of_texts_and_images_equals_each_prompt_alone(llm):
    prompts = [TEXTS[0], image_prompt(IMAGES[0]), TEXTS[1], image_prompt(IMAGES[1]), TEXTS[2]]
    batched = vectors(llm.embed(prompts))
    alone = torch.cat([vectors(llm.embed([p])) for p in prompts])
    torch.testing.assert_close(batched, alone, atol=1e-5, rtol=1e-5)


def test_an_image_prompt_with_text_is_refused(llm):
    with pytest.raises(ValueError, match="no text"):
        llm.embed({"prompt": "a cat", "multi_modal_data": {"image": IMAGES[0]}})


def test_a_prompt_of_two_images_is_refused(llm):
    with pytest.raises(ValueError, match="one image"):
        llm.embed({"prompt": "", "multi_modal_data": {"image": IMAGES[:2]}})


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_on_cuda_a_step_of_texts_and_images_equals_transformers(path, reference):
    llm = LLM(path, dtype="float32", device="cuda")
    got = vectors(llm.embed([*TEXTS, *(image_prompt(im) for im in IMAGES)]))
    want = torch.stack([*(reference.text(t) for t in TEXTS), *(reference.image(im) for im in IMAGES)])
    assert_same_direction(got, want)


def test_dimensions_are_checked_against_the_embedding_width(llm, reference):
    width = reference.text(TEXTS[0]).shape[0]
    assert len(llm.embed(TEXTS[0], PoolingParams(dimensions=width))[0].outputs.embedding) == width
    with pytest.raises(ValueError, match=f"its vectors have {width} dimensions"):
        llm.embed(TEXTS[0], PoolingParams(dimensions=width - 1))
