"""Precomputed media embeddings (`enable_mm_embeds`): an item given as its encoder's output skips the encoder and
answers as the media itself does. The embeddings come from transformers: the rows its language model receives at
the item's placeholder positions when it is given the media."""

from __future__ import annotations

import base64
import functools
import io

import pytest
import torch
from media_samples import noise_image, png_data_url, tone
from mm_reference import (
    MAX_TOKENS,
    audio_inputs,
    hf_greedy,
    hf_model,
    ids_of,
    image_prompt,
    llava_inputs,
    qwen_vl_inputs,
)

from loomserve import LLM, SamplingParams
from loomserve.modalities.media import MediaError

GREEDY = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, min_tokens=MAX_TOKENS)
IMAGE, OTHER = noise_image(56, 56, seed=1), noise_image(112, 84, seed=2)
CLIP = tone(1.0, seed=0)
AUDIO_PROMPT = "<|im_start|>user\n<|audio_bos|><|AUDIO|><|audio_eos|>\nWhat is it?<|im_end|>\n<|im_start|>assistant\n"


@functools.cache
def engine(path: str, **kwargs) -> LLM:
    return LLM(path, block_size=4, kv_cache_memory="8MiB", **kwargs)


def hf_item_embeds(path: str, inputs: dict, token_id: int) -> torch.Tensor:
    """The rows transformers' language model receives at the placeholder positions: the encoder's output as the
    model uses it, [num_tokens, hidden]."""
    model = hf_model(path)
    seen = {}

    def keep(_module, _args, kwargs):
        seen.setdefault("embeds", kwargs["inputs_embeds"])

    hook = model.model.language_model.register_forward_pre_hook(keep, with_kwargs=True)
    try:
        with torch.no_grad():
            model(**inputs, attention_mask=torch.ones_like(inputs["input_ids"]))
    finally:
        hook.remove()
    return seen["embeds"][0][inputs["input_ids"][0] == token_id]


def image_embeds(path: str, family: str, images: list) -> list[torch.Tensor]:
    """Each image's embeddings by transformers, with its grid for Qwen2-VL."""
    ids = ids_of(path, image_prompt(family, 1))
    token_id = hf_model(path).config.image_token_id
    out = []
    for image in images:
        inputs = llava_inputs(path, ids, [image]) if family == "llava" else qwen_vl_inputs(path, ids, [image], [], 2.0)
        out.append((hf_item_embeds(path, inputs, token_id), inputs.get("image_grid_thw")))
    return out


def run(llm: LLM, ids: list[int], mm_data: dict) -> list[int]:
    [out] = llm.generate([{"prompt_token_ids": ids, "multi_modal_data": mm_data}], GREEDY)
    return out.outputs[0].token_ids


def test_llava_image_embeds_answer_as_the_image(mm_checkpoint):
    path = mm_checkpoint("llava")
    ids = ids_of(path, image_prompt("llava", 2, "Compare them."))
    [(a, _), (b, _)] = image_embeds(path, "llava", [IMAGE, OTHER])
    expected = hf_greedy(path, ids, images=[IMAGE, OTHER])
    llm = engine(path, enable_mm_embeds=True)
    assert run(llm, ids, {"image": torch.stack([a, b])}) == expected  # vLLM's [num_images, tokens, hidden]
    assert run(llm, ids, {"image": [a, OTHER]}) == expected  # embeddings beside an image of the same prompt


def test_an_image_embeds_chat_part_answers_as_the_image_part(mm_checkpoint):
    path = mm_checkpoint("llava")
    [(rows, _)] = image_embeds(path, "llava", [IMAGE])
    buf = io.BytesIO()
    torch.save(rows, buf)
    llm = engine(path, enable_mm_embeds=True)
    answers = [llm.chat([{"role": "user", "content": [part, {"type": "text", "text": "What is it?"}]}], GREEDY)[0]
               for part in ({"type": "image_url", "image_url": {"url": png_data_url(IMAGE)}},
                            {"type": "image_embeds", "image_embeds": base64.b64encode(buf.getvalue()).decode()})]
    assert answers[0].outputs[0].token_ids == answers[1].outputs[0].token_ids
    assert answers[0].prompt_token_ids == answers[1].prompt_token_ids


def test_qwen2_vl_image_embeds_with_their_grids_answer_as_the_images(mm_checkpoint):
    path = mm_checkpoint("qwen2_vl")
    ids = ids_of(path, image_prompt("qwen2_vl", 2, "Compare them."))
    [(a, grid_a), (b, grid_b)] = image_embeds(path, "qwen2_vl", [OTHER, IMAGE])
    given = {"image_embeds": torch.cat([a, b]), "image_grid_thw": torch.cat([grid_a, grid_b])}
    assert run(engine(path, enable_mm_embeds=True), ids, {"image": given}) == hf_greedy(path, ids,
                                                                                        images=[OTHER, IMAGE])


def test_qwen2_audio_embeds_answer_as_the_clip(mm_checkpoint):
    path = mm_checkpoint("qwen2_audio")
    ids = ids_of(path, AUDIO_PROMPT)
    rows = hf_item_embeds(path, audio_inputs(path, ids, [CLIP]), hf_model(path).config.audio_token_id)
    assert run(engine(path, enable_mm_embeds=True), ids, {"audio": rows}) == hf_greedy(path, ids, audios=[CLIP])


def test_embeds_are_refused_unless_enabled(mm_checkpoint):
    path = mm_checkpoint("llava")
    ids = ids_of(path, image_prompt("llava", 1))
    with pytest.raises(MediaError, match="--enable-mm-embeds"):
        run(engine(path), ids, {"image": torch.zeros(16, 64)})


@pytest.mark.parametrize("family, given, message", [
    ("llava", torch.zeros(16, 7), r"shape \[num_tokens, \d+\]"),
    ("llava", torch.zeros(2, 3, 16, 8), "shape"),
    ("llava", torch.zeros(16, 64, dtype=torch.int64), "float32"),
    ("qwen2_vl", torch.zeros(4, 64), "image_grid_thw"),
    ("qwen2_vl", {"image_embeds": torch.zeros(5, 64), "image_grid_thw": torch.tensor([[1, 4, 4]])}, r"needs \[4,"),
])
def test_embeds_of_the_wrong_shape_are_refused(mm_checkpoint, family, given, message):
    path = mm_checkpoint(family)
    hidden = hf_model(path).config.get_text_config().hidden_size
    if isinstance(given, torch.Tensor) and given.shape[-1] == 64:
        given = given.new_zeros(*given.shape[:-1], hidden)
    ids = ids_of(path, image_prompt(family, 1))
    with pytest.raises(MediaError, match=message):
        run(engine(path, enable_mm_embeds=True), ids, {"image": given})
