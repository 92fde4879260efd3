"""compressed-tensors checkpoints (llm-compressor's format): the `quantization_config` read through
compressed-tensors' own `QuantizationConfig`, mapped to the scheme of the linears that serve it. W8A8, FP8 or INT8
(weights per tensor, per channel or in blocks; activations dynamic per token or group, or static per tensor) loads;
other schemes are refused by name."""

from __future__ import annotations

from typing import Any

from loomserve.platform.quantization.w8a8 import W8Scheme


def check_compressed_tensors_config(saved: dict[str, Any]) -> W8Scheme:
    """The one scheme all of the checkpoint's quantized linears share, or ValueError saying what is not served."""
    try:
        from compressed_tensors.quantization import QuantizationConfig
    except ImportError as e:
        raise ImportError("compressed-tensors checkpoints need: pip install compressed-tensors") from e
    config = QuantizationConfig.model_validate(saved)
    schemes = {_fp8_scheme(group.weights, group.input_activations) for group in config.config_groups.values()}
    if len(schemes) != 1:
        raise ValueError(f"compressed-tensors checkpoint with {len(schemes)} different schemes; one is supported")
    if config.kv_cache_scheme is not None:
        raise ValueError("compressed-tensors kv_cache_scheme (FP8 KV cache) is not supported yet")
    return schemes.pop()


def _fp8_scheme(weights: Any, activations: Any) -> W8Scheme:
    if weights is None or weights.num_bits != 8 or not weights.symmetric:
        what = "none" if weights is None else f"{weights.type} {weights.num_bits}-bit"
        raise ValueError(f"compressed-tensors weights of {what} are not supported yet; symmetric 8-bit W8A8 loads")
    number = "fp8" if weights.type == "float" else "int8"
    strategy = str(weights.strategy.value if hasattr(weights.strategy, "value") else weights.strategy)
    if strategy not in ("tensor", "channel", "block"):
        raise ValueError(f"compressed-tensors 8-bit weight strategy {strategy!r} is not supported")
    block = tuple(weights.block_structure) if strategy == "block" else None
    if activations is not None and not activations.symmetric:
        raise ValueError("compressed-tensors asymmetric activations are not supported yet")
    if activations is None:
        raise ValueError("compressed-tensors 8-bit weight-only (W8A16) is not supported yet; W8A8 loads")
    act = str(activations.strategy.value if hasattr(activations.strategy, "value") else activations.strategy)
    if activations.dynamic and act == "token":
        return W8Scheme(number, weight_block=block)
    if activations.dynamic and act == "group":
        return W8Scheme(number, weight_block=block, activations="group", activation_group=activations.group_size)
    if not activations.dynamic and act == "tensor":
        return W8Scheme(number, weight_block=block, activations="static")
    raise ValueError(f"compressed-tensors 8-bit activations {act} (dynamic={activations.dynamic}) are not supported")
