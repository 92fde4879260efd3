"""LoRA on MoE models: adapters on the attention projections (and a shared expert) serve as peft computes them;
adapters on the experts are refused, saying so."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft_reference import MAX_TOKENS, PROMPTS, peft_greedy
from safetensors.torch import load_file, save_file

from loomserve import LLM, LoRARequest, SamplingParams
from loomserve.adapters.layers import add_lora_layers
from loomserve.adapters.lora import LoRALoadError, load_lora_model
from loomserve.platform.config import EngineArgs
from loomserve.platform.loader import load_model
from loomserve.testing.moe_checkpoints import tiny_moe_checkpoint

GREEDY = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)


@pytest.fixture(scope="module")
def qwen2_moe() -> str:
    return str(tiny_moe_checkpoint("qwen2_moe"))


@pytest.fixture(scope="module")
def attention_adapter(qwen2_moe, make_lora) -> str:
    return make_lora(qwen2_moe, "attn-shared", seed=5, r=8, lora_alpha=16,
                     target_modules=["q_proj", "v_proj", "o_proj", "shared_expert.down_proj"])


def test_adapter_on_attention_and_shared_expert_equals_peft(qwen2_moe, attention_adapter) -> None:
    llm = LLM(qwen2_moe, enable_lora=True, max_loras=1, max_lora_rank=8, block_size=4, kv_cache_memory="16MiB")
    lora = LoRARequest("attn", 1, attention_adapter)
    got = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, GREEDY, lora_request=lora)]
    expected = peft_greedy(qwen2_moe, attention_adapter)
    assert got == expected
    assert expected != peft_greedy(qwen2_moe, None), "the adapter does not change the output: the test proves nothing"


def test_adapter_on_an_expert_is_refused_naming_experts(qwen2_moe, attention_adapter, tmp_path: Path) -> None:
    config = EngineArgs(qwen2_moe, device="cpu").create_engine_config()
    _, _, targets = add_lora_layers(load_model(config.model_config), 1, 8, "torch")
    folder = tmp_path / "experts"
    folder.mkdir()
    (folder / "adapter_config.json").write_text((Path(attention_adapter) / "adapter_config.json").read_text())
    prefix = "base_model.model.model.layers.1.mlp.experts.3.gate_proj"
    tensors = {**load_file(Path(attention_adapter) / "adapter_model.safetensors"),
               f"{prefix}.lora_A.weight": torch.zeros(8, 64), f"{prefix}.lora_B.weight": torch.zeros(32, 8)}
    save_file(tensors, folder / "adapter_model.safetensors")
    with pytest.raises(LoRALoadError, match="MoE expert .*LoRA on experts is not supported"):
        load_lora_model(LoRARequest("x", 1, str(folder)), targets, 8, torch.float32)
