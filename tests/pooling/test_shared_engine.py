"""Pooling requests share the engine with generation: interleaved in the same steps, both stay equal to
transformers, and every KV block is free once they finish."""

from __future__ import annotations

import torch
from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

from loomserve import LLM, SamplingParams
from loomserve.platform.messages import EngineCoreRequest
from loomserve.pooling.wire import tensor_from_wire
from loomserve.tiny_checkpoints import tiny_checkpoint

GENERATE = ["hello world", "café naïve 日本語 and some more words so that this prompt crosses several blocks"]
EMBED = ["the cat sat on the mat and then it", "a", "Once upon a time, there was a little girl who lived in a village"]
MAX_TOKENS = 12


def test_embeddings_interleaved_with_generation_leave_both_correct():
    path = str(tiny_checkpoint("qwen3"))
    tokenizer = AutoTokenizer.from_pretrained(path)
    lm = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    base = AutoModel.from_pretrained(path, dtype=torch.float32)
    # A small step budget chunks the long prompts, so prefill chunks, decodes and pooling share steps.
    llm = LLM(path, block_size=4, kv_cache_memory="8MiB", max_num_batched_tokens=16)
    engine = llm.engine
    greedy = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
    pooling = llm.config.model_config.pooler_config.resolve(None)  # LAST, normalized
    arrivals = {0: [("g0", GENERATE[0]), ("e0", EMBED[0])], 2: [("e1", EMBED[1]), ("g1", GENERATE[1])],
                5: [("e2", EMBED[2])]}
    tokens: dict[str, list[int]] = {"g0": [], "g1": []}
    pooled = {}
    step = 0
    while step < 6 or engine.has_requests():
        for request_id, text in arrivals.get(step, []):
            ids = tokenizer.encode(text)
            if request_id.startswith("g"):
                engine.add_request(llm.input_processor.engine_request(request_id, ids, greedy))
            else:
                engine.add_request(EngineCoreRequest(request_id, ids, None, None, 0.0, pooling_params=pooling))
        for out in engine.step().outputs:
            if out.pooled is not None:
                pooled[out.request_id] = tensor_from_wire(out.pooled)
            else:
                tokens[out.request_id] += out.new_token_ids
        step += 1
    for request_id, text in zip(("g0", "g1"), GENERATE):
        ids = tokenizer(text, return_tensors="pt").input_ids
        want = lm.generate(ids, max_new_tokens=MAX_TOKENS, min_new_tokens=MAX_TOKENS, do_sample=False)
        assert tokens[request_id] == want[0, ids.shape[1]:].tolist()
    for request_id, text in zip(("e0", "e1", "e2"), EMBED):
        hidden = base(**tokenizer(text, return_tensors="pt")).last_hidden_state[0, -1]
        assert torch.allclose(pooled[request_id], torch.nn.functional.normalize(hidden, dim=-1), atol=1e-5)
    assert engine.scheduler.kv.pool.num_free_blocks == engine.scheduler.kv.pool.num_blocks
