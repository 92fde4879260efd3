"""Tensor parallelism across hosts: two "nodes" on the loopback, node 0 running the engine and rank 0, node 1 a
headless `loomserve serve --node-rank 1` running rank 1, decode what one process decodes, token for token (gloo):
transformers' greedy output, which one rank equals (test_engine_greedy)."""

from __future__ import annotations

import socket
import subprocess
import sys

import pytest
from test_engine_greedy import GREEDY, PROMPTS, reference, token_ids

from loomserve import LLM
from loomserve.platform.executor import _free_port

ENGINE = {"device": "cpu", "block_size": 4, "kv_cache_memory": "8MiB"}


def master_port() -> int:
    """A port free on the loopback whose next port (where node 0 takes the steps' connections) is free too."""
    while True:
        port = _free_port()
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port + 1))
                return port
            except OSError:
                continue


def test_ranks_on_two_nodes_decode_what_one_process_decodes(qwen2_checkpoint):
    port = master_port()
    nodes = {"tensor_parallel_size": 2, "nnodes": 2, "master_addr": "127.0.0.1", "master_port": port}
    flags = [f"--{name.replace('_', '-')}={value}" for name, value in {**ENGINE, **nodes}.items()]
    node1 = subprocess.Popen([sys.executable, "-m", "loomserve.api.cli", "serve", qwen2_checkpoint, *flags,
                              "--node-rank=1", "--headless"])
    try:
        llm = LLM(qwen2_checkpoint, **ENGINE, **nodes, node_rank=0)
        try:
            assert token_ids(llm.generate(PROMPTS, GREEDY)) == reference(qwen2_checkpoint)
        finally:
            llm.engine.shutdown()
        assert node1.wait(30) == 0  # the headless node ends with the engine
    finally:
        node1.kill()


def test_headless_node_zero_is_refused(qwen2_checkpoint, capsys):
    from loomserve.api.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["serve", qwen2_checkpoint, "--device=cpu", "--tensor-parallel-size=2", "--nnodes=2", "--headless"])
    assert exit_info.value.code != 0
    assert "--headless runs the ranks of a node other than 0" in capsys.readouterr().err


def test_an_engine_on_a_node_other_than_zero_is_refused(qwen2_checkpoint):
    with pytest.raises(ValueError, match=r"node 1 runs only its ranks \(`loomserve serve ... --headless`\)"):
        LLM(qwen2_checkpoint, **ENGINE, tensor_parallel_size=2, nnodes=2, node_rank=1)
