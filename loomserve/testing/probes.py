"""Probes of a live server for the hardening tests and benchmarks: how long /health takes to answer while some
other work (a large request) runs, and the processes and IPC folders a server leaves behind."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.parse
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

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
    time.sleep(interval)
print(json.dumps(latencies))
"""


def health_latencies(url: str, work: Callable[[], T], interval_s: float = 0.02) -> tuple[T, list[float]]:
    """(what `work()` returned, the seconds each /health took) with /health asked every `interval_s` (from another
    process) while `work` ran here; a /health that failed or answered other than 200 counts as infinitely slow."""
    where = urllib.parse.urlsplit(url)
    poller = subprocess.Popen([sys.executable, "-c", _POLLER, where.hostname, str(where.port), str(interval_s)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE)
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
