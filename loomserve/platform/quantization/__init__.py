"""Weight quantization of the base model: NF4 through bitsandbytes (QLoRA serving).

Importing this package does not import bitsandbytes; only quantizing or loading a 4-bit checkpoint does.
"""

from loomserve.platform.quantization.bitsandbytes import (
    NF4Linear,
    check_quantization,
    quantize_model,
    split_prequantized,
)

__all__ = ["NF4Linear", "check_quantization", "quantize_model", "split_prequantized"]
