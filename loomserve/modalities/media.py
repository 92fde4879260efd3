"""Media references from chat content parts, and fetching their bytes under the server's allow-lists.

`data:` URLs are decoded in place; `http(s)` URLs are fetched only from hosts in `allowed_media_domains`
(redirects are not followed, so an allowed host cannot bounce the fetch elsewhere), within a deadline for the
whole fetch (a host dripping bytes cannot hold it longer) and a size cap; `file://` URLs and plain paths only
resolve inside `allowed_local_media_path` (after following symlinks). Anything else raises `MediaError`, whose
message is safe to show the client. The server fetches with `read_async` (http(s) as non-blocking I/O on the event
loop, so slow hosts hold no thread); the Python API with `read`.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import os
import time
import urllib.parse
from concurrent.futures import Executor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from loomserve.modalities.config import MultiModalConfig

if TYPE_CHECKING:
    import httpx

    from loomserve.modalities.budget import MediaSpend


class MediaError(ValueError):
    """Media that cannot be used: bad URL, not allowed, too big, undecodable. The message says why."""


@dataclass(frozen=True)
class MediaRef:
    """One media part of a message, not yet loaded: a URL (data:, http(s), file) or inline base64 data."""

    modality: str  # "image" | "video" | "audio"
    url: str | None = None
    data: str | None = None  # base64 (input_audio parts)
    format: str | None = None  # input_audio's "wav", "mp3", ...
    uuid: str | None = None  # the client's name for the item (vLLM's): reused by later parts without media
    embeds: str | dict[str, str] | None = None  # image_embeds / audio_embeds parts: base64 torch.save'd tensors

    @property
    def needs_cache(self) -> bool:
        """A part with a uuid and no media: the item comes from the uuid cache."""
        return self.uuid is not None and self.url is None and self.data is None and self.embeds is None


class MediaFetcher:
    """Reads the media of one request, charging their encoded bytes to `spend` (its budget) when given."""

    def __init__(self, config: MultiModalConfig, spend: MediaSpend | None = None) -> None:
        self.config = config
        self.spend = spend

    def read(self, ref: MediaRef) -> bytes:
        """The encoded bytes behind a reference."""
        if self._is_http(ref):
            return self._counted(self._http(ref.url))
        return self._counted(self._local(ref))

    async def read_async(self, ref: MediaRef, pool: Executor, client: httpx.AsyncClient) -> bytes:
        """`read` for the server: http(s) fetched by `client` without a thread, anything else read on `pool`."""
        if self._is_http(ref):
            return self._counted(await self._http_async(ref.url, client))
        return self._counted(await asyncio.get_running_loop().run_in_executor(pool, self._local, ref))

    @staticmethod
    def _is_http(ref: MediaRef) -> bool:
        return ref.data is None and urllib.parse.urlsplit(ref.url or "").scheme.lower() in ("http", "https")

    def _local(self, ref: MediaRef) -> bytes:
        if ref.embeds is not None:  # nothing to read: the part carries its tensors
            return b""
        if ref.data is not None:
            return self._b64(ref.data)
        url = ref.url or ""
        scheme = urllib.parse.urlsplit(url).scheme.lower()
        if scheme == "data":
            return self._data_url(url)
        if scheme == "file" or (scheme == "" and url):
            return self._file(url)
        raise MediaError(f"unsupported media URL scheme {scheme!r}: use data:, http(s): or file: URLs")

    def _counted(self, data: bytes) -> bytes:
        if self.spend is not None:
            self.spend.charge("bytes", len(data))
        return data

    def _check_size(self, n: int) -> None:
        if n > self.config.max_media_bytes:
            raise MediaError(f"the media item is larger than the server's limit of {self.config.max_media_bytes} bytes")

    def _b64(self, data: str) -> bytes:
        self._check_size(len(data) * 3 // 4)
        try:
            return base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise MediaError(f"the media data is not valid base64 ({exc})") from None

    def _data_url(self, url: str) -> bytes:
        header, sep, payload = url.partition(",")
        if not sep:
            raise MediaError("a data: URL needs a comma before its payload")
        if header.lower() == "data:video/jpeg;base64":  # vLLM's frames joined by commas: their bytes, all counted
            frames = b"".join(self._b64(frame) for frame in payload.split(","))
            self._check_size(len(frames))
            return frames
        if header.endswith(";base64"):
            return self._b64(payload)
        raw = urllib.parse.unquote_to_bytes(payload)
        self._check_size(len(raw))
        return raw

    def _check_host(self, url: str) -> None:
        host = (urllib.parse.urlsplit(url).hostname or "").lower()
        allowed = [d.lower().strip(".") for d in self.config.allowed_media_domains or []]
        if not any(host == d or host.endswith("." + d) for d in allowed):
            if not allowed:
                raise MediaError("fetching media from http(s) URLs is disabled on this server "
                                 "(start it with --allowed-media-domains)")
            raise MediaError(f"the media host {host!r} is not in the server's allowed media domains")

    def _append(self, body: bytearray, chunk: bytes, deadline: float) -> None:
        """One more chunk of a download, within the size cap and the fetch's deadline."""
        self._check_size(len(body) + len(chunk))
        if time.monotonic() > deadline:
            raise self._too_slow()
        body += chunk

    def _too_slow(self) -> MediaError:
        return MediaError(f"fetching the media URL took longer than the server's limit of "
                          f"{self.config.media_fetch_timeout:g} s")

    def _http(self, url: str) -> bytes:
        """Blocking fetch (the Python API): each read waits at most the fetch's timeout, and the whole fetch ends
        at the first chunk past its deadline."""
        self._check_host(url)
        import httpx

        timeout = self.config.media_fetch_timeout
        deadline = time.monotonic() + timeout
        try:
            with httpx.stream("GET", url, timeout=timeout, follow_redirects=False) as resp:
                _check_status(resp.status_code)
                body = bytearray()
                for chunk in resp.iter_bytes():
                    self._append(body, chunk, deadline)
                return bytes(body)
        except httpx.TimeoutException:
            raise self._too_slow() from None
        except httpx.HTTPError as exc:
            raise MediaError(f"fetching the media URL failed: {type(exc).__name__}") from None

    async def _http_async(self, url: str, client: httpx.AsyncClient) -> bytes:
        """Non-blocking fetch, cancelled at its deadline wherever it is (connecting, waiting for a byte)."""
        self._check_host(url)
        import httpx

        timeout = self.config.media_fetch_timeout
        try:
            return await asyncio.wait_for(self._get(client, url, time.monotonic() + timeout), timeout)
        except (asyncio.TimeoutError, httpx.TimeoutException):
            raise self._too_slow() from None
        except httpx.HTTPError as exc:
            raise MediaError(f"fetching the media URL failed: {type(exc).__name__}") from None

    async def _get(self, client: httpx.AsyncClient, url: str, deadline: float) -> bytes:
        async with client.stream("GET", url, timeout=self.config.media_fetch_timeout, follow_redirects=False) as resp:
            _check_status(resp.status_code)
            body = bytearray()
            async for chunk in resp.aiter_bytes():
                self._append(body, chunk, deadline)
            return bytes(body)

    def _file(self, url: str) -> bytes:
        root = self.config.allowed_local_media_path
        if not root:
            raise MediaError("local media files are disabled on this server (start it with --allowed-local-media-path)")
        path = urllib.parse.unquote(urllib.parse.urlsplit(url).path) if url.startswith("file:") else url
        real, real_root = Path(os.path.realpath(path)), Path(os.path.realpath(root))
        if not real.is_relative_to(real_root):
            raise MediaError("the media path is outside the server's allowed local media path")
        try:
            self._check_size(real.stat().st_size)
            return real.read_bytes()
        except OSError:
            raise MediaError("the media file cannot be read") from None


def _check_status(status: int) -> None:
    if status != 200:
        raise MediaError(f"fetching the media URL answered HTTP {status}")


def media_client() -> httpx.AsyncClient:
    """The server's client for media downloads, one for all of them: a client of its own per fetch would build an
    SSL context each time, on the event loop. Connections are not capped by the client (a few slow hosts must not
    queue other downloads behind them): admission control bounds the requests."""
    import httpx

    return httpx.AsyncClient(limits=httpx.Limits(max_connections=None, max_keepalive_connections=20))
