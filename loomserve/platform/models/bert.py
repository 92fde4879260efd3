"""BERT / RoBERTa / XLM-RoBERTa encoders over packed tokens: embedding models and sequence classifiers.

`BertModel`, `RobertaModel` and `XLMRobertaModel` return every token's last hidden state, which the runner pools
into vectors; the `*ForSequenceClassification` variants add their classification head, which the runner applies
to each request's pooled first token. Post-LayerNorm layers; each sequence attends bidirectionally to itself only
(no KV cache), with query/key/value fused into one projection as in the decoders; on CPU the matmuls run on
oneDNN-packed weights with GELU fused in (PackedLinear).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from loomserve.platform.attention.encoder import EncoderAttention, SequenceLayout
from loomserve.platform.forward_batch import ForwardBatch
from loomserve.platform.models.interfaces import ServedModel
from loomserve.platform.models.packed_linear import PackedLinear
from loomserve.platform.models.packing import load_packed_weights

# checkpoint name part -> (this module's name part, shard of the fused projection); first match wins.
_LAYER_NAMES = (
    (".attention.self.query.", ".attention.qkv_proj.", 0),
    (".attention.self.key.", ".attention.qkv_proj.", 1),
    (".attention.self.value.", ".attention.qkv_proj.", 2),
    (".attention.output.dense.", ".attention.out_proj.", None),
    (".attention.output.LayerNorm.", ".attention_norm.", None),
    (".intermediate.dense.", ".intermediate.", None),
    (".output.dense.", ".output.", None),
    (".output.LayerNorm.", ".output_norm.", None),
)
_SKIPPED = ("embeddings.position_ids", "embeddings.token_type_ids")
_SKIPPED_PREFIXES = ("cls.", "lm_head.")


@dataclass(frozen=True)
class EncoderSpec:
    """How an encoder family departs from BERT."""

    positions_after_padding: bool  # positions are numbered from padding_idx + 1 (RoBERTa), not from 0
    # checkpoint name prefix of the classifier head's tensors -> this module's parameter prefix
    classifier_names: dict[str, str | None]


_ROBERTA = EncoderSpec(True, {"classifier.dense.": "pooler.", "classifier.out_proj.": "classifier."})
# Config `model_type` -> its family's spec. BERT names the head's dense layer bert.pooler.dense, RoBERTa
# classifier.dense (and the linear classifier.out_proj).
ENCODER_SPECS: dict[str, EncoderSpec] = {
    "bert": EncoderSpec(False, {"pooler.dense.": "pooler.", "classifier.": "classifier."}),
    "roberta": _ROBERTA,
    "xlm-roberta": _ROBERTA,
}


def encoder_spec(config: Any) -> EncoderSpec:
    if config.model_type not in ENCODER_SPECS:
        raise ValueError(
            f"encoder model_type {config.model_type!r} is not supported; supported: {', '.join(ENCODER_SPECS)}"
        )
    return ENCODER_SPECS[config.model_type]


def first_position(config: Any) -> int:
    """The position embedding index of each sequence's first token."""
    return config.pad_token_id + 1 if encoder_spec(config).positions_after_padding else 0


class BertEmbeddings(nn.Module):
    def __init__(self, config: Any) -> None:
        super().__init__()
        if getattr(config, "position_embedding_type", "absolute") != "absolute":
            raise ValueError(f"position_embedding_type {config.position_embedding_type!r} is not supported")
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.position_offset = first_position(config)

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, token_type_ids: torch.Tensor | None
    ) -> torch.Tensor:  # [T, hidden]
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        x = self.word_embeddings(input_ids) + self.token_type_embeddings(token_type_ids)
        x = x + self.position_embeddings(positions + self.position_offset)
        return self.LayerNorm(x)


class BertSelfAttention(nn.Module):
    def __init__(self, config: Any) -> None:
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // self.num_heads
        hidden = config.hidden_size
        self.qkv_proj = PackedLinear(hidden, [hidden] * 3)
        self.out_proj = PackedLinear(hidden, [hidden])
        self.attn = EncoderAttention(self.num_heads, self.head_dim, self.head_dim**-0.5)

    def forward(self, x: torch.Tensor, layout: SequenceLayout) -> torch.Tensor:
        qkv = self.qkv_proj(x).view(-1, 3, self.num_heads, self.head_dim)  # [T, 3, H, D]
        return self.out_proj(self.attn.forward(qkv, layout))  # [T, hidden]


class BertLayer(nn.Module):
    def __init__(self, config: Any) -> None:
        super().__init__()
        eps = config.layer_norm_eps
        self.attention = BertSelfAttention(config)
        self.attention_norm = nn.LayerNorm(config.hidden_size, eps=eps)
        self.intermediate = PackedLinear(config.hidden_size, [config.intermediate_size], act=config.hidden_act)
        self.output = PackedLinear(config.intermediate_size, [config.hidden_size])
        self.output_norm = nn.LayerNorm(config.hidden_size, eps=eps)

    def forward(self, x: torch.Tensor, layout: SequenceLayout) -> torch.Tensor:
        x = self.attention_norm(self.attention(x, layout).add_(x))  # the residual added into the fresh output
        return self.output_norm(self.output(self.intermediate(x)).add_(x))  # [T, I] inside


class BertEncoder(nn.Module):
    def __init__(self, config: Any) -> None:
        super().__init__()
        self.layer = nn.ModuleList(BertLayer(config) for _ in range(config.num_hidden_layers))


class BertEmbeddingModel(ServedModel):
    """BertModel / RobertaModel / XLMRobertaModel: the last hidden state of every token."""

    is_multimodal = False
    supports_lora = False  # LoRA adapts decoder layers only
    pooling_tasks = ("embed",)
    encoder_only = True
    uses_mrope = False
    is_moe = False
    packed_modules_mapping = {"self.query": ("qkv_proj", 0), "self.key": ("qkv_proj", 1), "self.value": ("qkv_proj", 2)}
    # checkpoint name prefix of the head's tensors -> this module's parameter prefix (None: not used)
    head_names: dict[str, str | None] = {"pooler.dense.": None}

    def __init__(self, hf_config: Any, attention_backend: str = "auto") -> None:
        super().__init__()
        self.config = hf_config
        self.embeddings = BertEmbeddings(hf_config)
        self.encoder = BertEncoder(hf_config)

    def forward(
        self,
        input_ids: torch.Tensor,  # [T] int64
        kv_caches: list[torch.Tensor],  # unused: encoders keep no KV cache
        batch: ForwardBatch,  # positions [T] 0-based within each sequence; token_type_ids [T] for cross-encoder pairs
    ) -> torch.Tensor:  # [T, hidden]
        x = self.embeddings(input_ids, batch.positions, batch.token_type_ids)
        layout = SequenceLayout(batch.attn.query_start_loc_cpu, x.device, x.dtype)
        for layer in self.encoder.layer:
            x = layer(x, layout)
        return x

    @torch.no_grad()
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Copy HF-named tensors into parameters; returns the names of parameters fully loaded."""
        return load_packed_weights(self, weights, self._param_for)

    def _param_for(self, name: str) -> tuple[str, int | None] | None:
        """Checkpoint name -> (parameter name, shard of a fused projection), or None for tensors not used."""
        for prefix in ("bert.", "roberta."):
            name = name.removeprefix(prefix)
        if name.endswith(("LayerNorm.gamma", "LayerNorm.beta")):  # TF-era names
            name = name.replace("LayerNorm.gamma", "LayerNorm.weight").replace("LayerNorm.beta", "LayerNorm.bias")
        if name in _SKIPPED or name.startswith(_SKIPPED_PREFIXES):
            return None
        for checkpoint_prefix, prefix in self.head_names.items():
            if name.startswith(checkpoint_prefix):
                return None if prefix is None else (prefix + name.removeprefix(checkpoint_prefix), None)
        for checkpoint_part, part, shard_id in _LAYER_NAMES:
            if checkpoint_part in name:
                return name.replace(checkpoint_part, part), shard_id
        return name, None


class BertClassificationModel(BertEmbeddingModel):
    """*ForSequenceClassification: the encoder plus its head (dense + tanh on the first token, then a linear)."""

    pooling_tasks = ("classify",)

    def __init__(self, hf_config: Any, attention_backend: str = "auto") -> None:
        super().__init__(hf_config, attention_backend)
        self.head_names = encoder_spec(hf_config).classifier_names
        self.pooler = nn.Linear(hf_config.hidden_size, hf_config.hidden_size)
        self.classifier = nn.Linear(hf_config.hidden_size, hf_config.num_labels)

    def classify(self, pooled: torch.Tensor) -> torch.Tensor:
        """[B, hidden] first-token states -> [B, num_labels] logits (float32)."""
        return self.classifier(torch.tanh(self.pooler(pooled))).float()
