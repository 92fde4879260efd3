"""Seeded tiny image-text embedding checkpoints in real Hugging Face format: `CLIPModel` and `SiglipModel`.

Each folder holds what the hub repository of the family holds: ``config.json`` (text and vision sub-configs),
safetensors weights as transformers 5 saves them, a tokenizer saved with `save_pretrained` (CLIP wraps each text in
``<|startoftext|> ... <|endoftext|>``, SigLIP appends ``</s>``) and ``preprocessor_config.json`` for the family's
image processor (CLIP: shortest-edge resize and center crop; SigLIP: resize to a square). Built once into the cache
(`testing.cache.cached_build`), keyed by a SHA-256 of the arguments.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from loomserve.modalities.processors.qwen2_vl import _CLIP_MEAN, _CLIP_STD
from loomserve.testing.cache import cached_build
from loomserve.testing.checkpoints import CORPUS, FORMAT_VERSION, INIT_STD
from loomserve.testing.pooling_checkpoints import ENCODER_VOCAB_SIZE, _write_json
from loomserve.testing.weights import init_weights

CLIP_FAMILIES = ("clip", "siglip")

# Bump whenever the bytes a build writes change.
CLIP_FORMAT_VERSION = 1

IMAGE_SIZE = 28  # 2 x 2 patches of 14 px
_VISION = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
           "image_size": IMAGE_SIZE, "patch_size": 14, "initializer_range": INIT_STD}
_TEXT = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
         "initializer_range": INIT_STD}


def _tokenizer(family: str, max_len: int) -> Any:
    """A WordPiece tokenizer trained on CORPUS, with the family's special tokens around each text."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    if family == "clip":
        specials = {"unk_token": "<|endoftext|>", "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
                    "pad_token": "<|endoftext|>"}
        template = "<|startoftext|> $A <|endoftext|>"
    else:
        specials = {"unk_token": "<unk>", "eos_token": "</s>", "pad_token": "</s>"}
        template = "$A </s>"
    tok = Tokenizer(models.WordPiece(unk_token=specials["unk_token"]))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    names = list(dict.fromkeys(specials.values()))
    trainer = trainers.WordPieceTrainer(vocab_size=ENCODER_VOCAB_SIZE, special_tokens=names, show_progress=False)
    tok.train_from_iterator(list(CORPUS), trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single=template, special_tokens=[(t, tok.token_to_id(t)) for t in names if t in template]
    )
    return PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=max_len, **specials)


def _config(family: str, tokenizer: Any, max_len: int) -> Any:
    from transformers import CLIPConfig, SiglipConfig

    ids = {"vocab_size": len(tokenizer), "max_position_embeddings": max_len,
           "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id}
    if family == "clip":  # a projection narrower than either tower, so a missing projection is caught
        text = {**_TEXT, **ids, "bos_token_id": tokenizer.bos_token_id, "hidden_act": "quick_gelu"}
        vision = {**_VISION, "hidden_act": "quick_gelu"}
        return CLIPConfig(text_config=text, vision_config=vision, projection_dim=24, architectures=["CLIPModel"])
    text = {**_TEXT, **ids, "projection_size": _VISION["hidden_size"], "hidden_act": "gelu_pytorch_tanh"}
    vision = {**_VISION, "hidden_act": "gelu_pytorch_tanh"}
    return SiglipConfig(text_config=text, vision_config=vision, architectures=["SiglipModel"])


def _image_processor(family: str) -> dict[str, Any]:
    common = {"do_resize": True, "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
              "do_convert_rgb": True}
    if family == "clip":
        return {**common, "image_processor_type": "CLIPImageProcessor", "processor_class": "CLIPProcessor",
                "size": {"shortest_edge": IMAGE_SIZE}, "crop_size": {"height": IMAGE_SIZE, "width": IMAGE_SIZE},
                "do_center_crop": True, "image_mean": _CLIP_MEAN, "image_std": _CLIP_STD, "resample": 3}
    return {**common, "image_processor_type": "SiglipImageProcessor", "processor_class": "SiglipProcessor",
            "size": {"height": IMAGE_SIZE, "width": IMAGE_SIZE}, "image_mean": [0.5] * 3, "image_std": [0.5] * 3,
            "resample": 2}


def build_tiny_clip_checkpoint(path: str | Path, family: str, *, seed: int = 0, max_len: int = 32) -> Path:
    """Writes a tiny random `CLIPModel` or `SiglipModel` checkpoint with its tokenizer and image processor config."""
    if family not in CLIP_FAMILIES:
        raise ValueError(f"unknown image-text family {family!r}; expected one of {CLIP_FAMILIES}")
    import torch
    from transformers import AutoModel

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = _tokenizer(family, max_len)
    config = _config(family, tokenizer, max_len)
    torch.manual_seed(seed)
    model = AutoModel.from_config(config).to(torch.float32)
    init_weights(model, seed, INIT_STD)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    _write_json(path / "preprocessor_config.json", _image_processor(family))
    return path


def tiny_clip_checkpoint(family: str, **kwargs: Any) -> Path:
    """`build_tiny_clip_checkpoint`, built once into the cache; returns the folder."""
    key = {"v": [FORMAT_VERSION, CLIP_FORMAT_VERSION], "family": family, "args": kwargs}
    return cached_build(family, key, lambda path: build_tiny_clip_checkpoint(path, family, **kwargs))
