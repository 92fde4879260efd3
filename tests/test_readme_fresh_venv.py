"""The README works as written on a fresh machine: in a new virtualenv (pip and nothing else), its install commands
install loomserve, its `loomserve serve` serves the embedded default, and its client snippets — after the
README's `pip install openai` — run against that server with that virtualenv's Python.

Installing takes minutes, so this runs only with LOOMSERVE_TEST_FRESH_VENV=1: `.ci/run` runs it after the suite."""

from __future__ import annotations

import os
import re
import subprocess
import venv
from pathlib import Path

import pytest

from loomserve.demo import DEMO_EMBEDDING_NAME, DEMO_NAME
from loomserve.testing.server import Server

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()

pytestmark = pytest.mark.skipif(os.environ.get("LOOMSERVE_TEST_FRESH_VENV") != "1",
                                reason="installs into a fresh virtualenv (minutes); LOOMSERVE_TEST_FRESH_VENV=1")


def serve_line() -> list[str]:
    """The README's first command line (install, then serve the default), split at its `&&`s."""
    first_block = re.search(r"^```bash\n(.*?)^```", README, flags=re.S | re.M).group(1)
    line = next(line for line in first_block.splitlines() if "loomserve serve" in line)
    return [step.strip() for step in line.split("&&")]


def client_snippets() -> str:
    """The README's chat and pooling client snippets, pointed at `{url}` and the default's model names."""
    first, second = (b for b in re.findall(r"^```python\n(.*?)^```", README, flags=re.S | re.M)
                     if "client" in b and "image_url" not in b)
    code = first + second + "\nprint('reply:', reply.choices[0].message.content is not None)\n"
    for readme_name, served in {"Qwen/Qwen2.5-0.5B-Instruct": DEMO_NAME, '"minilm"': f'"{DEMO_EMBEDDING_NAME}"',
                                '"reranker"': f'"{DEMO_EMBEDDING_NAME}"'}.items():
        code = code.replace(readme_name, served)
    return code


def run_in(env_dir: Path, command: str) -> None:
    """A README shell command with the virtualenv activated (its bin first on PATH), from the checkout."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env.update(VIRTUAL_ENV=str(env_dir), PATH=f"{env_dir / 'bin'}{os.pathsep}{env['PATH']}")
    done = subprocess.run(command, shell=True, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, f"`{command}` failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"


def test_the_readme_installs_serves_and_answers_its_snippets_in_a_fresh_virtualenv(tmp_path):
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    *installs, serve = serve_line()
    assert serve == "loomserve serve" and all(step.startswith("pip install") for step in installs)
    for step in installs:
        run_in(env_dir, step)
    run_in(env_dir, re.search(r"`(pip install openai)`", README).group(1))
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    server = Server(None, [], tmp_path / "server.log", env=env, program=[str(env_dir / "bin" / "loomserve")])
    with server.running():
        script = tmp_path / "snippets.py"
        script.write_text(client_snippets().replace("http://127.0.0.1:8000/v1", f"{server.url}/v1"))
        done = subprocess.run([str(env_dir / "bin" / "python"), str(script)], env=env, capture_output=True,
                              text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "reply: True" in done.stdout
