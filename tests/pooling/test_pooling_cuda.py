"""On CUDA (Triton attention, CUDA graphs, async scheduling: the engine's defaults there), pooling
requests interleaved with generation give transformers' outputs (float32). A step of decodes and a one-token
pooling request needs hidden states of its own, so it runs eagerly instead of replaying a graph.
Encoders (no KV cache, no graphs) give the CPU engine's outputs."""

from __future__ import annotations

import pytest
import torch
from test_encoders import DOCUMENTS, QUERY
from test_shared_engine import check_outputs, path, run_interleaved

from loomserve import LLM
from loomserve.testing.pooling_checkpoints import tiny_encoder

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def cuda_llm(**engine_args) -> LLM:
    llm = LLM(path(), device="cuda", dtype="float32", block_size=4, kv_cache_memory="64MiB", **engine_args)
    assert llm.config.async_scheduling and llm.engine.executor.runner.cuda_graphs is not None
    return llm


def test_embeddings_interleaved_with_generation_on_cuda_equal_transformers():
    tokens, pooled, overlapped = run_interleaved(cuda_llm(max_num_batched_tokens=16))
    check_outputs(tokens, pooled)
    assert overlapped > 0


def test_one_token_pooling_request_beside_decodes_runs_eagerly():
    llm = cuda_llm()
    graphs = llm.engine.executor.runner.cuda_graphs
    replays = []  # sequences in each replayed step
    for name in ("run_decode", "run_mixed"):
        run = getattr(graphs, name)
        setattr(graphs, name, lambda *args, run=run: replays.append(args[1].attn.num_seqs) or run(*args))
    arrivals = {0: ["g0"], 3: ["e1"]}  # "a" is one token: it joins g0's decodes
    tokens, pooled, _ = run_interleaved(llm, arrivals)
    check_outputs(tokens, pooled, arrivals)
    assert replays and max(replays) == 1  # g0's steps alone replay graphs; the step with e1 did not


def test_encoders_on_cuda_equal_the_cpu_engine():
    """BERT embeddings and cross-encoder scores (segment ids, no KV cache) on CUDA with async scheduling."""
    embedder, cross_encoder = str(tiny_encoder("bert")), str(tiny_encoder("bert", head="classify"))

    def run(device: str) -> tuple[torch.Tensor, list[float]]:
        vectors = [o.outputs.embedding for o in LLM(embedder, device=device, dtype="float32").embed(DOCUMENTS)]
        llm = LLM(cross_encoder, device=device, dtype="float32")
        return torch.tensor(vectors), [o.outputs.score for o in llm.score(QUERY, DOCUMENTS)]

    (cpu_vectors, cpu_scores), (cuda_vectors, cuda_scores) = run("cpu"), run("cuda")
    assert torch.allclose(cuda_vectors, cpu_vectors, atol=1e-5)
    assert cuda_scores == pytest.approx(cpu_scores, abs=1e-5)
