"""deploy/: the Dockerfiles, the compose example and the Kubernetes manifests parse, their commands are valid
`loomserve serve` command lines, probes and scrape annotations point at the server's routes, and the image's
entrypoint runs here (without a container runtime) until it says it is ready."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from loomserve.api.cli import make_parser
from loomserve.testing.server import free_port

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
DOCKERFILES = ["Dockerfile", "Dockerfile.cuda"]


def instructions(dockerfile: str) -> dict[str, str]:
    """The last of each instruction (continuation lines joined)."""
    text = re.sub(r"\\\n", " ", (DEPLOY / dockerfile).read_text())
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    return {line.split(None, 1)[0]: line.split(None, 1)[1] for line in lines}


def serve_flags(command: list[str], volumes: Path | None = None) -> list[str]:
    """`loomserve serve FLAGS...` -> FLAGS, with the environment's $(VAR) / ${VAR:-default} filled in and, with
    `volumes`, the container's /models and /adapters folders made under it (as the volume mounts provide them)."""
    assert command[:2] == ["loomserve", "serve"], command
    flags = [re.sub(r"\$\((\w+)\)|\$\{(\w+):-([^}]*)\}", "sk-test", arg) for arg in command[2:]]
    if volumes is None:
        return flags
    mounted = []
    for flag in flags:
        name, sep, path = flag.rpartition("=")
        if path.startswith(("/models/", "/adapters/")):
            (volumes / path.lstrip("/")).mkdir(parents=True, exist_ok=True)
            if path.startswith("/adapters/"):  # an adapter folder, as PEFT saves one
                (volumes / path.lstrip("/") / "adapter_config.json").write_text("{}")
            flag = f"{name}{sep}{volumes}{path}"
        mounted.append(flag)
    return mounted


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_the_dockerfile_entrypoint_is_a_valid_serve_command(dockerfile):
    steps = instructions(dockerfile)
    command = json.loads(steps["ENTRYPOINT"]) + json.loads(steps["CMD"])
    ns = make_parser().parse_args(["serve", *serve_flags(command)])
    assert (ns.host, ns.port) == ("0.0.0.0", int(steps["EXPOSE"]))
    assert "/health" in steps["HEALTHCHECK"]
    assert "torch==" in (DEPLOY / dockerfile).read_text()  # torch before the package, from the right index


def test_the_compose_services_parse_and_the_server_command_is_valid(tmp_path):
    compose = yaml.safe_load((DEPLOY / "docker-compose.yaml").read_text())
    service = compose["services"]["loomserve"]
    ns = make_parser().parse_args(["serve", *serve_flags(["loomserve", "serve", *service["command"]], tmp_path)])
    assert ns.served_model_name == ["chat"] and ns.embedding_model and ns.rerank_model and ns.enable_lora
    assert service["ports"] == [f"{ns.port}:{ns.port}"]
    assert "/health" in " ".join(service["healthcheck"]["test"])
    assert "loomserve:8000" in compose["configs"]["prometheus"]["content"]


def test_the_kubernetes_manifests_probe_health_and_are_scraped(tmp_path):
    deployment, service = (yaml.safe_load((DEPLOY / "k8s" / name).read_text())
                           for name in ("deployment.yaml", "service.yaml"))
    pod = deployment["spec"]["template"]
    container = pod["spec"]["containers"][0]
    ns = make_parser().parse_args(["serve", *serve_flags(["loomserve", "serve", *container["args"]], tmp_path)])
    assert container["ports"][0]["containerPort"] == ns.port
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"]["path"] == "/health"
    for notes in (pod["metadata"]["annotations"], service["metadata"]["annotations"]):
        assert notes["prometheus.io/scrape"] == "true"
        assert notes["prometheus.io/path"] == "/metrics"
        assert notes["prometheus.io/port"] == str(ns.port)
    assert deployment["spec"]["selector"]["matchLabels"] == service["spec"]["selector"]


def test_the_cpu_image_entrypoint_serves_here_and_stops_on_sigterm(tmp_path, qwen2_checkpoint):
    steps = instructions("Dockerfile")
    flags = serve_flags(json.loads(steps["ENTRYPOINT"]) + json.loads(steps["CMD"]))
    port = free_port()
    flags[flags.index("--port") + 1] = str(port)
    flags[flags.index("--host") + 1] = "127.0.0.1"  # the image listens on every interface; a test, on loopback
    env = {**os.environ, **dict(re.findall(r"(\w+)=(\S+)", steps["ENV"]))}
    env["LOOMSERVE_CACHE_DIR"] = env["HF_HOME"] = str(tmp_path)
    log_path = tmp_path / "server.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen([sys.executable, "-m", "loomserve", "serve", qwen2_checkpoint, *flags],
                                   stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while "Ready: serving" not in log_path.read_text() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert f"Ready: serving {qwen2_checkpoint} at http://127.0.0.1:{port}" in log_path.read_text()
        import httpx

        assert "swagger-ui-bundle.js" in httpx.get(f"http://127.0.0.1:{port}/docs").text  # offline docs
        assert httpx.get(f"http://127.0.0.1:{port}/docs-assets/swagger-ui.css").status_code == 200
        process.send_signal(signal.SIGTERM)
        assert process.wait(30) == 143
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    assert "Traceback" not in log_path.read_text()
