"""Tiny seeded GPTQ and AWQ checkpoints, packed as AutoGPTQ (v1 format) and AutoAWQ (GEMM) pack them, beside a
dense checkpoint of exactly the weights they encode (the reference: transformers runs neither format on a CPU).

Each decoder matrix is rounded to 4 bits per group of input columns (round-to-nearest; GPTQ symmetric with zero
point 8, AWQ asymmetric), with act-order's random permutation of the groups when asked. The dense twin holds
(value - zero point) * scale computed from the integers before packing, so reading the packing back is what a test
of the loader checks."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

from loomserve.testing.cache import cached_build
from loomserve.testing.checkpoints import tiny_checkpoint

FORMAT_VERSION = 3
SHAPE = {"hidden_size": 256, "intermediate_size": 512, "num_heads": 4, "num_kv_heads": 2}
AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]  # AutoAWQ's pack order: nibble i holds output column AWQ_ORDER[i] of 8
_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def tiny_int4(method: str, group_size: int, act_order: bool = False, seed: int = 0) -> tuple[Path, Path]:
    """(quantized checkpoint, dense checkpoint of the same weights) of a tiny Llama."""
    key = [FORMAT_VERSION, method, group_size, act_order, seed, SHAPE]
    folder = cached_build(f"{method}-llama", key, lambda path: _build(path, method, group_size, act_order, seed))
    return folder / "quantized", folder / "dense"


def _build(folder: Path, method: str, group_size: int, act_order: bool, seed: int) -> None:
    from safetensors.numpy import load_file, save_file

    source = tiny_checkpoint("llama", seed=seed, **SHAPE)
    rng = np.random.default_rng(seed)
    quantized, dense = {}, {}
    for name, tensor in load_file(source / "model.safetensors").items():
        base = name.removesuffix(".weight")
        if not (name.endswith(".weight") and base.rsplit(".", 1)[-1] in _PROJECTIONS):
            quantized[name] = dense[name] = tensor
            continue
        parts, dense[name] = _quantize(tensor.astype(np.float32), method, group_size, act_order, rng)
        quantized.update({f"{base}.{part}": value for part, value in parts.items()})
    for sub, tensors in (("quantized", quantized), ("dense", dense)):
        shutil.copytree(source, folder / sub)
        # safetensors writes an array's buffer as it lies: transposed views must be made contiguous first
        tensors = {name: np.ascontiguousarray(t) for name, t in tensors.items()}
        save_file(tensors, folder / sub / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((folder / "quantized" / "config.json").read_text())
    config["quantization_config"] = _config(method, group_size, act_order)
    (folder / "quantized" / "config.json").write_text(json.dumps(config, indent=2))


def _config(method: str, group_size: int, act_order: bool) -> dict:
    if method == "gptq":
        return {"quant_method": "gptq", "bits": 4, "group_size": group_size, "desc_act": act_order, "sym": True,
                "checkpoint_format": "gptq"}
    return {"quant_method": "awq", "bits": 4, "group_size": group_size, "zero_point": True, "version": "gemm"}


def _quantize(weight: np.ndarray, method: str, group_size: int, act_order: bool, rng: np.random.Generator
              ) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """[out, in] float weights -> (packed tensors, [out, in] float weights they encode)."""
    out_features, in_features = weight.shape
    g_idx = np.arange(in_features) // group_size
    if act_order:  # GPTQ's desc_act: groups follow a permutation of the input columns
        g_idx = np.empty(in_features, dtype=np.int64)
        g_idx[rng.permutation(in_features)] = np.arange(in_features) // group_size
    groups = in_features // group_size
    w = weight.T  # [in, out]
    low = np.stack([w[g_idx == g].min(0) for g in range(groups)])  # [groups, out]
    high = np.stack([w[g_idx == g].max(0) for g in range(groups)])
    if method == "gptq":  # symmetric: zero point 8
        scales = (np.maximum(np.abs(low), np.abs(high)) * 2 / 15).astype(np.float16)
        zeros = np.full_like(scales, 8, dtype=np.int64)
    else:
        scales = ((high - low) / 15).astype(np.float16)
        zeros = np.clip(np.round(-low / scales.astype(np.float32)), 0, 15).astype(np.int64)
    s = np.where(scales == 0, np.float16(1), scales).astype(np.float32)
    values = np.clip(np.round(w / s[g_idx]) + zeros[g_idx], 0, 15).astype(np.int64)  # [in, out]
    encoded = ((values - zeros[g_idx]) * s[g_idx]).T.astype(np.float32)  # [out, in]
    scales = s.astype(np.float16)
    if method == "gptq":
        parts = {"qweight": _pack(values.T).T, "qzeros": _pack(zeros - 1), "scales": scales,
                 "g_idx": g_idx.astype(np.int32)}
    else:
        parts = {"qweight": _pack(values, AWQ_ORDER), "qzeros": _pack(zeros, AWQ_ORDER), "scales": scales}
    return parts, encoded


def _pack(values: np.ndarray, order: list[int] | None = None) -> np.ndarray:
    """[n, m] 4-bit values -> int32 [n, m / 8]: nibble i of each int32 holds column order[i] of its 8."""
    order = order or list(range(8))
    grouped = values.reshape(values.shape[0], -1, 8)[:, :, order].astype(np.uint32)  # [n, m / 8, 8]
    packed = np.zeros(grouped.shape[:2], dtype=np.uint32)
    for i in range(8):
        packed |= grouped[:, :, i] << np.uint32(4 * i)
    return np.ascontiguousarray(packed.view(np.int32))
