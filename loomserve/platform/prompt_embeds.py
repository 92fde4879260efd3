"""Prompt embeddings (vLLM's `prompt_embeds`, behind `--enable-prompt-embeds`): a client's [seq_len, hidden] tensor
in place of the token embedding lookup.

Such a prompt travels as the multimodal path's media do: placeholder token ids (zeros) and one `MultiModalItem` of
modality "embeds" covering all of them, whose content hash (SHA-256 over dtype, shape and bytes) keys the prefix
cache, so different embeddings never share blocks. The runner hook here puts the rows into `inputs_embeds`.
"""

from __future__ import annotations

import base64
import binascii
import io
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from loomserve.modalities.hashing import content_hash
from loomserve.modalities.inputs import PROMPT_EMBEDS, MultiModalItem, PlaceholderRange
from loomserve.modalities.placeholder_embeds import with_placeholder_embeds
from loomserve.platform.features import RunnerHook
from loomserve.platform.models.registry import is_encoder_decoder, is_multimodal

if TYPE_CHECKING:
    from loomserve.platform.config import EngineConfig, ModelConfig
    from loomserve.platform.input_batch import BatchInputs
    from loomserve.platform.step import ScheduledStep

DISABLED = "prompt_embeds needs the server started with --enable-prompt-embeds (LLM(enable_prompt_embeds=True))"
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def decode_prompt_embeds(encoded: str | bytes) -> torch.Tensor:
    """vLLM's wire form: base64 of a `torch.save`d tensor; ValueError for anything else."""
    try:
        raw = base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ValueError(f"prompt_embeds is not valid base64: {exc}") from None
    try:
        tensor = torch.load(io.BytesIO(raw), weights_only=True, map_location="cpu")
    except Exception as exc:  # torch.load raises many kinds on foreign bytes
        raise ValueError(f"prompt_embeds does not hold a torch.save'd tensor: {exc}") from None
    return tensor


def check_prompt_embeds(tensor: Any, hidden_size: int) -> torch.Tensor:
    """The tensor as [seq_len, hidden] (a batch of one, [1, seq_len, hidden], is squeezed, as vLLM does), dense;
    ValueError for anything a model cannot take."""
    if not isinstance(tensor, torch.Tensor):
        raise ValueError(f"prompt_embeds must be a tensor, got {type(tensor).__name__}")
    if tensor.dtype not in _DTYPES:
        raise ValueError(f"prompt_embeds must be float32, float16 or bfloat16, got {tensor.dtype}")
    tensor = tensor.to_dense()
    if tensor.dim() == 3 and tensor.shape[0] == 1:
        tensor = tensor.squeeze(0)
    if tensor.dim() != 2 or tensor.shape[0] == 0:
        raise ValueError(f"prompt_embeds must have shape [seq_len, {hidden_size}], got {list(tensor.shape)}")
    if tensor.shape[1] != hidden_size:
        raise ValueError(f"prompt_embeds has hidden size {tensor.shape[1]}; this model's is {hidden_size}")
    if not torch.isfinite(tensor).all():
        raise ValueError("prompt_embeds holds NaN or infinite values")
    return tensor.contiguous()


def embeds_prompt(tensor: torch.Tensor) -> tuple[list[int], list[MultiModalItem]]:
    """(placeholder token ids, the one item carrying the embeddings) for a checked [seq_len, hidden] tensor."""
    n = tensor.shape[0]
    raw = tensor.view(torch.int16) if tensor.dtype == torch.bfloat16 else tensor  # numpy has no bfloat16
    item = MultiModalItem(PROMPT_EMBEDS, content_hash(PROMPT_EMBEDS, {"dtype": str(tensor.dtype)}, raw.numpy()),
                          PlaceholderRange(0, n), {PROMPT_EMBEDS: tensor})
    return [0] * n, [item]


def prompt_embeds_input(model_config: ModelConfig, value: Any) -> tuple[list[int], list[MultiModalItem]]:
    """A prompt's `prompt_embeds` (a tensor, or vLLM's base64 wire form) as placeholder ids and their item;
    ValueError when the engine does not take them or they do not fit the model."""
    if not model_config.enable_prompt_embeds:
        raise ValueError(DISABLED)
    if is_multimodal(model_config.architecture) or is_encoder_decoder(model_config.architecture):
        raise ValueError(f"prompt_embeds are not supported for {model_config.architecture} models")
    if isinstance(value, (str, bytes)):
        value = decode_prompt_embeds(value)
    return embeds_prompt(check_prompt_embeds(value, model_config.text_config.hidden_size))


def runner_hook(config: EngineConfig, model: nn.Module, device: torch.device) -> PromptEmbedsRunnerHook | None:
    if not config.model_config.enable_prompt_embeds or model.is_multimodal or model.encoder_only:
        return None
    return PromptEmbedsRunnerHook(model)


class PromptEmbedsRunnerHook(RunnerHook):
    name = "prompt_embeds"

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def prepare(self, step: ScheduledStep, batch: BatchInputs) -> None:
        """When the batch holds prompt-embeds positions, the input embeddings [T, hidden]: token embeddings with
        the clients' rows in place."""
        placed = with_placeholder_embeds(batch, self.model.embed_input_ids,
                                         lambda item: item.data[PROMPT_EMBEDS] if item.is_prompt_embeds else None)
        if placed is not None:
            batch.forward.inputs_embeds = placed[0]
