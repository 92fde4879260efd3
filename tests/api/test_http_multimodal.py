"""Vision and audio chat through the HTTP server with the openai client: data URLs, allowed local files and
base64 audio give what the offline engine gives; bad media costs its request a 400 with the reason and leaves
the server serving."""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator

import openai
import pytest
import torch
from media_samples import mp4_bytes, noise_image, noise_video, png_data_url, tone, wav_base64
from PIL import Image

from loomserve import LLM, SamplingParams
from loomserve.testing.mm_checkpoints import tiny_mm_checkpoint

IMAGE_LIMIT = 2
MAX_PIXELS = 20_000  # 112 x 84 = 9408 passes, 200 x 200 = 40000 does not
SMALL, LARGE = noise_image(56, 56, 1), noise_image(112, 84, 2)


@pytest.fixture(scope="module")
def media_dir(tmp_path_factory: pytest.TempPathFactory):
    folder = tmp_path_factory.mktemp("media")
    LARGE.save(folder / "large.png")
    return folder


@pytest.fixture(scope="module")
def vl_server(serve_checkpoint, media_dir) -> Iterator:
    flags = ["--limit-mm-per-prompt", f'{{"image": {IMAGE_LIMIT}}}', "--max-image-pixels", str(MAX_PIXELS),
             "--allowed-local-media-path", str(media_dir), "--enable-prompt-tokens-details", "--enable-mm-embeds"]
    with serve_checkpoint(str(tiny_mm_checkpoint("qwen2_vl")), *flags) as server:
        yield server


@pytest.fixture(scope="module")
def audio_server(serve_checkpoint) -> Iterator:
    with serve_checkpoint(str(tiny_mm_checkpoint("qwen2_audio"))) as server:
        yield server


def image_part(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


def audio_part(samples, fmt: str = "wav") -> dict:
    return {"type": "input_audio", "input_audio": {"data": wav_base64(samples), "format": fmt}}


def chat(server, content: list[dict], **kwargs):
    messages = [{"role": "user", "content": content}]
    return server.client().chat.completions.create(
        model=server.model, messages=messages, max_tokens=8, temperature=0, **kwargs
    )


def offline(family: str, content: list[dict]) -> tuple[str, int]:
    """The offline engine's answer and prompt length for the same message."""
    llm = LLM(str(tiny_mm_checkpoint(family)), kv_cache_memory="8MiB")
    [out] = llm.chat([{"role": "user", "content": content}], SamplingParams(temperature=0, max_tokens=8))
    return out.outputs[0].text, len(out.prompt_token_ids)


def test_two_images_as_data_urls_answer_as_the_offline_engine(vl_server):
    content = [image_part(png_data_url(LARGE)), {"type": "text", "text": "and"}, image_part(png_data_url(SMALL)),
               {"type": "text", "text": "Which one is bigger?"}]
    reply = chat(vl_server, content)
    text, prompt_tokens = offline("qwen2_vl", content)
    assert reply.choices[0].message.content == text
    assert reply.usage.prompt_tokens == prompt_tokens  # 12 + 4 image tokens included


def test_allowed_local_files_and_streaming(vl_server, media_dir):
    by_file = chat(vl_server, [image_part(f"file://{media_dir}/large.png"), {"type": "text", "text": "Hi"}])
    by_data = chat(vl_server, [image_part(png_data_url(LARGE)), {"type": "text", "text": "Hi"}])
    assert by_file.choices[0].message.content == by_data.choices[0].message.content
    assert by_data.usage.prompt_tokens_details.cached_tokens > 0  # the same image again: prefix-cache hit
    chunks = chat(vl_server, [image_part(png_data_url(LARGE)), {"type": "text", "text": "Hi"}], stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == by_data.choices[0].message.content


def test_video_as_a_data_url(vl_server):
    video = "data:video/mp4;base64," + base64.b64encode(mp4_bytes(noise_video(8, 56, 56, seed=3), fps=4)).decode()
    content = [{"type": "video_url", "video_url": {"url": video}}, {"type": "text", "text": "What happens?"}]
    reply = chat(vl_server, content)
    text_only = chat(vl_server, content[1:])
    # 2 s at 4 fps, sampled at 2 fps: 4 frames = 2 temporal patches of 2x2 merged patches, between
    # <|vision_start|> and <|vision_end|>.
    assert reply.usage.prompt_tokens == text_only.usage.prompt_tokens + 2 + 2 * 4


def jpeg_frames_url(frames) -> str:
    """vLLM's multi-frame video URL: base64 JPEGs joined by commas."""
    encoded = []
    for frame in frames:
        buf = io.BytesIO()
        Image.fromarray(frame).save(buf, format="JPEG")
        encoded.append(base64.b64encode(buf.getvalue()).decode())
    return "data:video/jpeg;base64," + ",".join(encoded)


def test_video_as_jpeg_frames_uses_every_frame(vl_server):
    content = [{"type": "video_url", "video_url": {"url": jpeg_frames_url(noise_video(4, 56, 56, seed=4))}},
               {"type": "text", "text": "What happens?"}]
    reply = chat(vl_server, content)
    # all 4 frames (no sampling): 2 temporal patches of 2x2 merged patches, between <|vision_start|> and <|vision_end|>
    assert reply.usage.prompt_tokens == chat(vl_server, content[1:]).usage.prompt_tokens + 2 + 2 * 4
    assert reply.choices[0].message.content == offline("qwen2_vl", content)[0]


def test_a_media_uuid_reuses_the_item_sent_before_under_it(vl_server):
    question = {"type": "text", "text": "What is it?"}
    first = chat(vl_server, [{**image_part(png_data_url(LARGE)), "uuid": "large-1"}, question])
    for empty in ({}, None):
        again = chat(vl_server, [{"type": "image_url", "image_url": empty, "uuid": "large-1"}, question])
        assert again.choices[0].message.content == first.choices[0].message.content
        assert again.usage.prompt_tokens == first.usage.prompt_tokens
        assert again.usage.prompt_tokens_details.cached_tokens > 0  # the same content: a prefix-cache hit
    with pytest.raises(openai.BadRequestError, match="no image with uuid 'never-sent' is cached"):
        chat(vl_server, [{"type": "image_url", "image_url": {}, "uuid": "never-sent"}, question])


def test_a_response_with_an_input_image_answers_as_chat_does(vl_server):
    url = png_data_url(LARGE)
    response = vl_server.client().responses.create(
        model=vl_server.model, max_output_tokens=8, temperature=0,
        input=[{"role": "user", "content": [{"type": "input_image", "image_url": url},
                                            {"type": "input_text", "text": "What is it?"}]}])
    reply = chat(vl_server, [image_part(url), {"type": "text", "text": "What is it?"}])
    assert response.output_text == reply.choices[0].message.content
    assert response.usage.input_tokens == reply.usage.prompt_tokens


def test_tokenize_expands_media_placeholders_as_generation_does(vl_server):
    content = [image_part(png_data_url(LARGE)), {"type": "text", "text": "What is it?"}]
    messages = [{"role": "user", "content": content}]
    tokenized = vl_server.http().post("/tokenize", json={"messages": messages, "return_token_strs": True}).json()
    assert tokenized["count"] == chat(vl_server, content).usage.prompt_tokens == len(tokenized["token_strs"])
    assert tokenized["token_strs"].count("<|image_pad|>") > 1  # the one placeholder, expanded


def _b64_tensor(tensor) -> str:
    buf = io.BytesIO()
    torch.save(tensor, buf)
    return base64.b64encode(buf.getvalue()).decode()


def qwen2_vl_image_embeds_part(image) -> dict:
    """vLLM's image_embeds part for Qwen2-VL: transformers' vision tower output for the image, with its grid."""
    from transformers import Qwen2VLForConditionalGeneration, Qwen2VLImageProcessorPil

    path = str(tiny_mm_checkpoint("qwen2_vl"))
    inputs = Qwen2VLImageProcessorPil.from_pretrained(path)([image], return_tensors="pt")
    model = Qwen2VLForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        [rows] = model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"]).pooler_output
    return {"type": "image_embeds", "image_embeds": {"image_embeds": _b64_tensor(rows),
                                                     "image_grid_thw": _b64_tensor(inputs["image_grid_thw"][0])}}


def test_image_embeds_answer_as_the_image(vl_server):
    question = {"type": "text", "text": "What is it?"}
    reply = chat(vl_server, [qwen2_vl_image_embeds_part(LARGE), question])
    expected = chat(vl_server, [image_part(png_data_url(LARGE)), question])
    assert reply.choices[0].message.content == expected.choices[0].message.content
    assert reply.usage.prompt_tokens == expected.usage.prompt_tokens


HIDDEN = 64  # the tiny Qwen2-VL's


@pytest.mark.parametrize("embeds, reason", [
    (_b64_tensor(torch.zeros(4, HIDDEN)), "image_grid_thw"),
    ({"image_embeds": _b64_tensor(torch.zeros(3, 8)), "image_grid_thw": _b64_tensor(torch.tensor([1, 4, 4]))},
     r"needs \[4, hidden\]"),
    ({"image_embeds": _b64_tensor(torch.zeros(4, 8)), "image_grid_thw": _b64_tensor(torch.tensor([1, 4, 4]))},
     r"shape \[num_tokens, \d+\]"),
    ("bm90IGEgdGVuc29y", "torch.save"),
], ids=["no grid", "rows off the grid", "hidden size", "not a tensor"])
def test_image_embeds_of_the_wrong_shape_are_a_400(vl_server, embeds, reason):
    with pytest.raises(openai.BadRequestError, match=reason):
        chat(vl_server, [{"type": "image_embeds", "image_embeds": embeds}, {"type": "text", "text": "Hi"}])


def test_audio_embeds_without_enable_mm_embeds_are_a_400(audio_server):
    part = {"type": "audio_embeds", "audio_embeds": _b64_tensor(torch.zeros(4, 8))}
    with pytest.raises(openai.BadRequestError, match="--enable-mm-embeds"):
        chat(audio_server, [part, {"type": "text", "text": "Hi"}])


def _png_bytes(image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


BAD_VISION_REQUESTS = {
    "corrupt image bytes": ([image_part("data:image/png;base64," + base64.b64encode(b"not a png").decode())],
                            "cannot decode the image"),
    "more images than the limit": ([image_part(png_data_url(SMALL))] * (IMAGE_LIMIT + 1),
                                   f"at most {IMAGE_LIMIT} image item(s)"),
    "a URL outside the allowed domains": ([image_part("http://example.com/cat.png")], "disabled on this server"),
    "a path outside the allowed folder": ([image_part("file:///etc/hostname")], "outside the server's allowed local"),
    "an image over the pixel cap": ([image_part("data:image/png;base64," + _png_bytes(noise_image(200, 200, 0)))],
                                    f"over the server's limit of {MAX_PIXELS}"),
    "audio to a vision model": ([audio_part(tone(0.5, 0))], "does not accept audio input"),
    "an unknown part type": ([{"type": "image_file", "image_file": {}}], "not supported"),
    "a plain-string image_url": ([{"type": "image_url", "image_url": png_data_url(SMALL)}], "needs an object"),
}


@pytest.mark.parametrize("case", BAD_VISION_REQUESTS)
def test_bad_media_is_a_400_with_the_reason(vl_server, case):
    content, reason = BAD_VISION_REQUESTS[case]
    with pytest.raises(openai.BadRequestError) as info:
        chat(vl_server, content + [{"type": "text", "text": "What is it?"}])
    assert reason in info.value.message
    assert info.value.body["param"] == "messages"


def test_the_server_keeps_serving_after_bad_media(vl_server):
    for content, _ in BAD_VISION_REQUESTS.values():
        with pytest.raises(openai.BadRequestError):
            chat(vl_server, content)
    assert vl_server.http().get("/health").status_code == 200
    assert chat(vl_server, [image_part(png_data_url(SMALL))]).choices[0].finish_reason == "length"


def test_base64_audio_answers_as_the_offline_engine(audio_server):
    content = [audio_part(tone(1.2, 3)), {"type": "text", "text": "What is that sound?"}]
    reply = chat(audio_server, content)
    assert (reply.choices[0].message.content, reply.usage.prompt_tokens) == offline("qwen2_audio", content)


def test_bad_audio_is_a_400_and_the_server_keeps_serving(audio_server):
    bad = [audio_part(tone(0.5, 0), fmt="weird"), {"type": "input_audio",
                                                  "input_audio": {"data": base64.b64encode(b"junk").decode(),
                                                                  "format": "wav"}}]
    for part, reason in zip(bad, ["unsupported audio format 'weird'", "cannot decode the audio"]):
        with pytest.raises(openai.BadRequestError, match=reason):
            chat(audio_server, [part])
    assert chat(audio_server, [audio_part(tone(0.5, 0))]).choices[0].finish_reason == "length"


def test_media_sent_to_a_text_only_model_is_a_400(client, model):
    messages = [{"role": "user", "content": [image_part(png_data_url(SMALL)), {"type": "text", "text": "Hi"}]}]
    with pytest.raises(openai.BadRequestError, match="accepts text only"):
        client.chat.completions.create(model=model, messages=messages, max_tokens=4)
