"""`loomserve serve` tells the truth while it starts, serves and stops: a line per model as it loads, its KV cache,
"Ready" only once it answers, a periodic stats line while serving, and a quiet, prompt exit on Ctrl-C or SIGTERM."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import httpx
import pytest

from loomserve.testing.server import Server


def test_start_up_lines_come_in_order_and_stats_are_logged_while_serving(tmp_path, qwen2_checkpoint):
    env = {**os.environ, "LOOMSERVE_LOG_STATS_INTERVAL": "0.5"}
    server = Server(qwen2_checkpoint, ["--served-model-name", "tiny", "alias", "--kv-cache-memory", "4MiB",
                                       "--enable-log-requests"], tmp_path / "server.log", env)
    with server.running():
        reply = httpx.post(f"{server.url}/v1/completions", json={"model": "alias", "prompt": "hi", "max_tokens": 4})
        assert reply.json()["model"] == "tiny"
        time.sleep(1.5)
    log = server.log_path.read_text()
    order = [log.index(line) for line in ("Loading tiny from", "tiny: KV cache of", "Ready: serving tiny at http://")]
    assert order == sorted(order)
    assert re.search(r"Received request \S+: \d+ prompt tokens", log)
    assert re.search(r"tiny: prompt throughput [\d.]+ tokens/s, generation throughput [\d.]+ tokens/s, finished 1 "
                     r"requests, running 0, waiting 0, KV cache [\d.]+% used", log)
    assert "Traceback" not in log
    assert server.process.returncode == 130  # Ctrl-C (the helper's SIGINT): uvicorn's graceful stop, then quiet


@pytest.mark.parametrize(("sig", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)], ids=["ctrl-c", "sigterm"])
def test_a_stop_signal_while_loading_exits_quietly_and_promptly(tmp_path, qwen2_checkpoint, sig, code):
    log_path = tmp_path / "server.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen([sys.executable, "-m", "loomserve", "serve", qwen2_checkpoint, "--port", "0"],
                                   stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while "Loading" not in log_path.read_text() and time.monotonic() < deadline:
            time.sleep(0.1)
        os.killpg(process.pid, sig)  # as a terminal's Ctrl-C does: to the server and the engine it started
        assert process.wait(15) == code, log_path.read_text()[-4000:]  # the log says how it ended otherwise
    finally:
        os.killpg(process.pid, signal.SIGKILL) if process.poll() is None else None
    assert "Traceback" not in log_path.read_text()
