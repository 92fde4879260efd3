"""The Ray executor: two tensor-parallel ranks as Ray actors on a local Ray instance (started by the executor, gloo on
the CPU) decode what one process decodes, token for token: transformers' greedy output, which one rank equals
(test_engine_greedy)."""

from __future__ import annotations

import sys

import pytest
from test_engine_greedy import GREEDY, PROMPTS, reference, token_ids

from loomserve import LLM
from loomserve.platform.config import EngineArgs

ray = pytest.importorskip("ray")


@pytest.fixture(scope="module")
def ray_llm(qwen2_checkpoint):
    assert not ray.is_initialized()  # the executor starts its own
    llm = LLM(qwen2_checkpoint, device="cpu", block_size=4, kv_cache_memory="8MiB", tensor_parallel_size=2,
              distributed_executor_backend="ray")
    yield llm
    llm.engine.shutdown()
    ray.shutdown()


def test_two_ranks_as_ray_actors_decode_what_one_process_decodes(ray_llm, qwen2_checkpoint):
    assert ray.is_initialized() and len(ray_llm.engine.executor.ranks) == 2
    assert token_ids(ray_llm.generate(PROMPTS, GREEDY)) == reference(qwen2_checkpoint)


def test_a_ray_actor_that_dies_fails_the_next_step_at_once(ray_llm):
    """Last in the module: it kills rank 1 of the shared engine."""
    ray.kill(ray_llm.engine.executor.actors[1])
    with pytest.raises(RuntimeError, match="the runner process died"):
        ray_llm.generate("hello", GREEDY)


def test_ray_backend_without_ray_installed_is_refused_with_how_to_install(qwen2_checkpoint, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # what an environment without Ray finds
    with pytest.raises(ValueError, match=r"needs Ray: pip install 'loomserve\[ray\]'"):
        EngineArgs(qwen2_checkpoint, device="cpu", tensor_parallel_size=2,
                   distributed_executor_backend="ray").create_engine_config()
