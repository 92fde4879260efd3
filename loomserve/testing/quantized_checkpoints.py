"""Tiny seeded checkpoints quantized by compressed-tensors' own tools, as llm-compressor saves them: a tiny Llama
(every matrix a multiple of the 128x128 FP8 block) gets a preset scheme (`FP8`, `FP8_DYNAMIC`, `FP8_BLOCK`, ...)
through `apply_quantization_config`; weight scales come from each weight's min/max (`calculate_qparams`, what
llm-compressor's min-max observer computes), static activation scales from a calibration forward; then
`ModelCompressor` compresses the weights and writes the `quantization_config`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from loomserve.testing.cache import cached_build
from loomserve.testing.checkpoints import tiny_checkpoint

FORMAT_VERSION = 1
SHAPE = {"hidden_size": 256, "intermediate_size": 512, "num_heads": 4, "num_kv_heads": 2}
CALIBRATION_IDS = list(range(3, 67))


def tiny_compressed_tensors(preset: str, seed: int = 0) -> Path:
    """A folder holding a tiny Llama quantized with compressed-tensors' preset scheme `preset`."""
    return cached_build("ct-llama", [FORMAT_VERSION, preset, seed, SHAPE],
                        lambda folder: write_compressed_tensors(tiny_checkpoint("llama", seed=seed, **SHAPE), folder,
                                                                preset))


def write_compressed_tensors(checkpoint: Path, folder: Path, preset: str) -> Path:
    import torch
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import (
        QuantizationConfig,
        apply_quantization_config,
        disable_quantization,
        preset_name_to_scheme,
    )
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
    config = QuantizationConfig(config_groups={"group_0": preset_name_to_scheme(preset, ["Linear"])},
                                ignore=["lm_head"])
    apply_quantization_config(model, config)
    quantized = {name: m for name, m in model.named_modules() if getattr(m, "quantization_scheme", None)}
    for module in quantized.values():
        _set_weight_qparams(module)
    model.apply(disable_quantization)  # calibrate on the dense forward
    _calibrate_static_inputs(model, quantized)
    compressor = ModelCompressor.from_pretrained_model(model)
    compressor.compress_model(model)
    model.save_pretrained(folder)
    compressor.update_config(folder)
    AutoTokenizer.from_pretrained(checkpoint).save_pretrained(folder)
    return folder


def _set_weight_qparams(module: Any) -> None:
    """Scale (and zero point) of each of the weight's scale blocks: a tensor, a row, or a block of rows x cols."""
    from compressed_tensors.quantization.utils import calculate_qparams

    weight, scale = module.weight.data, module.weight_scale
    rows, cols = (scale.shape[0], scale.shape[1]) if scale.dim() == 2 else (1, 1)
    blocks = weight.reshape(rows, weight.shape[0] // rows, cols, weight.shape[1] // cols)
    args = module.quantization_scheme.weights
    value, zero = calculate_qparams(blocks.amin(dim=(1, 3)), blocks.amax(dim=(1, 3)), args)
    module.weight_scale.data.copy_(value.reshape(scale.shape))
    module.weight_zero_point.data.copy_(zero.reshape(module.weight_zero_point.shape))


def _calibrate_static_inputs(model: Any, quantized: dict[str, Any]) -> None:
    """Static activation scales: each input's largest magnitude over a calibration prompt."""
    import torch
    from compressed_tensors.quantization.utils import calculate_qparams

    static = {name: m for name, m in quantized.items() if hasattr(m, "input_scale")}
    amax: dict[str, float] = {}

    def record(name: str) -> Any:
        return lambda module, args: amax.__setitem__(name, max(amax.get(name, 0.0), args[0].abs().max().item()))

    hooks = [m.register_forward_pre_hook(record(name)) for name, m in static.items()]
    with torch.no_grad():
        model(torch.tensor([CALIBRATION_IDS]))
    for hook in hooks:
        hook.remove()
    for name, m in static.items():
        bound = torch.tensor([amax[name]])
        value, zero = calculate_qparams(-bound, bound, m.quantization_scheme.input_activations)
        m.input_scale.data.copy_(value.reshape(m.input_scale.shape))
        m.input_zero_point.data.copy_(zero.reshape(m.input_zero_point.shape))


def tiny_block_fp8(seed: int = 0) -> Path:
    """The `FP8_BLOCK` checkpoint in DeepSeek's / Qwen's `quant_method: fp8` format (transformers writes that
    format only on a GPU): the same FP8 weights and 128x128 block scales, the scales named `weight_scale_inv`."""
    return cached_build("fp8-block-llama", [FORMAT_VERSION, seed, SHAPE],
                        lambda folder: _rename_block_fp8(tiny_compressed_tensors("FP8_BLOCK", seed), folder))


def _rename_block_fp8(source: Path, folder: Path) -> Path:
    import json
    import shutil

    from safetensors.torch import load_file, save_file

    tensors = load_file(source / "model.safetensors")
    renamed = {name.replace(".weight_scale", ".weight_scale_inv"): t for name, t in tensors.items()}
    save_file(renamed, folder / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((source / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                     "weight_block_size": [128, 128]}
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    for path in source.iterdir():
        if path.name not in ("config.json", "model.safetensors"):
            shutil.copy(path, folder / path.name)
    return folder
