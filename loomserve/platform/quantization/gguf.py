"""GGUF checkpoints (llama.cpp's single-file format): config, tokenizer and weights all come from the `.gguf` file.

transformers reads the config and tokenizer (`gguf_file=`) and knows the GGUF -> Hugging Face tensor names and
each architecture's layout fixes (llama.cpp stores q/k rows permuted for its RoPE); the `gguf` package
dequantizes each block format (Q4_0, Q4_1, Q8_0, the K-quants, ...). Weights are dequantized at load, one tensor at
a time, and then served as dense weights.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

GGUF_SUFFIX = ".gguf"


def split_gguf_path(model: str) -> tuple[str, str | None]:
    """(folder, GGUF file name) of `model`: a `.gguf` file, or a folder holding exactly one `.gguf` and no
    safetensors weights; (model, None) for anything else."""
    if os.path.isfile(model) and model.endswith(GGUF_SUFFIX):
        path = Path(model)
        return str(path.parent), path.name
    if not os.path.isdir(model) or any(Path(model).glob("*.safetensors")):
        return model, None
    found = sorted(p.name for p in Path(model).glob(f"*{GGUF_SUFFIX}"))
    if len(found) > 1:
        raise ValueError(f"{model} holds {len(found)} GGUF files ({', '.join(found)}): give the path of one")
    return model, (found[0] if found else None)


def gguf_config(folder: str, gguf_file: str) -> Any:
    """The transformers config of a GGUF file, named for the architecture's causal-LM class (GGUF configs carry
    no `architectures`)."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    config = AutoConfig.from_pretrained(folder, gguf_file=gguf_file)
    if not getattr(config, "architectures", None):
        architecture = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(config.model_type)
        if architecture is None:
            raise ValueError(f"GGUF model type {config.model_type!r} has no causal-LM architecture in transformers")
        config.architectures = [architecture]
    return config


def iterate_gguf(path: str | os.PathLike, hf_config: Any) -> Iterator[tuple[str, torch.Tensor]]:
    """(Hugging Face name, float32 tensor) of each tensor of the GGUF file at `path`, dequantized one at a time."""
    from gguf import GGUFReader, dequantize
    from transformers import AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import (
        TENSOR_PROCESSORS,
        TensorProcessor,
        get_gguf_hf_weights_map,
        read_field,
    )

    reader = GGUFReader(path)
    architecture = read_field(reader, "general.architecture")[0]
    processor = TENSOR_PROCESSORS.get(architecture, TensorProcessor)(config=hf_config.to_dict())
    with torch.device("meta"):  # parameter names only, for the name map
        reference = AutoModelForCausalLM.from_config(hf_config)
    names = get_gguf_hf_weights_map(reference, processor)
    for tensor in reader.tensors:
        result = processor.process(weights=dequantize(tensor.data, tensor.tensor_type), name=tensor.name,
                                   tensor_key_mapping=names, parsed_parameters={"tensors": {}})
        if result.name in names:
            yield names[result.name], torch.from_numpy(result.weights.copy())  # [out, in] in HF's layout
