"""Media references from chat content parts, and fetching their bytes under the server's allow-lists.

`data:` URLs are decoded in place; `http(s)` URLs are fetched only from hosts in `allowed_media_domains`
(redirects are not followed, so an allowed host cannot bounce the fetch elsewhere), with a timeout and a
size cap; `file://` URLs and plain paths only resolve inside `allowed_local_media_path` (after following
symlinks). Anything else raises `MediaError`, whose message is safe to show the client.
"""

from __future__ import annotations

import base64
import binascii
import os
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

from loomserve.modalities.config import MultiModalConfig


class MediaError(ValueError):
    """Media that cannot be used: bad URL, not allowed, too big, undecodable. The message says why."""


@dataclass(frozen=True)
class MediaRef:
    """One media part of a message, not yet loaded: a URL (data:, http(s), file) or inline base64 data."""

    modality: str  # "image" | "video" | "audio"
    url: str | None = None
    data: str | None = None  # base64 (input_audio parts)
    format: str | None = None  # input_audio's "wav", "mp3", ...


class MediaFetcher:
    def __init__(self, config: MultiModalConfig) -> None:
        self.config = config

    def read(self, ref: MediaRef) -> bytes:
        """The encoded bytes behind a reference."""
        if ref.data is not None:
            return self._b64(ref.data)
        url = ref.url or ""
        scheme = urllib.parse.urlsplit(url).scheme.lower()
        if scheme == "data":
            return self._data_url(url)
        if scheme in ("http", "https"):
            return self._http(url)
        if scheme == "file" or (scheme == "" and url):
            return self._file(url)
        raise MediaError(f"unsupported media URL scheme {scheme!r}: use data:, http(s): or file: URLs")

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
        if header.endswith(";base64"):
            return self._b64(payload)
        raw = urllib.parse.unquote_to_bytes(payload)
        self._check_size(len(raw))
        return raw

    def _http(self, url: str) -> bytes:
        host = (urllib.parse.urlsplit(url).hostname or "").lower()
        allowed = [d.lower().strip(".") for d in self.config.allowed_media_domains or []]
        if not any(host == d or host.endswith("." + d) for d in allowed):
            if not allowed:
                raise MediaError("fetching media from http(s) URLs is disabled on this server "
                                 "(start it with --allowed-media-domains)")
            raise MediaError(f"the media host {host!r} is not in the server's allowed media domains")
        import httpx

        chunks, size = [], 0
        try:
            with httpx.stream("GET", url, timeout=self.config.media_fetch_timeout, follow_redirects=False) as resp:
                if resp.status_code != 200:
                    raise MediaError(f"fetching the media URL answered HTTP {resp.status_code}")
                for chunk in resp.iter_bytes():
                    size += len(chunk)
                    self._check_size(size)
                    chunks.append(chunk)
        except httpx.HTTPError as exc:
            raise MediaError(f"fetching the media URL failed: {type(exc).__name__}") from None
        return b"".join(chunks)

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
