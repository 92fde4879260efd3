"""Which quantization method loads a checkpoint: the checkpoint's own (its `quantization_config`, or a `.gguf`
file), which `--quantization` may only confirm; a dense checkpoint may be quantized at load by a method that can
(`bitsandbytes` NF4, `fp8`)."""

from __future__ import annotations

from typing import Any

QUANTIZATION_METHODS = ("bitsandbytes", "fp8", "compressed-tensors", "gguf")
AT_LOAD = ("bitsandbytes", "fp8")  # methods that quantize a dense checkpoint's weights while loading


def checkpoint_quantization(hf_config: Any, gguf_file: str | None = None) -> str | None:
    """The method a checkpoint was saved with (None: dense weights), refused when it does not load here."""
    if gguf_file is not None:
        return "gguf"
    saved = getattr(hf_config, "quantization_config", None)
    if not saved:
        return None
    saved = saved if isinstance(saved, dict) else saved.to_dict()
    method = saved.get("quant_method")
    if method == "bitsandbytes" and saved.get("load_in_4bit"):
        return "bitsandbytes"
    if method == "fp8":
        from loomserve.platform.quantization.fp8 import check_fp8_config

        check_fp8_config(saved)
        return "fp8"
    if method == "compressed-tensors":
        from loomserve.platform.quantization.compressed_tensors import check_compressed_tensors_config

        check_compressed_tensors_config(saved)
        return "compressed-tensors"
    what = f"{method} 8-bit" if saved.get("load_in_8bit") else method
    raise ValueError(f"the checkpoint is quantized with {what}, which does not load here; loadable: bitsandbytes "
                     "4-bit, fp8, compressed-tensors (FP8 W8A8), GGUF")


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
