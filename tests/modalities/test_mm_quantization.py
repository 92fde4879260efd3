"""NF4 (bitsandbytes) on a vision-language model quantizes the language model's decoder layers only: the vision
tower (whose encoder layers are also named `...layers.N...`) and the projector stay dense, the same part LoRA
leaves alone."""

from __future__ import annotations

import pytest
from media_samples import noise_image
from mm_reference import MAX_TOKENS, ids_of, image_prompt
from torch import nn

from loomserve import LLM, SamplingParams
from loomserve.platform.quantization import NF4Linear

pytest.importorskip("bitsandbytes")


def test_nf4_quantizes_the_language_model_and_leaves_the_vision_tower_dense(mm_checkpoint):
    path = mm_checkpoint("llava")
    llm = LLM(path, device="cpu", quantization="bitsandbytes", block_size=4, kv_cache_memory="8MiB")
    model = llm.engine.executor.runner.model
    nf4 = [name for name, m in model.named_modules() if isinstance(m, NF4Linear)]
    assert nf4 and all(name.startswith("language_model.model.layers.") for name in nf4)
    tower = [m for name, m in model.named_modules() if name.startswith("vision_tower.") and isinstance(m, nn.Linear)]
    assert tower and not any(isinstance(m, NF4Linear) for m in tower)

    prompt = {"prompt_token_ids": ids_of(path, image_prompt("llava", 1)),
              "multi_modal_data": {"image": noise_image(56, 56, seed=3)}}
    out = llm.generate(prompt, SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True))
    assert len(out[0].outputs[0].token_ids) == MAX_TOKENS
