"""Probes of a live server for the hardening tests and benchmarks: how long /health takes to answer while some
other work (a large request) runs, whether a process is still there, a decompression-bomb PNG, and a media host
that drips its bytes."""

from __future__ import annotations

import contextlib
import http.server
import io
import json
import subprocess
import sys
import threading
import urllib.parse
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

from PIL import Image

T = TypeVar("T")


# The poller runs in a process of its own: in this one, the client of the large request (httpx parses HTTP in
# Python) would compete with it for the GIL, and its own delays would count as the server's.
_POLLER = """
import http.client, json, select, sys, time
host, port, interval = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
latencies, conn = [], http.client.HTTPConnection(host, port, timeout=30)
while not select.select([sys.stdin], [], [], 0)[0]:  # until the parent closes our stdin
    t0 = time.perf_counter()
    try:
        conn.request("GET", "/health")
        response = conn.getresponse()
        response.read()
        latencies.append(time.perf_counter() - t0 if response.status == 200 else float("inf"))
    except OSError:
        latencies.append(float("inf"))
        conn = http.client.HTTPConnection(host, port, timeout=30)
    if len(latencies) == 1:
        print("polling", flush=True)  # the parent starts its work now
    time.sleep(interval)
print(json.dumps(latencies))
"""


def health_latencies(url: str, work: Callable[[], T], interval_s: float = 0.02) -> tuple[T, list[float]]:
    """(what `work()` returned, the seconds each /health took) with /health asked every `interval_s` (from another
    process) while `work` ran here; a /health that failed or answered other than 200 counts as infinitely slow."""
    where = urllib.parse.urlsplit(url)
    poller = subprocess.Popen([sys.executable, "-c", _POLLER, where.hostname, str(where.port), str(interval_s)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    poller.stdout.readline()  # /health answered once: the poller is running
    try:
        result = work()
    finally:
        out, _ = poller.communicate(b"")
    return result, json.loads(out)


def process_exists(pid: int) -> bool:
    """Whether `pid` is a live process (a zombie, dead but not yet reaped, counts as gone)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][0] != "Z"
    except (FileNotFoundError, IndexError):
        return False


def blank_png(side: int) -> bytes:
    """A side x side grayscale PNG of zeros: tens of kilobytes that decode to side² bytes (a decompression bomb)."""
    buffer = io.BytesIO()
    Image.new("L", (side, side)).save(buffer, format="PNG")
    return buffer.getvalue()


@contextlib.contextmanager
def media_host(files: dict[str, bytes], drip_interval_s: float = 0.5) -> Iterator[str]:
    """An HTTP server on 127.0.0.1 serving `files` by path, and /drip: a body promised 1 MB long that comes one byte
    every `drip_interval_s` (a slow or hostile media host). Yields its base URL."""
    stop = threading.Event()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = files.get(self.path)
            if body is None and self.path != "/drip":
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Length", str(len(body) if body is not None else 1 << 20))
            self.end_headers()
            if body is not None:
                self.wfile.write(body)
                return
            while not stop.wait(drip_interval_s):
                try:
                    self.wfile.write(b"x")
                    self.wfile.flush()
                except OSError:  # the server gave up on us
                    return

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        stop.set()
        server.shutdown()
        thread.join()
