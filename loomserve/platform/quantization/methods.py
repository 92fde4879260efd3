"""Which quantization method loads a checkpoint: the checkpoint's own (its `quantization_config`, or a `.gguf`
file), which `--quantization` may only confirm; a dense checkpoint may be quantized at load by a method that can
(`bitsandbytes` NF4, `fp8`)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

from torch import nn

from loomserve.platform.models.linear import CheckpointTensor
from loomserve.platform.quantization.base import TensorGroup

QUANTIZATION_METHODS = ("bitsandbytes", "fp8", "compressed-tensors", "gptq", "awq", "gguf")
AT_LOAD = ("bitsandbytes", "fp8")  # methods that quantize a dense checkpoint's weights while loading


def checkpoint_quantization(hf_config: Any, gguf_file: str | None = None) -> str | None:
    """The method a checkpoint was saved with (None: dense weights), refused when it does not load here."""
    if gguf_file is not None:
        return "gguf"
    saved = _saved_config(hf_config)
    if not saved:
        return None
    method = saved.get("quant_method")
    if method == "bitsandbytes" and saved.get("load_in_4bit"):
        return "bitsandbytes"
    if method == "fp8":
        from loomserve.platform.quantization.w8a8 import check_fp8_config

        check_fp8_config(saved)
        return "fp8"
    if method in ("gptq", "awq"):
        from loomserve.platform.quantization.int4 import check_int4_config

        check_int4_config(saved)
        return method
    if method == "compressed-tensors":
        from loomserve.platform.quantization.compressed_tensors import check_compressed_tensors_config

        check_compressed_tensors_config(saved)
        return "compressed-tensors"
    what = f"{method} 8-bit" if saved.get("load_in_8bit") else method
    raise ValueError(f"the checkpoint is quantized with {what}, which does not load here; loadable: bitsandbytes "
                     "4-bit, fp8, compressed-tensors (FP8 / INT8 W8A8, INT4 / INT8 weight-only), gptq and awq "
                     "(4-bit), GGUF")


def check_quantization(quantization: str | None, hf_config: Any, gguf_file: str | None = None) -> str | None:
    """The method to load with: the checkpoint's (which `quantization` may only confirm), or `quantization` for
    a dense checkpoint it can quantize at load."""
    if quantization is not None and quantization not in QUANTIZATION_METHODS:
        raise ValueError(f"unknown quantization {quantization!r}; choose {', '.join(QUANTIZATION_METHODS)}")
    saved = checkpoint_quantization(hf_config, gguf_file)
    if saved is None:
        if quantization is not None and quantization not in AT_LOAD:
            raise ValueError(f"quantization {quantization!r} needs a checkpoint saved in that format; a dense "
                             f"checkpoint can be quantized at load with {' or '.join(AT_LOAD)}")
        return quantization
    if quantization is not None and quantization != saved:
        raise ValueError(f"the checkpoint is quantized with {saved}, not {quantization}: drop --quantization or "
                         f"pass --quantization {saved}")
    return saved


def _saved_config(hf_config: Any) -> dict[str, Any] | None:
    saved = getattr(hf_config, "quantization_config", None)
    return saved if not saved or isinstance(saved, dict) else saved.to_dict()


def split_quantized(
    weights: Iterable[tuple[str, CheckpointTensor]], quantization: str | None, hf_config: Any
) -> tuple[dict[str, TensorGroup] | None, Iterator[tuple[str, CheckpointTensor]]]:
    """(groups, dense weights): a quantized checkpoint's tensors of each quantized projection go into `groups`
    (filled as the returned iterator is consumed), the rest on to the model; (None, weights) for a dense one."""
    if quantization in (None, "gguf") or not _saved_config(hf_config):
        return None, iter(weights)
    groups: dict[str, TensorGroup] = {}
    if quantization == "bitsandbytes":
        from loomserve.platform.quantization.bitsandbytes import split_prequantized

        return groups, split_prequantized(weights, groups)
    if quantization in ("gptq", "awq"):
        from loomserve.platform.quantization.int4 import split_int4

        return groups, split_int4(weights, groups)
    if quantization == "compressed-tensors":
        from loomserve.platform.quantization.compressed_tensors import split_compressed_tensors

        return groups, split_compressed_tensors(weights, groups)
    from loomserve.platform.quantization.w8a8 import split_w8

    return groups, split_w8(weights, groups)


def apply_quantization(
    model: nn.Module, loaded: set[str], quantization: str | None, hf_config: Any, groups: dict[str, TensorGroup] | None
) -> set[str]:
    """Swap the decoder linears for the method's: from the checkpoint's `groups`, or quantized at load."""
    if quantization in (None, "gguf"):  # GGUF weights are dequantized while they load
        return loaded
    if quantization == "bitsandbytes":
        from loomserve.platform.quantization.bitsandbytes import quantize_model

        return quantize_model(model, loaded, groups)
    if quantization in ("gptq", "awq"):
        from loomserve.platform.quantization.int4 import check_int4_config, quantize_model_int4

        return quantize_model_int4(model, loaded, groups, check_int4_config(_saved_config(hf_config)))
    saved = _saved_config(hf_config)
    if quantization == "compressed-tensors":
        from loomserve.platform.quantization import compressed_tensors as ct

        return ct.quantize_model_compressed_tensors(model, loaded, groups, ct.check_compressed_tensors_config(saved))
    from loomserve.platform.quantization.w8a8 import check_fp8_config, quantize_model_w8

    return quantize_model_w8(model, loaded, groups, check_fp8_config(saved) if saved else None)
