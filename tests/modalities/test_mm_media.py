"""Media loading: data URLs, http(s) only from allowed hosts (no redirects, size cap), local files only under the
allowed folder, images checked against the pixel cap before decoding, audio and video decoding, and chat
content parts rendered into prompts."""

from __future__ import annotations

import asyncio
import base64
import http.server
import io
import struct
import threading
import time
import zlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from media_samples import mp4_bytes, noise_image, noise_video, png_data_url, tone, wav_base64
from transformers import AutoTokenizer

from loomserve.modalities.audio import decode_audio
from loomserve.modalities.budget import MediaBudget, MediaSpend
from loomserve.modalities.chat import render_chat_with_media, split_media
from loomserve.modalities.config import MultiModalConfig
from loomserve.modalities.image import decode_image
from loomserve.modalities.media import MediaError, MediaFetcher, MediaRef, media_client
from loomserve.modalities.video import decode_video
from loomserve.platform.config import EngineArgs
from loomserve.platform.models.registry import create_processor
from loomserve.testing.probes import blank_png, media_host

PNG = base64.b64decode(png_data_url(noise_image(20, 30, 0)).split(",", 1)[1])


def fetch(url: str, **config) -> bytes:
    return MediaFetcher(MultiModalConfig(**config)).read(MediaRef("image", url=url))


@pytest.fixture(scope="module")
def http_server() -> Iterator[str]:
    """Serves /image.png, /big (1 MiB) and /moved (a redirect to /image.png) on 127.0.0.1."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path == "/moved":
                self.send_response(302)
                self.send_header("Location", "/image.png")
                self.end_headers()
                return
            body = PNG if self.path == "/image.png" else b"x" * (1 << 20)
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    thread.join()


def test_data_urls_base64_and_percent_encoded():
    assert fetch(png_data_url(noise_image(20, 30, 0))) == PNG
    assert fetch("data:text/plain,a%20b") == b"a b"
    with pytest.raises(MediaError, match="not valid base64"):
        fetch("data:image/png;base64,@@@")
    with pytest.raises(MediaError, match="larger than the server's limit"):
        fetch(png_data_url(noise_image(20, 30, 0)), max_media_bytes=100)


def test_http_media_only_from_allowed_hosts(http_server):
    with pytest.raises(MediaError, match="disabled on this server"):
        fetch(f"{http_server}/image.png")
    with pytest.raises(MediaError, match="not in the server's allowed media domains"):
        fetch(f"{http_server}/image.png", allowed_media_domains=["example.com"])
    with pytest.raises(MediaError, match="not in the server's allowed media domains"):
        fetch("http://127.0.0.1.evil.com/image.png", allowed_media_domains=["127.0.0.1"])
    assert fetch(f"{http_server}/image.png", allowed_media_domains=["127.0.0.1"]) == PNG


def test_http_redirects_are_not_followed_and_downloads_are_capped(http_server):
    with pytest.raises(MediaError, match="HTTP 302"):
        fetch(f"{http_server}/moved", allowed_media_domains=["127.0.0.1"])
    with pytest.raises(MediaError, match="larger than the server's limit"):
        fetch(f"{http_server}/big", allowed_media_domains=["127.0.0.1"], max_media_bytes=1000)


def test_local_files_only_under_the_allowed_folder(tmp_path):
    allowed = tmp_path / "media"
    allowed.mkdir()
    (allowed / "a.png").write_bytes(PNG)
    (tmp_path / "secret.png").write_bytes(PNG)
    (allowed / "link.png").symlink_to(tmp_path / "secret.png")
    with pytest.raises(MediaError, match="disabled on this server"):
        fetch(f"file://{allowed}/a.png")
    assert fetch(f"file://{allowed}/a.png", allowed_local_media_path=str(allowed)) == PNG
    for escape in (f"file://{allowed}/../secret.png", f"file://{allowed}/link.png", "file:///etc/passwd"):
        with pytest.raises(MediaError, match="outside the server's allowed local media path"):
            fetch(escape, allowed_local_media_path=str(allowed))


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height, with one byte of image data: a decompression bomb's shape."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0")) + chunk(b"IEND", b"")


def test_images_over_the_pixel_cap_are_refused_from_the_header():
    with pytest.raises(MediaError, match="pixels.* the server.s limit of 89478485"):
        decode_image(_png_header_only(200_000, 200_000), max_pixels=89_478_485)
    with pytest.raises(MediaError, match="over the server's limit of 500"):
        decode_image(PNG, max_pixels=500)
    assert decode_image(PNG, max_pixels=600).size == (30, 20)
    with pytest.raises(MediaError, match="9000x9000 = 81000000 pixels, over the server.s limit"):
        decode_image(_png_header_only(9000, 9000), max_pixels=10**6)  # under PIL's own bomb threshold


def test_corrupt_images_are_refused():
    with pytest.raises(MediaError, match="cannot decode the image"):
        decode_image(b"definitely not an image", max_pixels=10**6)
    with pytest.raises(MediaError, match="cannot decode the image"):
        decode_image(PNG[: len(PNG) // 2], max_pixels=10**6)


def test_audio_decoding_formats():
    clip = tone(0.25, seed=0)
    samples, rate = decode_audio(base64.b64decode(wav_base64(clip)), "wav")
    assert rate == 16000 and np.allclose(samples, clip)
    stereo = io.BytesIO()
    import soundfile

    soundfile.write(stereo, np.stack([clip, -clip], axis=1), 16000, format="FLAC")
    samples, _ = decode_audio(stereo.getvalue(), "flac")
    assert np.abs(samples).max() < 1e-3  # channels averaged
    with pytest.raises(MediaError, match="unsupported audio format 'aiff-ish'"):
        decode_audio(b"RIFF", "aiff-ish")
    with pytest.raises(MediaError, match="cannot decode the audio"):
        decode_audio(b"not audio at all", "wav")


def test_video_decoding_samples_by_rate_or_count():
    data = mp4_bytes(noise_video(12, 32, 48, seed=0), fps=4)  # 3 s
    by_rate = decode_video(data, 10**6, fps=2.0, num_frames=None, multiple=2, min_frames=2, max_frames=768)
    assert by_rate.frames.shape == (6, 32, 48, 3) and by_rate.fps == pytest.approx(2.0)
    by_count = decode_video(data, 10**6, fps=None, num_frames=4, multiple=2, min_frames=2, max_frames=768)
    assert by_count.frames.shape[0] == 4 and by_count.fps == pytest.approx(4 * 4 / 12)
    with pytest.raises(MediaError, match="over the server's limit"):
        decode_video(data, 1000, fps=2.0, num_frames=None, multiple=2, min_frames=2, max_frames=768)
    with pytest.raises(MediaError, match="cannot decode the video"):
        decode_video(b"garbage", 10**6, fps=2.0, num_frames=None, multiple=2, min_frames=2, max_frames=768)


def test_content_parts_become_template_parts_and_references():
    messages = [{"role": "user", "content": [
        {"type": "text", "text": "Look:"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
        {"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}},
        {"type": "video_url", "video_url": {"url": "file:///v.mp4"}},
        {"type": "audio_url", "audio_url": {"url": "https://example.com/a.wav"}},
    ]}]
    conversation, refs = split_media(messages)
    assert [p["type"] for p in conversation[0]["content"]] == ["text", "image", "audio", "video", "audio"]
    assert conversation[0]["content"][3] == {"type": "video", "video": "file:///v.mp4"}
    assert [r.modality for r in refs] == ["image", "audio", "video", "audio"]
    assert refs[1] == MediaRef("audio", data="AAAA", format="wav")
    for bad in ({"type": "image_url", "image_url": {}}, {"type": "input_audio", "input_audio": "AAAA"},
                {"type": "refusal", "refusal": "no"}, {"type": "text"}):
        with pytest.raises(MediaError):
            split_media([{"role": "user", "content": [bad]}])


def test_templates_without_media_support_get_inline_placeholders(mm_checkpoint):
    path = mm_checkpoint("qwen2_audio")
    tokenizer = AutoTokenizer.from_pretrained(path)
    model_config = EngineArgs(model=path).create_engine_config().model_config
    processor = create_processor(model_config, tokenizer, MultiModalConfig())
    conversation, refs = split_media([{"role": "user", "content": [
        {"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}}, {"type": "text", "text": "Hm?"}]}])
    assert "Audio 1: <|audio_bos|><|AUDIO|><|audio_eos|>\nHm?" in render_chat_with_media(
        tokenizer, conversation, refs, processor)
    tokenizer.chat_template = "{% for m in messages %}[{{ m['content'] }}]{% endfor %}"  # strings only
    assert render_chat_with_media(tokenizer, conversation, refs, processor) == (
        "[<|audio_bos|><|AUDIO|><|audio_eos|>\nHm?]")
    with pytest.raises(MediaError, match="does not accept image input"):
        render_chat_with_media(tokenizer, *split_media([{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "data:,"}}]}]), processor)


def test_text_parts_render_as_one_text_a_part_a_line_offline_and_over_http(qwen2_checkpoint):
    from loomserve.api.chat import render_chat
    from loomserve.api.protocol import ChatMessage

    tokenizer = AutoTokenizer.from_pretrained(qwen2_checkpoint)
    tokenizer.chat_template = "{% for m in messages %}[{{ m['role'] }}: {{ m['content'] }}]{% endfor %}"
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": [{"type": "text", "text": "one"}, {"type": "text", "text": "two"}]}]
    offline = render_chat_with_media(tokenizer, *split_media(messages), None)
    text, refs = render_chat(tokenizer, [ChatMessage.model_validate(m) for m in messages], None)
    assert offline == text == "[system: Be brief.][user: one\ntwo]" and refs == []


def test_media_for_a_text_only_model_is_refused_by_the_python_api(qwen2_checkpoint):
    from loomserve import LLM

    llm = LLM(qwen2_checkpoint, kv_cache_memory="8MiB")
    with pytest.raises(MediaError, match="accepts text only"):
        llm.chat([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": png_data_url(
            noise_image(20, 30, 0))}}]}])
    with pytest.raises(MediaError, match="accepts text only"):
        llm.generate({"prompt": "hello", "multi_modal_data": {"image": noise_image(20, 30, 0)}})


@pytest.fixture(scope="module")
def dripping_host() -> Iterator[str]:
    with media_host({"/image.png": PNG}, drip_interval_s=0.2) as url:
        yield url


async def read_async(fetcher: MediaFetcher, ref: MediaRef) -> bytes:
    async with media_client() as client:
        return await fetcher.read_async(ref, ThreadPoolExecutor(1), client)


def slow_fetcher(**config) -> MediaFetcher:
    return MediaFetcher(MultiModalConfig(allowed_media_domains=["127.0.0.1"], media_fetch_timeout=1.0, **config))


def test_a_dripping_host_is_cut_off_at_the_deadline_of_the_whole_fetch(dripping_host):
    ref = MediaRef("image", url=f"{dripping_host}/drip")
    t0 = time.monotonic()
    with pytest.raises(MediaError, match="took longer than the server's limit of 1 s"):
        asyncio.run(read_async(slow_fetcher(), ref))
    assert time.monotonic() - t0 < 1.5
    t0 = time.monotonic()
    with pytest.raises(MediaError, match="took longer than the server's limit of 1 s"):
        slow_fetcher().read(ref)  # the Python API's blocking fetch: past the deadline at the next byte
    assert time.monotonic() - t0 < 1.5


def test_async_fetches_serve_allowed_hosts_and_charge_the_request(dripping_host):
    spend = MediaSpend(MediaBudget(max_bytes=len(PNG) * 2))
    fetcher = MediaFetcher(MultiModalConfig(allowed_media_domains=["127.0.0.1"]), spend)
    ref = MediaRef("image", url=f"{dripping_host}/image.png")
    for _ in range(2):
        assert asyncio.run(read_async(fetcher, ref)) == PNG
    with pytest.raises(MediaError, match=f"more than the server's limit of {len(PNG) * 2:,} bytes of media"):
        asyncio.run(read_async(fetcher, ref))


def test_an_image_over_the_request_budget_is_refused_from_its_header():
    header_only = blank_png(9000)[:200]  # the pixel data cut off: decoding it would fail
    spend = MediaSpend(MediaBudget(max_pixels=100_000_000))
    spend.charge("pixels", 30_000_000)  # the request's images so far
    with pytest.raises(MediaError, match="more than the server's limit of 100,000,000 pixels"):
        decode_image(header_only, 10**9, spend)
    assert spend.spent["pixels"] == 30_000_000
