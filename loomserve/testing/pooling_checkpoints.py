"""Seeded tiny pooling checkpoints in real Hugging Face + sentence-transformers format, built locally (no model hub).

- Encoders (`bert`, `xlm-roberta`): a `BertModel` / `XLMRobertaModel` embedder saved as a SentenceTransformer would
  save it (`modules.json`, `1_Pooling/config.json`, `2_Normalize`, `sentence_bert_config.json`,
  `config_sentence_transformers.json`), or a `*ForSequenceClassification` cross-encoder saved as a CrossEncoder
  (its activation in `config_sentence_transformers.json`). Tokenizers are trained on the fly: WordPiece with
  `[CLS] A [SEP] B [SEP]` pairs and segment ids for BERT, Unigram with `<s> A </s></s> B </s>` for XLM-R.
- A Qwen3-Embedding-style decoder embedder: a `Qwen3Model` (base-model tensor names, no LM head) with last-token
  pooling, Normalize, query/document prompts and matryoshka dimensions.

Built once into the same cache as the text checkpoints (`testing.cache.cached_build`), keyed by a SHA-256 of the
arguments; safe under concurrent builds (temp folder + rename).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from loomserve.testing.cache import cached_build
from loomserve.testing.checkpoints import CORPUS, FORMAT_VERSION, build_tokenizer
from loomserve.testing.weights import init_weights

ENCODER_FAMILIES = ("bert", "xlm-roberta")

# Bump whenever the bytes a build writes change.
POOLING_FORMAT_VERSION = 1

INIT_STD = 0.2  # weights, embeddings and biases (see init_weights)
ENCODER_VOCAB_SIZE = 600

DECODER_PROMPTS = {"query": "Instruct: Given a question, find passages that answer it\nQuery: ", "document": ""}
DECODER_MATRYOSHKA_DIMENSIONS = [16, 32, 64]

_ST_VERSION = {"__version__": {"sentence_transformers": "6.2.0", "transformers": "5.24.0", "pytorch": "2.13.0"}}


def _bert_tokenizer(max_len: int) -> Any:
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import BertTokenizerFast

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    trainer = trainers.WordPieceTrainer(vocab_size=ENCODER_VOCAB_SIZE, special_tokens=specials, show_progress=False)
    tok.train_from_iterator(list(CORPUS), trainer=trainer)
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls), ("[SEP]", sep)]
    )
    return BertTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                             sep_token="[SEP]", mask_token="[MASK]", model_max_length=max_len)


def _xlm_roberta_tokenizer(max_len: int) -> Any:
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import XLMRobertaTokenizerFast

    tok = Tokenizer(models.Unigram())
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.UnigramTrainer(vocab_size=ENCODER_VOCAB_SIZE, special_tokens=["<s>", "<pad>", "</s>", "<unk>"],
                                      unk_token="<unk>", show_progress=False)
    tok.train_from_iterator(list(CORPUS), trainer=trainer)
    tok.add_special_tokens([AddedToken("<mask>", special=True)])
    bos, eos = tok.token_to_id("<s>"), tok.token_to_id("</s>")
    tok.post_processor = processors.RobertaProcessing(("</s>", eos), ("<s>", bos))
    return XLMRobertaTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", sep_token="</s>",
                                   cls_token="<s>", unk_token="<unk>", pad_token="<pad>", mask_token="<mask>",
                                   model_max_length=max_len)


def _write_json(path: Path, content: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(content, indent=2) + "\n")


def _module(idx: int, path: str, kind: str) -> dict[str, Any]:
    return {"idx": idx, "name": str(idx), "path": path, "type": f"sentence_transformers.{kind}"}


def _write_embedder_files(path: Path, pooling_mode: str, dimension: int, max_seq_length: int,
                          prompts: dict[str, str] | None = None) -> None:
    """The files SentenceTransformer.save writes for Transformer -> Pooling -> Normalize."""
    _write_json(path / "modules.json", [
        _module(0, "", "base.modules.transformer.Transformer"),
        _module(1, "1_Pooling", "sentence_transformer.modules.pooling.Pooling"),
        _module(2, "2_Normalize", "base.modules.normalize.Normalize"),
    ])
    _write_json(path / "1_Pooling" / "config.json",
                {"embedding_dimension": dimension, "pooling_mode": pooling_mode, "include_prompt": True})
    _write_json(path / "2_Normalize" / "config.json", {})
    _write_json(path / "sentence_bert_config.json", {"max_seq_length": max_seq_length, "do_lower_case": False})
    _write_json(path / "config_sentence_transformers.json", {
        **_ST_VERSION, "model_type": "SentenceTransformer", "prompts": prompts or {}, "default_prompt_name": None,
        "similarity_fn_name": "cosine",
    })


def _write_cross_encoder_files(path: Path, activation: str) -> None:
    """The files CrossEncoder.save writes: one Transformer module, the activation (a torch.nn path) of its scores."""
    _write_json(path / "modules.json", [_module(0, "", "base.modules.transformer.Transformer")])
    _write_json(path / "sentence_bert_config.json", {"transformer_task": "sequence-classification"})
    _write_json(path / "config_sentence_transformers.json", {
        **_ST_VERSION, "model_type": "CrossEncoder", "activation_fn": activation,
        "prompts": {}, "default_prompt_name": None,
    })


def build_tiny_encoder(
    path: str | Path,
    family: str,
    *,
    head: str = "embed",
    num_labels: int = 1,
    pooling_mode: str = "mean",
    sentence_transformers: bool = True,
    seed: int = 0,
    hidden_size: int = 32,
    num_layers: int = 2,
    num_heads: int = 4,
    intermediate_size: int = 64,
    max_position_embeddings: int = 130,
) -> Path:
    """A `bert` / `xlm-roberta` embedder (`head="embed"`, with `pooling_mode` cls / mean) or cross-encoder
    (`head="classify"`, `num_labels` labels; Sigmoid for one label, Identity for several, as CrossEncoder saves).
    `sentence_transformers=False` leaves out the sentence-transformers files (a plain transformers checkpoint)."""
    if family not in ENCODER_FAMILIES:
        raise ValueError(f"unknown encoder family {family!r}; expected one of {ENCODER_FAMILIES}")
    if head not in ("embed", "classify"):
        raise ValueError(f"head must be 'embed' or 'classify', got {head!r}")
    import torch
    import transformers

    path = Path(path)
    roberta = family == "xlm-roberta"
    max_len = max_position_embeddings - 2 if roberta else max_position_embeddings  # RoBERTa offsets positions
    tokenizer = _xlm_roberta_tokenizer(max_len) if roberta else _bert_tokenizer(max_len)
    prefix = "XLMRoberta" if roberta else "Bert"
    config = getattr(transformers, f"{prefix}Config")(
        vocab_size=len(tokenizer), hidden_size=hidden_size, num_hidden_layers=num_layers,
        num_attention_heads=num_heads, intermediate_size=intermediate_size, hidden_act="gelu",
        max_position_embeddings=max_position_embeddings, type_vocab_size=1 if roberta else 2,
        pad_token_id=tokenizer.pad_token_id, layer_norm_eps=1e-12, num_labels=num_labels,
        architectures=[f"{prefix}{'Model' if head == 'embed' else 'ForSequenceClassification'}"],
    )
    model_cls = getattr(transformers, config.architectures[0])
    torch.manual_seed(seed)
    model = model_cls(config).to(torch.float32)
    init_weights(model, seed, INIT_STD)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    if not sentence_transformers:
        return path
    if head == "embed":
        _write_embedder_files(path, pooling_mode, hidden_size, max_len)
    else:
        identity, sigmoid = "torch.nn.modules.linear.Identity", "torch.nn.modules.activation.Sigmoid"
        _write_cross_encoder_files(path, sigmoid if num_labels == 1 else identity)
    return path


def build_tiny_decoder_embedder(
    path: str | Path,
    *,
    seed: int = 0,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 128,
    max_position_embeddings: int = 1024,
) -> Path:
    """A Qwen3-Embedding-style checkpoint: `Qwen3Model` weights, last-token pooling, Normalize, query/document
    prompts and `matryoshka_dimensions` in config.json."""
    import torch
    from transformers import Qwen3Config, Qwen3Model

    path = Path(path)
    tokenizer = build_tokenizer("qwen3", model_max_length=max_position_embeddings)
    ids = tokenizer.convert_tokens_to_ids
    config = Qwen3Config(
        vocab_size=len(tokenizer), hidden_size=hidden_size, num_hidden_layers=num_layers,
        num_attention_heads=num_heads, num_key_value_heads=num_kv_heads, head_dim=hidden_size // num_heads,
        intermediate_size=intermediate_size, max_position_embeddings=max_position_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}, rms_norm_eps=1e-6, hidden_act="silu",
        use_sliding_window=False, sliding_window=None, attention_bias=False, tie_word_embeddings=False,
        bos_token_id=ids("<|endoftext|>"), eos_token_id=ids("<|im_end|>"), pad_token_id=ids("<|endoftext|>"),
        architectures=["Qwen3Model"], matryoshka_dimensions=DECODER_MATRYOSHKA_DIMENSIONS,
    )
    torch.manual_seed(seed)
    model = Qwen3Model(config).to(torch.float32)
    init_weights(model, seed, INIT_STD)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    _write_embedder_files(path, "lasttoken", hidden_size, max_position_embeddings, DECODER_PROMPTS)
    return path


def _cached(name: str, kwargs: dict[str, Any], build: Callable[[Path], Path]) -> Path:
    return cached_build(name, {"v": [FORMAT_VERSION, POOLING_FORMAT_VERSION], "name": name, "args": kwargs}, build)


def tiny_encoder(family: str, **kwargs: Any) -> Path:
    """`build_tiny_encoder`, built once into the cache; returns the folder."""
    return _cached(f"{family}-{kwargs.get('head', 'embed')}", kwargs,
                   lambda path: build_tiny_encoder(path, family, **kwargs))


def tiny_decoder_embedder(**kwargs: Any) -> Path:
    """`build_tiny_decoder_embedder`, built once into the cache; returns the folder."""
    return _cached("qwen3-embedding", kwargs, lambda path: build_tiny_decoder_embedder(path, **kwargs))
