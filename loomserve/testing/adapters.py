"""Seeded LoRA adapters of the tiny checkpoints in PEFT's on-disk format, written without peft (whose import alone
costs ~10 s): for tests that need an adapter that changes the output, not peft's reference numbers."""

from __future__ import annotations

import json
from pathlib import Path

import torch


def tiny_q_proj_lora(base: str, folder: Path, seed: int, rank: int = 4) -> str:
    """A LoRA of every layer's q_proj of the checkpoint at `base` (lora_A [rank, hidden], lora_B [q_out, rank], both
    random: peft would start B at zero, which changes nothing), saved into `folder`."""
    from safetensors.torch import save_file

    config = json.loads((Path(base) / "config.json").read_text())
    hidden = config["hidden_size"]
    q_out = config["num_attention_heads"] * config.get("head_dim", hidden // config["num_attention_heads"])
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(config["num_hidden_layers"]):
        name = f"base_model.model.model.layers.{layer}.self_attn.q_proj"
        tensors[f"{name}.lora_A.weight"] = torch.randn(rank, hidden, generator=generator)  # [r, in]
        tensors[f"{name}.lora_B.weight"] = torch.randn(q_out, rank, generator=generator)  # [out, r]
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": ["q_proj"], "bias": "none",
        "base_model_name_or_path": base,
    }))
    return str(folder)
