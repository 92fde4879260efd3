"""LoRA adapters on vision-language models: an image request under an adapter equals peft over transformers,
sharing its batch with a base-model image request and a text-only adapter request (on CPU, and on CUDA with
the Triton kernels in decode CUDA graphs with M-RoPE positions); prefix-cache keys tell adapters and images
apart; adapters reach the language model only, so one that also adapts the vision tower is refused; pooling
requests share the engine's steps with both."""

from __future__ import annotations

import copy

import pytest
import torch
from media_samples import noise_image
from mm_reference import MAX_TOKENS, hf_greedy, hf_model, ids_of, image_prompt
from transformers import AutoConfig

from loomserve import LLM, LoRARequest, PoolingParams, SamplingParams
from loomserve.platform.messages import EngineCoreRequest

GREEDY = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, min_tokens=MAX_TOKENS)
IMAGE = noise_image(56, 56, seed=11)
LM_PROJECTIONS = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
TEXT = "<|im_start|>user\nTell me a story.<|im_end|>\n<|im_start|>assistant\n"


def peft_adapter(path: str, folder, seed: int, target_modules) -> torch.nn.Module:
    """peft's model over the checkpoint with a seeded adapter (B not zero), saved into `folder`."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    config = LoraConfig(init_lora_weights=False, r=8, lora_alpha=16, target_modules=target_modules)
    model = get_peft_model(copy.deepcopy(hf_model(path)), config).eval()
    model.save_pretrained(folder)
    return model


@pytest.fixture(scope="module")
def qwen2_vl_lora(mm_checkpoint, tmp_path_factory):
    """(checkpoint, LoRARequest, peft model) of an adapter on Qwen2-VL's language model."""
    path = mm_checkpoint("qwen2_vl")
    folder = tmp_path_factory.mktemp("mm-lora") / "lm"
    peft_model = peft_adapter(path, folder, seed=7, target_modules=LM_PROJECTIONS)
    return path, LoRARequest("lm", 1, str(folder)), peft_model


def mixed_batch(llm: LLM, path: str, lora: LoRARequest) -> list[list[int]]:
    """An image request under the adapter, the same one on the base model, a text request under the adapter."""
    image = {"prompt_token_ids": ids_of(path, image_prompt("qwen2_vl", 1)), "multi_modal_data": {"image": IMAGE}}
    outputs = llm.generate([image, image, {"prompt_token_ids": ids_of(path, TEXT)}], GREEDY,
                           lora_request=[lora, None, lora])
    return [o.outputs[0].token_ids for o in outputs]


def references(path: str, peft_model: torch.nn.Module) -> list[list[int]]:
    image_ids = ids_of(path, image_prompt("qwen2_vl", 1))
    return [hf_greedy(path, image_ids, images=[IMAGE], model=peft_model), hf_greedy(path, image_ids, images=[IMAGE]),
            hf_greedy(path, ids_of(path, TEXT), model=peft_model)]


def test_image_request_with_an_adapter_equals_peft(qwen2_vl_lora):
    path, lora, peft_model = qwen2_vl_lora
    llm = LLM(path, device="cpu", enable_lora=True, block_size=4, kv_cache_memory="8MiB")
    adapted, base, text = mixed_batch(llm, path, lora)
    assert [adapted, base, text] == references(path, peft_model)
    assert adapted != base  # the adapter really changes the output

    # The prefix cache keys every block with the adapter and the image blocks with the image's content hash.
    image_ids = ids_of(path, image_prompt("qwen2_vl", 1))
    again, other_image = llm.generate(
        [{"prompt_token_ids": image_ids, "multi_modal_data": {"image": image}}
         for image in (IMAGE, noise_image(56, 56, seed=12))], GREEDY, lora_request=lora,
    )
    assert again.num_cached_tokens > 0 and again.outputs[0].token_ids == adapted
    before_image = image_ids.index(AutoConfig.from_pretrained(path).image_token_id)
    assert 0 < other_image.num_cached_tokens <= before_image  # blocks before the image, under the same adapter


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_on_cuda_graphs_and_triton_kernels_equal_peft(qwen2_vl_lora):
    path, lora, peft_model = qwen2_vl_lora
    llm = LLM(path, device="cuda", dtype="float32", enable_lora=True, kv_cache_memory="64MiB",
              attention_backend="triton")
    runner = llm.engine.executor.runner
    assert runner.cuda_graphs is not None and runner.hook("lora").manager.state.backend == "triton"
    assert mixed_batch(llm, path, lora) == references(path, peft_model)


def test_adapter_on_the_vision_tower_is_refused(mm_checkpoint, tmp_path):
    path = mm_checkpoint("llava")
    peft_adapter(path, tmp_path / "all-qv", seed=8, target_modules=["q_proj", "v_proj"])  # CLIP's too
    llm = LLM(path, device="cpu", enable_lora=True, block_size=4, kv_cache_memory="8MiB")
    prompt = {"prompt_token_ids": ids_of(path, image_prompt("llava", 1)), "multi_modal_data": {"image": IMAGE}}
    with pytest.raises(ValueError, match="vision_tower"):
        llm.generate(prompt, GREEDY, lora_request=LoRARequest("all-qv", 1, str(tmp_path / "all-qv")))


def test_one_engine_steps_media_adapters_and_pooling_together(qwen2_vl_lora):
    """Pooling requests, with and without the adapter, share chunked steps with an image request under the adapter
    and a base text request; every output stays equal to transformers (peft for the adapter)."""
    path, lora, peft_model = qwen2_vl_lora
    llm = LLM(path, device="cpu", enable_lora=True, block_size=4, kv_cache_memory="8MiB", max_num_batched_tokens=16)
    engine = llm.engine
    engine.add_lora(lora)
    image_ids = ids_of(path, image_prompt("qwen2_vl", 1))
    _, expanded, items = llm.input_processor.process({"prompt_token_ids": image_ids,
                                                      "multi_modal_data": {"image": IMAGE}})
    make = llm.input_processor.engine_request
    engine.add_request(make("image", expanded, GREEDY, mm_items=items, lora_request=lora))
    engine.add_request(make("text", ids_of(path, TEXT), GREEDY))
    pooler = llm.config.model_config.pooler_config
    pooling = {"last": ("Once upon a time", lora, "LAST"), "mean": ("Tell me a story.", None, "MEAN")}
    for request_id, (text, adapter, pooling_type) in pooling.items():
        engine.add_request(EngineCoreRequest(request_id, ids_of(path, text), None, None, 0.0, lora_request=adapter,
                                             pooling_params=pooler.resolve(PoolingParams(pooling_type=pooling_type))))
    tokens, pooled, steps = {"image": [], "text": []}, {}, []
    while engine.has_requests():
        outputs = engine.step().outputs
        steps.append({out.request_id for out in outputs})
        for out in outputs:
            if out.pooled is None:
                tokens[out.request_id] += out.new_token_ids
            else:
                pooled[out.request_id] = out.pooled
    assert any({"image", "last"} <= step for step in steps)  # the image and a pooled output in one step
    assert tokens == {"image": hf_greedy(path, image_ids, images=[IMAGE], model=peft_model),
                      "text": hf_greedy(path, ids_of(path, TEXT))}
    for request_id, (text, adapter, pooling_type) in pooling.items():
        model = (peft_model.get_base_model() if adapter else hf_model(path)).model
        with torch.no_grad():
            hidden = model(input_ids=torch.tensor([ids_of(path, text)])).last_hidden_state[0]
        vector = hidden.mean(dim=0) if pooling_type == "MEAN" else hidden[-1]
        assert torch.allclose(pooled[request_id], torch.nn.functional.normalize(vector, dim=-1), atol=1e-5)
