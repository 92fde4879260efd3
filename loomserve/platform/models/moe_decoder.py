"""The MoE decoder families: Qwen3-MoE, Qwen2-MoE (with a shared expert), Mixtral and OLMoE.

Each is the decoder of `decoder.py` (attention, norms, RoPE, LoRA, tensor parallelism) with a mixture of experts
(`moe.py`) for MLP on its sparse layers, and differs from the others in the `MoeSpec` below: where its config keeps
the expert counts, whether it renormalises the top-k routing weights, and its checkpoint's names.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from torch import nn

from loomserve.platform.models.decoder import DECODER_PACKED_MODULES, MLP, DecoderForCausalLM, decoder_param_for
from loomserve.platform.models.moe import DOWN, GATE, UP, FusedMoE, SparseMoeBlock
from loomserve.platform.models.packing import load_packed_weights


@dataclass(frozen=True)
class MoeSpec:
    num_experts_attr: str = "num_experts"
    intermediate_attr: str = "moe_intermediate_size"  # each expert's intermediate size
    always_renormalize: bool = False  # Mixtral rescales the top-k weights to sum to one; the others if norm_topk_prob
    shared_expert: bool = False  # Qwen2-MoE: a dense MLP every token goes through, gated by a sigmoid
    checkpoint_block: str = "mlp"  # the MoE block's name on disk
    projections: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")  # an expert's, on disk


MOE_SPECS: dict[str, MoeSpec] = {
    "qwen3_moe": MoeSpec(),
    "qwen2_moe": MoeSpec(shared_expert=True),
    "olmoe": MoeSpec(intermediate_attr="intermediate_size"),
    "mixtral": MoeSpec("num_local_experts", "intermediate_size", always_renormalize=True,
                       checkpoint_block="block_sparse_moe", projections=("w1", "w3", "w2")),
}


def moe_spec(config: Any) -> MoeSpec:
    if config.model_type not in MOE_SPECS:
        raise ValueError(f"MoE model_type {config.model_type!r} is not supported; supported: {', '.join(MOE_SPECS)}")
    return MOE_SPECS[config.model_type]


def is_sparse_layer(config: Any, layer_index: int) -> bool:
    """Qwen's configs may keep some layers dense (`mlp_only_layers`, `decoder_sparse_step`); the others never."""
    step = getattr(config, "decoder_sparse_step", 1) or 1
    return layer_index not in (getattr(config, "mlp_only_layers", None) or []) and (layer_index + 1) % step == 0


def moe_or_dense_mlp(config: Any, layer_index: int, spec: MoeSpec) -> nn.Module:
    if not is_sparse_layer(config, layer_index):
        return MLP(config)
    shared = MLP(config, config.shared_expert_intermediate_size) if spec.shared_expert else None
    renormalize = spec.always_renormalize or bool(getattr(config, "norm_topk_prob", False))
    return SparseMoeBlock(config, getattr(config, spec.num_experts_attr), getattr(config, spec.intermediate_attr),
                          renormalize, shared)


class MoeForCausalLM(DecoderForCausalLM):
    """Qwen3MoeForCausalLM / Qwen2MoeForCausalLM / MixtralForCausalLM / OlmoeForCausalLM over packed tokens."""

    is_multimodal = False
    supports_lora = True  # on attention (and dense or shared-expert MLPs); adapters on experts are refused
    pooling_tasks = ()
    encoder_only = False
    uses_mrope = False
    is_moe = True
    packed_modules_mapping = DECODER_PACKED_MODULES

    def __init__(self, hf_config: Any, attention_backend: str = "auto") -> None:
        self.spec = moe_spec(hf_config)
        super().__init__(hf_config, attention_backend, partial(moe_or_dense_mlp, spec=self.spec))

    def canonical_name(self, name: str) -> str:
        """Mixtral's `block_sparse_moe` is this model's `mlp`."""
        return name.replace(f".{self.spec.checkpoint_block}.", ".mlp.")

    def _param_for(self, name: str) -> tuple[str, Any] | None:
        """An expert's tensor -> (its layer's stacked parameter, (expert, GATE|UP|DOWN)), None when another rank
        holds the expert; other tensors as the dense decoder maps them."""
        name = self.canonical_name(name)
        head, sep, tail = name.partition(".mlp.experts.")
        if not sep:
            return decoder_param_for(name, self.tie_word_embeddings)
        expert, projection, _ = tail.split(".")
        experts: FusedMoE = self.get_submodule(f"{head}.mlp.experts")
        if not experts.holds(int(expert)):
            return None
        kind = self.spec.projections.index(projection)
        param = "w2_weight" if kind == DOWN else "w13_weight"
        return f"{head}.mlp.experts.{param}", (int(expert), (GATE, UP, DOWN)[kind])

    @torch.no_grad()
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        return load_packed_weights(self, weights, self._param_for)
