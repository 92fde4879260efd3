"""QLoRA: adapters in float32 over an NF4 base (bitsandbytes) compute what peft computes over transformers'
`BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4")` model: the same greedy tokens, and the
sampled tokens' log-probabilities within 5e-5 (the same function; only the order of float sums differs)."""

from __future__ import annotations

import pytest
import torch
from peft_reference import PROMPTS, SHAPES, greedy_ids, peft_greedy

from loomserve import LLM, LoRARequest, SamplingParams

pytest.importorskip("bitsandbytes")

MAX_TOKENS = 10
LOGPROB_TOLERANCE = 5e-5
GREEDY = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True, logprobs=0)


def nf4_model(path: str):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    return AutoModelForCausalLM.from_pretrained(path, quantization_config=quant, dtype=torch.float32,
                                                device_map="cpu")


def peft_reference(model, base: str, adapter: str) -> tuple[list[list[int]], list[list[float]]]:
    """Greedy tokens and their log-probabilities from peft over `model`, prompt by prompt."""
    from peft import PeftModel
    from transformers import AutoTokenizer

    peft_model = PeftModel.from_pretrained(model, adapter).eval()
    tok = AutoTokenizer.from_pretrained(base)
    tokens, logprobs = [], []
    with torch.no_grad():
        for prompt in PROMPTS:
            ids = tok(prompt, return_tensors="pt").input_ids
            gen = peft_model.generate(input_ids=ids, max_new_tokens=MAX_TOKENS, min_new_tokens=MAX_TOKENS,
                                      do_sample=False, output_logits=True, return_dict_in_generate=True)
            new = gen.sequences[0, ids.shape[1] :]
            scores = torch.stack(gen.logits)[:, 0].float().log_softmax(-1)  # [steps, vocab], raw logits
            tokens.append(new.tolist())
            logprobs.append(scores.gather(1, new[:, None])[:, 0].tolist())
    return tokens, logprobs


def engine_run(llm: LLM, lora: LoRARequest) -> tuple[list[list[int]], list[list[float]]]:
    outputs = [o.outputs[0] for o in llm.generate(PROMPTS, GREEDY, lora_request=lora)]
    return [o.token_ids for o in outputs], [[lp[t].logprob for lp, t in zip(o.logprobs, o.token_ids)]
                                            for o in outputs]


@pytest.fixture(scope="module")
def adapter(qwen2_checkpoint, make_lora) -> str:
    return make_lora(qwen2_checkpoint, "all-r16", seed=2, **SHAPES["all-r16"])


def test_qlora_equals_peft_over_the_same_nf4_base(qwen2_checkpoint, adapter):
    llm = LLM(qwen2_checkpoint, quantization="bitsandbytes", enable_lora=True, max_lora_rank=16, block_size=4,
              kv_cache_memory="32MiB")
    qkv = llm.engine.executor.runner.model.model.layers[0].self_attn.qkv_proj.base_layer
    assert [type(s).__name__ for s in qkv.shards] == ["Linear4bit"] * 3 and qkv.shards[0].weight.dtype == torch.uint8
    tokens, logprobs = engine_run(llm, LoRARequest("a", 1, adapter))
    ref_tokens, ref_logprobs = peft_reference(nf4_model(qwen2_checkpoint), qwen2_checkpoint, adapter)
    assert tokens == ref_tokens
    for got, ref in zip(logprobs, ref_logprobs):
        assert got == pytest.approx(ref, abs=LOGPROB_TOLERANCE)
    assert tokens != [ids[:MAX_TOKENS] for ids in peft_greedy(qwen2_checkpoint, adapter)]  # NF4 changed the base


def test_a_checkpoint_saved_in_4bit_serves_its_own_nf4_weights(qwen2_checkpoint, adapter, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    nf4_model(qwen2_checkpoint).save_pretrained(tmp_path)
    AutoTokenizer.from_pretrained(qwen2_checkpoint).save_pretrained(tmp_path)
    path = str(tmp_path)
    llm = LLM(path, enable_lora=True, max_lora_rank=16, block_size=4, kv_cache_memory="32MiB")
    assert llm.config.model_config.quantization == "bitsandbytes"  # read from the checkpoint
    reloaded = AutoModelForCausalLM.from_pretrained(path, device_map="cpu")
    base_ref = greedy_ids(reloaded, path, tuple(PROMPTS), MAX_TOKENS)
    assert [o.outputs[0].token_ids for o in llm.generate(PROMPTS, GREEDY)] == base_ref
    tokens, logprobs = engine_run(llm, LoRARequest("a", 1, adapter))
    # A fresh reload: a bitsandbytes model that has run a forward on CPU gives peft other results on top of it.
    reloaded = AutoModelForCausalLM.from_pretrained(path, device_map="cpu")
    ref_tokens, ref_logprobs = peft_reference(reloaded, path, adapter)
    assert tokens == ref_tokens
    for got, ref in zip(logprobs, ref_logprobs):
        assert got == pytest.approx(ref, abs=LOGPROB_TOLERANCE)
