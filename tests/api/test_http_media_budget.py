"""Media per request over real HTTP: slow media hosts hold no thread that other requests need (a `data:` image
answers within 1 s while 6 dripping fetches are in flight, and those end at the request's media deadline), and a
request whose images add up to more pixels than its budget is refused with a 400 before they are all decoded,
leaving the server's memory where it was."""

from __future__ import annotations

import base64
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from media_samples import noise_image, png_data_url

from loomserve.api.limits import ServerLimits
from loomserve.testing.mm_checkpoints import tiny_mm_checkpoint
from loomserve.testing.probes import blank_png, media_host

MEDIA_DEADLINE_S = 2.0
SLOW_FETCHES = 6
BOMB = blank_png(9000)  # ~80 KB of PNG, 81 megapixels decoded
BOMBS = 12


@pytest.fixture(scope="module")
def host() -> Iterator[str]:
    with media_host({}, drip_interval_s=0.5) as url:
        yield url


@pytest.fixture(scope="module")
def vl_server(serve_checkpoint) -> Iterator:
    flags = ["--allowed-media-domains", "127.0.0.1", "--media-request-timeout", str(MEDIA_DEADLINE_S),
             "--limit-mm-per-prompt", f'{{"image": {BOMBS}}}']
    with serve_checkpoint(str(tiny_mm_checkpoint("qwen2_vl")), *flags) as server:
        yield server


def chat(server, urls: list[str]) -> httpx.Response:
    content = [{"type": "image_url", "image_url": {"url": url}} for url in urls] + [{"type": "text", "text": "?"}]
    body = {"model": server.model, "messages": [{"role": "user", "content": content}], "max_tokens": 2}
    with server.http() as http:
        return http.post("/v1/chat/completions", json=body)


def rss_bytes(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(status.split("VmRSS:")[1].split()[0]) * 1024


def test_a_data_url_image_answers_within_1_s_while_6_slow_fetches_hang(vl_server, host):
    image = png_data_url(noise_image(56, 56, 3))
    assert chat(vl_server, [image]).status_code == 200  # the first image request warms the server up
    with ThreadPoolExecutor(SLOW_FETCHES) as pool:
        slow = [pool.submit(chat, vl_server, [f"{host}/drip"]) for _ in range(SLOW_FETCHES)]
        time.sleep(0.5)  # all of them waiting on the dripping host
        t0 = time.monotonic()
        fast = chat(vl_server, [image])
        assert fast.status_code == 200, fast.text
        assert time.monotonic() - t0 < 1.0
        for future in slow:
            reply = future.result()
            assert reply.status_code == 400
            assert f"longer than the server's limit of {MEDIA_DEADLINE_S:g} s" in reply.json()["error"]["message"]


def test_images_over_the_pixel_budget_are_a_400_and_leave_memory_as_it_was(vl_server):
    urls = [f"data:image/png;base64,{base64.b64encode(BOMB).decode()}"] * BOMBS
    before = rss_bytes(vl_server.process.pid)
    t0 = time.monotonic()
    reply = chat(vl_server, urls)
    assert reply.status_code == 400
    assert f"{ServerLimits().max_media_pixels_per_request:,} pixels" in reply.json()["error"]["message"]
    assert time.monotonic() - t0 < 5.0
    assert rss_bytes(vl_server.process.pid) - before < 100 << 20  # at most one image's worth was decoded, then freed
    assert chat(vl_server, [png_data_url(noise_image(56, 56, 4))]).status_code == 200
