"""Tiny seeded GGUF files, written with the `gguf` package's writer as llama.cpp's converter writes them: a tiny
Llama checkpoint's config as `llama.*` metadata, its byte-level BPE tokenizer and chat template as `tokenizer.*`,
q/k rows permuted for llama.cpp's RoPE, and every matrix in one block format.

Q4_0, Q4_1 and Q8_0 are quantized from the checkpoint's weights (`gguf.quants.quantize`). The `gguf` package has
no quantizer for the K-quants (Q4_K, Q5_K, Q6_K): their matrices are seeded random blocks whose scale fields are
set so that the dequantized weights have about the checkpoint's spread."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from loomserve.testing.cache import cached_build
from loomserve.testing.checkpoints import INIT_STD, tiny_checkpoint

FORMAT_VERSION = 2
GGUF_NAME = "model.gguf"
# Every matrix's input dim is a multiple of the K-quants' 256-value super-block.
SHAPE = {"hidden_size": 256, "intermediate_size": 512, "num_heads": 4, "num_kv_heads": 2}

# K-quant block layout: bytes per 256 values, and its float16 scale fields as (byte offset, value in units of the
# target spread): `d` divides it by the largest |quant * sub-block scale|; `dmin` (Q4_K, Q5_K: value d * q * sc -
# dmin * m with unsigned q) is the mean quant times d, which centres the weights around zero.
_K_QUANTS = {"Q4_K": (144, ((0, 1 / (15 * 63)), (2, 7.5 / (15 * 63)))),
             "Q5_K": (176, ((0, 1 / (31 * 63)), (2, 15.5 / (31 * 63)))),
             "Q6_K": (210, ((208, 1 / (32 * 127)),))}


def tiny_gguf(qtype: str, seed: int = 0) -> Path:
    """A folder holding `model.gguf`: a tiny Llama with every matrix in block format `qtype`."""
    return cached_build("gguf-llama", [FORMAT_VERSION, qtype, seed, SHAPE],
                        lambda folder: write_gguf(tiny_checkpoint("llama", seed=seed, **SHAPE), folder / GGUF_NAME,
                                                  qtype, seed))


def write_gguf(checkpoint: Path, path: Path, qtype: str, seed: int) -> Path:
    """Convert a tiny Llama checkpoint folder into the GGUF file `path`."""
    import gguf
    from safetensors.numpy import load_file

    config = json.loads((checkpoint / "config.json").read_text())
    writer = gguf.GGUFWriter(str(path), "llama")
    _write_config(writer, config)
    _write_tokenizer(writer, checkpoint, config)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config["num_hidden_layers"])
    rng = np.random.default_rng(seed)
    for name, weights in sorted(load_file(checkpoint / "model.safetensors").items()):
        base, suffix = name.rsplit(".", 1)
        gguf_name = f"{names.get_name(base)}.{suffix}"
        weights = _permute_for_rope(name, weights, config)
        if weights.ndim == 1:
            writer.add_tensor(gguf_name, weights.astype(np.float32))
        else:
            data = _quantize(weights, qtype, rng)
            writer.add_tensor(gguf_name, data, raw_shape=data.shape, raw_dtype=gguf.GGMLQuantizationType[qtype])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _write_config(writer: Any, config: dict[str, Any]) -> None:
    heads = config["num_attention_heads"]
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(config["num_key_value_heads"])
    writer.add_rope_dimension_count(config.get("head_dim") or config["hidden_size"] // heads)
    writer.add_rope_freq_base(config["rope_parameters"]["rope_theta"])
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_vocab_size(config["vocab_size"])


def _write_tokenizer(writer: Any, checkpoint: Path, config: dict[str, Any]) -> None:
    """The byte-level BPE as llama.cpp's `gpt2` tokenizer model: tokens by id, their types, merges."""
    tokenizer = json.loads((checkpoint / "tokenizer.json").read_text())
    vocab = dict(tokenizer["model"]["vocab"])
    special = {t["content"]: t["id"] for t in tokenizer["added_tokens"]}
    vocab.update(special)
    tokens = sorted(vocab, key=vocab.get)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if t in special else 1 for t in tokens])  # 3: control, 1: normal
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in tokenizer["model"]["merges"]])
    writer.add_bos_token_id(config["bos_token_id"])
    writer.add_eos_token_id(config["eos_token_id"])
    writer.add_pad_token_id(config["pad_token_id"])
    writer.add_chat_template((checkpoint / "chat_template.jinja").read_text())


def _permute_for_rope(name: str, weights: np.ndarray, config: dict[str, Any]) -> np.ndarray:
    """llama.cpp's converter reorders q/k rows from rotate-half to interleaved pairs (its RoPE)."""
    if name.endswith("q_proj.weight"):
        heads = config["num_attention_heads"]
    elif name.endswith("k_proj.weight"):
        heads = config["num_key_value_heads"]
    else:
        return weights
    return (weights.reshape(heads, 2, weights.shape[0] // heads // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


def _quantize(weights: np.ndarray, qtype: str, rng: np.random.Generator) -> np.ndarray:
    """[out, in] float weights -> [out, bytes per row] uint8 blocks of `qtype`."""
    import gguf

    if qtype not in _K_QUANTS:
        return gguf.quants.quantize(weights.astype(np.float32), gguf.GGMLQuantizationType[qtype])
    block_bytes, scales = _K_QUANTS[qtype]
    rows, cols = weights.shape
    blocks = rng.integers(0, 256, size=(rows, cols // 256, block_bytes), dtype=np.uint8)
    for offset, value in scales:
        blocks[:, :, offset:offset + 2] = np.array([2 * INIT_STD * value], dtype=np.float16).view(np.uint8)
    return blocks.reshape(rows, -1)
