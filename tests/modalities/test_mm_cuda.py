"""On CUDA, multimodal models through the Triton backend, CUDA graphs (M-RoPE positions in decode graphs) and
async scheduling give the torch backend's greedy output."""

from __future__ import annotations

import pytest
import torch
from media_samples import noise_image, noise_video

from loomserve import LLM, SamplingParams

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

QWEN = "<|im_start|>user\n{}What is it?<|im_end|>\n<|im_start|>assistant\n"
PROMPTS = {
    "qwen2_vl": [
        {"prompt": QWEN.format("<|vision_start|><|image_pad|><|vision_end|>"),
         "multi_modal_data": {"image": noise_image(112, 84, 1)}},
        {"prompt": QWEN.format("<|vision_start|><|video_pad|><|vision_end|>"),
         "multi_modal_data": {"video": noise_video(4, 56, 84, 2)}},
        {"prompt": QWEN.format("")},
    ],
    "llava": [
        {"prompt": "USER: <image>\nWhat is it? ASSISTANT:", "multi_modal_data": {"image": noise_image(56, 56, 3)}},
        {"prompt": "USER: Hello? ASSISTANT:"},
    ],
}


def greedy_ids(path: str, prompts: list[dict], **engine_args) -> list[list[int]]:
    llm = LLM(path, device="cuda", dtype="float32", block_size=16, kv_cache_memory="64MiB", **engine_args)
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    return [o.outputs[0].token_ids for o in llm.generate(prompts, params)]


@pytest.mark.parametrize("family", PROMPTS)
def test_triton_cuda_graphs_and_async_scheduling_equal_the_torch_backend(mm_checkpoint, family):
    path = mm_checkpoint(family)
    reference = greedy_ids(path, PROMPTS[family], attention_backend="torch", enforce_eager=True,
                           async_scheduling=False)
    assert greedy_ids(path, PROMPTS[family], attention_backend="triton") == reference
    assert greedy_ids(path, PROMPTS[family], attention_backend="triton", max_num_batched_tokens=8) == reference
