"""Quantized base weights: one method per checkpoint format (`methods.py` picks it), each a `QuantizedLinear` the
decoder layers call in place of their dense linears (`base.py`): NF4 (bitsandbytes), FP8 W8A8 (compressed-tensors
and the block-scaled `fp8` format), INT4 GPTQ / AWQ, compressed-tensors' packed integers, and GGUF (dequantized at
load). Under tensor parallelism each rank reads and builds only its slice (`tensor_parallel.py`).

Importing this package imports neither bitsandbytes, compressed-tensors nor gguf; only loading such weights does.
"""

from loomserve.platform.quantization.base import QuantizedLinear
from loomserve.platform.quantization.bitsandbytes import NF4Linear
from loomserve.platform.quantization.methods import QUANTIZATION_METHODS, check_quantization

__all__ = ["QUANTIZATION_METHODS", "NF4Linear", "QuantizedLinear", "check_quantization"]
