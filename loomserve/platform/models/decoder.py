"""One decoder-only causal LM for the Llama, Mistral, Qwen2 and Qwen3 families, switched by their `DecoderSpec`;
the MoE families (`moe_decoder.py`) are the same model with a mixture of experts for MLP.

Tokens of many sequences arrive packed in one flat batch (no padding); the step's `ForwardBatch` goes down to every
layer: attention reads and writes the paged KV cache through its `AttentionMetadata`, and each projection gets its
LoRA batch (used only once adapters wrap the projections). Parameter layout follows vLLM: q/k/v and gate/up are
fused, loaded shard by shard from the checkpoint's separate projections (`packed_modules_mapping`). Under tensor
parallelism each rank builds the same model over its slice of the heads, MLP and vocabulary (`linear.py`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from torch import nn

from loomserve.platform.attention import get_attention_backend
from loomserve.platform.distributed.parallel_state import divide, get_tp_group, kv_heads_per_rank
from loomserve.platform.forward_batch import ForwardBatch
from loomserve.platform.models.interfaces import ServedModel
from loomserve.platform.models.layers import RMSNorm, SiluAndMul, project
from loomserve.platform.models.linear import (
    MergedColumnParallelLinear,
    ParallelLMHead,
    QKVParallelLinear,
    RowParallelLinear,
    ShardedRMSNorm,
    VocabParallelEmbedding,
)
from loomserve.platform.models.packing import load_packed_weights
from loomserve.platform.models.rope import RotaryEmbedding, rotate_qk


@dataclass(frozen=True)
class DecoderSpec:
    """How a decoder family departs from Llama's layers; `attention_bias` and `mlp_bias` still come from config."""

    qkv_bias: bool = False  # q/k/v projections always carry biases (o_proj follows `attention_bias`)
    qk_norm: bool = False  # each head's queries and keys are RMS-normalized before RoPE
    qk_norm_across_heads: bool = False  # OLMoE: one RMSNorm over all heads' queries (keys) instead of per head


MakeMLP = Callable[[Any, int], nn.Module]  # (text config, layer index) -> the layer's MLP

_QWEN2 = DecoderSpec(qkv_bias=True)
# Text config `model_type` -> its family's spec (the Qwen2-VL family's language models are Qwen2's).
DECODER_SPECS: dict[str, DecoderSpec] = {
    "llama": DecoderSpec(),
    "mistral": DecoderSpec(),
    "qwen2": _QWEN2,
    "qwen2_vl_text": _QWEN2,
    "qwen2_5_vl_text": _QWEN2,
    "qwen3": DecoderSpec(qk_norm=True),
    "qwen2_moe": _QWEN2,
    "qwen3_moe": DecoderSpec(qk_norm=True),
    "mixtral": DecoderSpec(),
    "olmoe": DecoderSpec(qk_norm=True, qk_norm_across_heads=True),
}


def decoder_spec(config: Any) -> DecoderSpec:
    if config.model_type not in DECODER_SPECS:
        raise ValueError(
            f"decoder model_type {config.model_type!r} is not supported; supported: {', '.join(DECODER_SPECS)}"
        )
    return DECODER_SPECS[config.model_type]


# checkpoint projection -> (fused parameter module, shard index)
DECODER_PACKED_MODULES: dict[str, tuple[str, int]] = {
    "q_proj": ("qkv_proj", 0),
    "k_proj": ("qkv_proj", 1),
    "v_proj": ("qkv_proj", 2),
    "gate_proj": ("gate_up_proj", 0),
    "up_proj": ("gate_up_proj", 1),
}


def decoder_param_for(name: str, tied_lm_head: bool) -> tuple[str, int | None] | None:
    """A decoder checkpoint tensor -> (parameter, shard of a fused projection): `...self_attn.k_proj.weight` ->
    (`...self_attn.qkv_proj.weight`, 1), others map to themselves; None for tensors the model recomputes or
    shares (inv_freq, a tied lm_head)."""
    if "rotary_emb.inv_freq" in name or (tied_lm_head and name == "lm_head.weight"):
        return None
    for checkpoint_part, (fused, shard_id) in DECODER_PACKED_MODULES.items():
        if f".{checkpoint_part}." in name:
            return name.replace(f".{checkpoint_part}.", f".{fused}."), shard_id
    return name, None


def head_dim_of(config: Any) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


class Attention(nn.Module):
    """Self-attention over this rank's heads (all of them in a group of one): q/k/v split by heads, o_proj summed
    over the ranks."""

    def __init__(self, config: Any, attention_backend: str) -> None:
        super().__init__()
        tp = get_tp_group()
        total_heads = config.num_attention_heads
        total_kv_heads = getattr(config, "num_key_value_heads", None) or total_heads
        self.num_heads = divide(total_heads, tp.size, "num_attention_heads")
        self.num_kv_heads = kv_heads_per_rank(total_kv_heads, tp.size)
        self.head_dim = head_dim_of(config)
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        attention_bias = getattr(config, "attention_bias", False)
        spec = decoder_spec(config)
        self.qkv_proj = QKVParallelLinear(config.hidden_size, self.head_dim, total_heads, total_kv_heads,
                                          bias=attention_bias or spec.qkv_bias)
        self.o_proj = RowParallelLinear(total_heads * self.head_dim, config.hidden_size, bias=attention_bias)
        self.clip_qkv = getattr(config, "clip_qkv", None)  # OLMoE: q, k and v clamped to [-clip, clip]
        self.qk_norm = spec.qk_norm
        self.qk_norm_across_heads = spec.qk_norm_across_heads
        if self.qk_norm_across_heads:  # over this rank's heads, the mean square taken over every rank's
            q_start, kv_start = self.qkv_proj.shard_starts[:2]
            self.q_norm = ShardedRMSNorm(self.q_size, total_heads * self.head_dim, q_start, config.rms_norm_eps)
            self.k_norm = ShardedRMSNorm(self.kv_size, total_kv_heads * self.head_dim, kv_start, config.rms_norm_eps)
        elif self.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        backend_cls = get_attention_backend(attention_backend)
        self.attn = backend_cls(self.num_heads, self.num_kv_heads, self.head_dim, self.head_dim**-0.5)

    def forward(
        self, x: torch.Tensor, cos_sin: torch.Tensor, kv_cache: torch.Tensor, batch: ForwardBatch
    ) -> torch.Tensor:
        q, k, v = project(self.qkv_proj, x, batch.lora).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        if self.qk_norm_across_heads:
            q, k = self.q_norm(q), self.k_norm(k)
        if self.clip_qkv is not None:  # after the norms, as OLMoE does
            q, k, v = (t.clamp(-self.clip_qkv, self.clip_qkv) for t in (q, k, v))
        q = q.view(-1, self.num_heads, self.head_dim)  # [T, H, D]
        k = k.view(-1, self.num_kv_heads, self.head_dim)  # [T, Hkv, D]
        v = v.view(-1, self.num_kv_heads, self.head_dim)  # [T, Hkv, D]
        if self.qk_norm and not self.qk_norm_across_heads:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = rotate_qk(q, k, cos_sin)
        out = self.attn.forward(q, k, v, kv_cache, batch.attn)  # [T, H * D]
        return project(self.o_proj, out, batch.lora)  # [T, hidden]


class MLP(nn.Module):
    """The gated SiLU MLP: gate/up split by rows across the ranks, down_proj by columns (summed over the ranks)."""

    def __init__(self, config: Any, intermediate_size: int | None = None) -> None:
        super().__init__()
        if config.hidden_act != "silu":
            raise ValueError(f"hidden_act {config.hidden_act!r} is not supported; only silu")
        bias = getattr(config, "mlp_bias", False)
        size = intermediate_size or config.intermediate_size
        self.gate_up_proj = MergedColumnParallelLinear(config.hidden_size, [size, size], bias=bias)
        self.act = SiluAndMul()
        self.down_proj = RowParallelLinear(size, config.hidden_size, bias=bias)

    def forward(self, x: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        gate_up = project(self.gate_up_proj, x, batch.lora)  # [T, 2I / ranks]
        return project(self.down_proj, self.act(gate_up), batch.lora)  # [T, I / ranks] -> [T, hidden]


def dense_mlp(config: Any, layer_index: int) -> nn.Module:
    return MLP(config)


class DecoderLayer(nn.Module):
    def __init__(self, config: Any, attention_backend: str, mlp: nn.Module) -> None:
        super().__init__()
        self.self_attn = Attention(config, attention_backend)
        self.mlp = mlp  # MLP, or a mixture of experts (`moe.py`): forward(x [T, hidden], batch) -> [T, hidden]
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(
        self,
        hidden: torch.Tensor,
        residual: torch.Tensor | None,
        cos_sin: torch.Tensor,
        kv_cache: torch.Tensor,
        batch: ForwardBatch,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            hidden, residual = self.input_layernorm(hidden), hidden
        else:
            hidden, residual = self.input_layernorm(hidden, residual)
        hidden = self.self_attn(hidden, cos_sin, kv_cache, batch)
        hidden, residual = self.post_attention_layernorm(hidden, residual)
        return self.mlp(hidden, batch), residual


class DecoderModel(nn.Module):
    def __init__(self, config: Any, attention_backend: str, make_mlp: MakeMLP = dense_mlp) -> None:
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, attention_backend, make_mlp(config, i))
                                    for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config, head_dim_of(config), config.max_position_embeddings)

    def forward(self, input_ids: torch.Tensor, kv_caches: list[torch.Tensor], batch: ForwardBatch) -> torch.Tensor:
        hidden = self.embed_tokens(input_ids) if batch.inputs_embeds is None else batch.inputs_embeds  # [T, hidden]
        cos_sin = self.rotary_emb(batch.positions)  # [T, rotary_dim], shared by all layers
        residual = None
        for index, (layer, kv_cache) in enumerate(zip(self.layers, kv_caches, strict=True)):
            if batch.aux_hidden is not None:
                batch.aux_hidden.capture(index, hidden, residual)
            hidden, residual = layer(hidden, residual, cos_sin, kv_cache, batch)
        hidden, _ = self.norm(hidden, residual)
        return hidden


class DecoderForCausalLM(ServedModel):
    """LlamaForCausalLM / MistralForCausalLM / Qwen2ForCausalLM / Qwen3ForCausalLM over packed tokens."""

    is_multimodal = False
    supports_lora = True
    pooling_tasks = ()
    encoder_only = False
    uses_mrope = False
    is_moe = False
    packed_modules_mapping = DECODER_PACKED_MODULES

    def __init__(self, hf_config: Any, attention_backend: str = "auto", make_mlp: MakeMLP = dense_mlp) -> None:
        super().__init__()
        self.config = hf_config
        self.model = DecoderModel(hf_config, attention_backend, make_mlp)
        self.tie_word_embeddings = bool(getattr(hf_config, "tie_word_embeddings", False))
        self.lm_head = ParallelLMHead(hf_config.hidden_size, hf_config.vocab_size)
        if self.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(
        self,
        input_ids: torch.Tensor,  # [T] int64
        kv_caches: list[torch.Tensor],  # per layer [2, num_blocks, block_size, Hkv, D]
        batch: ForwardBatch,  # positions [T]; inputs_embeds [T, hidden], when set, replace the token embeddings
    ) -> torch.Tensor:  # [T, hidden]
        return self.model(input_ids, kv_caches, batch)

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_tokens(input_ids)  # [T, hidden]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()  # [N, vocab]

    @torch.no_grad()
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Copy HF-named checkpoint tensors into parameters; returns the names of parameters fully loaded
        (a fused parameter counts once all its shards are in)."""
        return load_packed_weights(self, weights, partial(decoder_param_for, tied_lm_head=self.tie_word_embeddings))
