"""A user's mistake ends `loomserve serve` early: one line on stderr, a non-zero exit, no traceback, before any
model loads."""

from __future__ import annotations

import json
import socket
import time

import pytest
import torch

from loomserve.api.cli import main

NO_GPU = pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")


def run_cli(capsys: pytest.CaptureFixture, *argv: str) -> tuple[int, list[str], float]:
    """`loomserve ARGV` in this process: its exit code, its stderr lines and the seconds it took."""
    start = time.perf_counter()
    with pytest.raises(SystemExit) as exited:
        main(list(argv))
    lines = capsys.readouterr().err.strip().splitlines()
    return exited.value.code, lines, time.perf_counter() - start


@pytest.fixture
def offline_hub(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))


MISTAKES = [
    # (flags after `serve MODEL`, the model (None: the tiny checkpoint), exit code, what the line says)
    ([], "/no/such/checkpoint", 1, "no checkpoint folder at '/no/such/checkpoint'"),
    ([], "someone/not-downloaded", 1, "not in the Hugging Face cache, and HF_HUB_OFFLINE is set"),
    (["--device", "tpu"], None, 1, "unknown device 'tpu'"),
    (["--block-size", "7"], None, 1, "block_size must be a power of two"),
    (["--limit-mm-per-prompt", "{imag"], None, 1, "limit_mm_per_prompt is not valid JSON"),
    (["--limit-mm-per-prompt", '{"imag": 2}'], None, 1, "unknown modality 'imag'"),
    (["--max-model-len", "lots"], None, 1, "cannot read a context length from 'lots'"),
    (["--max-model-len", "1M"], None, 1, "exceeds the model's context"),
    (["--calculate-kv-scales"], None, 1, "calculate_kv_scales sets the scales of an fp8 KV cache"),
    (["--kv-cache-dtype", "int8"], None, 2, "invalid choice: 'int8'"),
    (["--generation-config", "auto"], None, 1, "generation_config 'auto' is not supported yet"),
    (["-tp", "3"], None, 1, "is not divisible by the tensor-parallel size 3"),
    (["--speculative-config", '{"method": "ngram"}'], None, 1, "speculative_config needs"),
    (["--speculative-config", '{"method": "eagle3", "model": "/no/head", "num_speculative_tokens": 3}'], None, 1,
     "no checkpoint folder at '/no/head'"),
    (["--lora-modules", "sql=/adapters/sqll", "--enable-lora"], None, 2, "no adapter folder at '/adapters/sqll'"),
    (["--lora-modules", "sql=/tmp", "--enable-lora"], None, 2, "'/tmp' has no adapter_config.json"),
    (["--chat-template", "/no/template.jinja"], None, 2, "no chat template file at '/no/template.jinja'"),
    (["--ssl-keyfile", "/no/key.pem"], None, 2, "no such file: /no/key.pem"),
    (["--allowed-origins", "https://a.org"], None, 2, "expected a JSON list"),
    (["--port", "70000"], None, 2, "a port is 0-65535"),
    (["--max-num-seqs", "many"], None, 2, "invalid int value: 'many'"),
    (["--no-such-flag"], None, 2, "unrecognized arguments: --no-such-flag"),
    (["--task", "translate"], None, 2, "invalid choice: 'translate'"),
]


@pytest.mark.parametrize(("flags", "model", "code", "says"), MISTAKES,
                         ids=[" ".join(m[0]) or m[1] for m in MISTAKES])
def test_a_mistake_is_one_line_and_an_exit_code(capsys, offline_hub, monkeypatch, qwen2_checkpoint, flags, model,
                                                code, says):
    monkeypatch.setattr("loomserve.api.launch._run", _must_not_start)
    exit_code, lines, seconds = run_cli(capsys, "serve", model or qwen2_checkpoint, "--port", "0", *flags)
    assert exit_code == code
    assert len(lines) == 1, lines
    assert says in lines[0]
    assert lines[0].startswith(("loomserve: error:", "loomserve serve: error:"))
    assert seconds < 10  # nothing loads


def _must_not_start(*args: object) -> None:
    raise AssertionError("a mistake reached the engines' start")


@NO_GPU
def test_device_cuda_without_a_gpu_is_one_line(capsys, qwen2_checkpoint):
    exit_code, lines, _ = run_cli(capsys, "serve", qwen2_checkpoint, "--device", "cuda")
    assert (exit_code, len(lines)) == (1, 1)
    assert "no CUDA GPU is visible here" in lines[0]


def test_a_busy_port_is_reported_before_any_model_loads(capsys, monkeypatch, qwen2_checkpoint):
    monkeypatch.setattr("loomserve.api.launch._run", _must_not_start)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        exit_code, lines, _ = run_cli(capsys, "serve", qwen2_checkpoint, "--port", str(port))
    assert (exit_code, len(lines)) == (1, 1)
    assert f"cannot listen on 127.0.0.1:{port}: the address is already in use" in lines[0]


def test_debug_logging_shows_the_traceback(capsys, monkeypatch, qwen2_checkpoint):
    monkeypatch.setenv("LOOMSERVE_LOGGING_LEVEL", "info")  # restored after the CLI sets it
    exit_code, lines, _ = run_cli(capsys, "serve", qwen2_checkpoint, "--block-size", "7", "--log-level", "debug")
    assert exit_code == 1
    assert lines[-1].startswith("loomserve: error: block_size must be a power of two")
    assert "--log-level debug shows the traceback" not in lines[-1]


def test_version_prints_the_package_version(capsys):
    from loomserve import __version__

    with pytest.raises(SystemExit) as exited:
        main(["--version"])
    assert exited.value.code == 0
    assert capsys.readouterr().out.strip() == f"loomserve {__version__}"


def test_allowed_origins_read_a_json_list():
    from loomserve.api.cli import make_parser

    ns = make_parser().parse_args(["serve", "m", "--allowed-origins", json.dumps(["https://a.org"])])
    assert ns.allowed_origins == ["https://a.org"]


def test_startup_adapters_need_enable_lora(capsys, monkeypatch, qwen2_checkpoint, tmp_path):
    monkeypatch.setattr("loomserve.api.launch._run", _must_not_start)
    (tmp_path / "adapter_config.json").write_text("{}")
    exit_code, lines, _ = run_cli(capsys, "serve", qwen2_checkpoint, "--lora-modules", f"sql={tmp_path}")
    assert (exit_code, len(lines)) == (1, 1)
    assert "--lora-modules needs --enable-lora" in lines[0]
