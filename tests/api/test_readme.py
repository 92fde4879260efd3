"""The README's snippets work as written: its `loomserve serve` command lines are valid, and its client snippets run
against a live server (with the server's address and the names of the models it serves in place of the README's)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
from pooling_models import CROSS_ENCODER

from loomserve.api.cli import make_parser
from loomserve.demo import DEMO_EMBEDDING_NAME, DEMO_NAME

README = (Path(__file__).resolve().parents[2] / "README.md").read_text()


def code_blocks(language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", README, flags=re.S | re.M)


def serve_commands() -> list[str]:
    """Each `loomserve serve ...` line of the bash blocks, continuation lines joined."""
    joined = "\n".join(code_blocks("bash")).replace("\\\n", " ")
    return [line[line.index("loomserve serve"):].split("&&")[0] for line in joined.splitlines()
            if "loomserve serve" in line]


@pytest.mark.parametrize("command", serve_commands())
def test_a_readme_serve_command_is_valid(command, tmp_path):
    argv = []
    for arg in shlex.split(command)[1:]:  # the folders and files it names exist on the reader's machine
        name, sep, path = arg.rpartition("=")
        if path.startswith(("/", "./")):
            made = tmp_path / path.lstrip("./")
            made.parent.mkdir(parents=True, exist_ok=True)
            made.write_text("{{ messages }}") if made.suffix else made.mkdir(exist_ok=True)
            if path.startswith("/adapters/"):
                (made / "adapter_config.json").write_text("{}")
            arg = f"{name}{sep}{made}"
        argv.append(arg)
    make_parser().parse_args(argv)


def test_the_readme_client_snippets_run_against_a_server(pooling_server, capsys):
    first, second = (block for block in code_blocks("python") if "client" in block and "image_url" not in block)
    names = {"http://127.0.0.1:8000/v1": f"{pooling_server.url}/v1", "Qwen/Qwen2.5-0.5B-Instruct": DEMO_NAME,
             '"minilm"': f'"{DEMO_EMBEDDING_NAME}"', '"reranker"': f'"{CROSS_ENCODER}"'}
    code = first + second
    for readme_name, served in names.items():
        code = code.replace(readme_name, served)
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)  # noqa: S102 - the README's own code
    assert namespace["reply"].choices[0].message.content is not None
