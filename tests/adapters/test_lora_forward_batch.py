"""A LoRA model reads the step's adapters from its forward argument alone: forwards with different
`ForwardBatch.lora` in one process each get their own result, and no module or shared state keeps a batch."""

from __future__ import annotations

import numpy as np
import torch

from loomserve.adapters.layers import LoRABatch, add_lora_layers
from loomserve.adapters.lora import load_lora_model
from loomserve.adapters.request import LoRARequest
from loomserve.platform.attention import AttentionMetadata
from loomserve.platform.config import EngineArgs
from loomserve.platform.forward_batch import ForwardBatch
from loomserve.platform.loader import load_model
from loomserve.platform.models.decoder import head_dim_of

BLOCK = 4
PROMPTS = [[5, 9, 13, 2, 7, 11], [3, 8, 1]]


def prefill(model: torch.nn.Module, prompts: list[list[int]], token_slots: list[int] | None) -> torch.Tensor:
    """Hidden states [T, hidden] of one step prefilling `prompts` into a fresh paged KV cache, with each token's
    adapter slot (-1 = base; None = no LoRA batch at all)."""
    config = model.config
    lens = [len(p) for p in prompts]
    starts = np.cumsum([0, *lens]).tolist()
    blocks = [-(-n // BLOCK) for n in lens]
    first_block = np.cumsum([0, *blocks]).tolist()
    width = max(blocks)
    tables = [[first_block[i] + j for j in range(width)] for i in range(len(prompts))]  # blocks past a prompt: unused
    slots = [tables[i][p // BLOCK] * BLOCK + p % BLOCK for i, n in enumerate(lens) for p in range(n)]
    attn = AttentionMetadata(
        slot_mapping=torch.tensor(slots),
        query_start_loc=torch.tensor(starts, dtype=torch.int32),
        seq_lens=torch.tensor(lens, dtype=torch.int32),
        block_tables=torch.tensor(tables, dtype=torch.int32),
        seq_counts=torch.tensor([0, len(prompts)]),
        num_decodes=0,
        num_decode_tokens=0,
        query_start_loc_cpu=starts,
        seq_lens_cpu=lens,
    )
    positions = torch.tensor([p for n in lens for p in range(n)])  # [T]
    lora = None if token_slots is None else LoRABatch.build(np.array(token_slots), torch.device("cpu"))
    shape = (2, first_block[-1] + width, BLOCK, config.num_key_value_heads, head_dim_of(config))
    kv_caches = [torch.zeros(shape) for _ in range(config.num_hidden_layers)]
    with torch.inference_mode():
        return model(torch.tensor([t for p in prompts for t in p]), kv_caches, ForwardBatch(attn, positions, lora))


def held_batches(model: torch.nn.Module, state: object) -> list[str]:
    """Attributes of the model's modules or of the LoRA state that hold a LoRABatch."""
    owners = [(name, vars(m)) for name, m in model.named_modules()] + [("state", vars(state))]
    return [f"{name}.{key}" for name, attrs in owners for key, value in attrs.items() if isinstance(value, LoRABatch)]


def test_each_forward_uses_the_lora_batch_it_is_given_and_nothing_keeps_it(qwen2_checkpoint, make_lora):
    config = EngineArgs(qwen2_checkpoint, device="cpu", dtype="float32").create_engine_config()
    model = load_model(config.model_config)
    state, layers, targets = add_lora_layers(model, 2, 8, "torch")
    for slot in range(2):
        path = make_lora(qwen2_checkpoint, f"fb{slot}", seed=70 + slot, r=8, target_modules="all-linear")
        adapter = load_lora_model(LoRARequest(f"fb{slot}", slot + 1, path), targets, 8, torch.float32)
        for name, layer in layers.items():
            layer.set_slot(slot, adapter.weights.get(name, {}))
    n = len(PROMPTS[0])

    base = prefill(model, PROMPTS[:1], None)
    first = prefill(model, PROMPTS[:1], [0] * n)
    second = prefill(model, PROMPTS[:1], [1] * n)
    assert not torch.allclose(first, base) and not torch.allclose(second, base) and not torch.allclose(first, second)
    # Nothing of the last forward lingers: the next one, without adapters or with the other, is as if run first.
    torch.testing.assert_close(prefill(model, PROMPTS[:1], None), base, rtol=0, atol=0)
    torch.testing.assert_close(prefill(model, PROMPTS[:1], [-1] * n), base, rtol=0, atol=0)
    torch.testing.assert_close(prefill(model, PROMPTS[:1], [0] * n), first, rtol=0, atol=0)
    # Two sequences of different adapters in one forward: each as in its own forward.
    both = prefill(model, PROMPTS, [1] * n + [0] * len(PROMPTS[1]))
    torch.testing.assert_close(both[:n], second)
    torch.testing.assert_close(both[n:], prefill(model, PROMPTS[1:], [0] * len(PROMPTS[1])))
    assert held_batches(model, state) == []
