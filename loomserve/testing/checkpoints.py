"""Seeded tiny random checkpoints in real Hugging Face format, built locally (no model hub).

Each checkpoint folder holds ``config.json``, safetensors weights (optionally sharded with
``model.safetensors.index.json``), ``generation_config.json`` and a byte-level BPE tokenizer trained on
the fly (``tokenizer.json``, ``tokenizer_config.json``, ``chat_template.jinja``). Everything loads offline
with ``AutoModelForCausalLM.from_pretrained`` / ``AutoTokenizer.from_pretrained``.

Weights are drawn from a seeded generator with a large scale (``INIT_STD``), biases and norm gains are
random too, so greedy decoding has well separated top-1/top-2 logits and a forward that drops a bias or a
norm weight produces different tokens.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

from loomserve.testing.cache import cached_build
from loomserve.testing.weights import init_weights

FAMILIES = ("llama", "mistral", "qwen2", "qwen3")

# Bump whenever the bytes a build writes change (corpus, tokenizer, init, templates, config fields).
FORMAT_VERSION = 1

# Standard deviation of every weight matrix, embedding and bias (HF's default initializer_range is 0.02,
# which leaves random tiny models with nearly flat logits).
INIT_STD = 0.3

TOKENIZER_VOCAB_SIZE = 640  # BPE target before special tokens; the corpus may yield slightly fewer.

_ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}
_ROPE_THETA = {"llama": 10000.0, "mistral": 1000000.0, "qwen2": 1000000.0, "qwen3": 1000000.0}

# Same split as transformers' Qwen2Tokenizer, so the tokenizer.json pipeline matches what AutoTokenizer
# builds for qwen2/qwen3 model types (it ignores tokenizer.json's pre-tokenizer there).
_SPLIT_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

CORPUS: tuple[str, ...] = (
    "The quick brown fox jumps over the lazy dog.",
    "Hello, world! How are you doing today?",
    "I am fine, thank you. And you?",
    "Once upon a time, there was a little girl who lived in a village near the forest.",
    "The capital of France is Paris, and the capital of Japan is Tokyo.",
    "Water boils at 100 degrees Celsius at sea level.",
    "She sells sea shells by the sea shore.",
    "To be, or not to be, that is the question.",
    "A journey of a thousand miles begins with a single step.",
    "Please write a short poem about the ocean and the moon.",
    "The meeting is scheduled for 10:30 AM on Tuesday, March 3rd, 2026.",
    "Python is a programming language that lets you work quickly and integrate systems effectively.",
    "def add(a, b):\n    return a + b\n",
    "for i in range(10):\n    print(i * i)\n",
    'import json\ndata = {"name": "loom", "threads": 42}\nprint(json.dumps(data))\n',
    "The weather today is sunny with a high of 25 degrees and a light breeze.",
    "What is the meaning of life, the universe, and everything? The answer is 42.",
    "Machine learning models learn patterns from data instead of following explicit rules.",
    "The library opens at nine in the morning and closes at six in the evening.",
    "My favourite colours are red, green, blue, and yellow.",
    "He walked into the room, looked around, and sat down quietly.",
    "Can you recommend a good book about history or science?",
    "The train to Berlin leaves from platform 7 at 14:05.",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 100 1000 3.14159 -273.15",
    "Symbols: @ # $ % ^ & * ( ) [ ] { } < > / \\ | ~ ` ' \" ; : , . ? !",
    "Email me at someone@example.com or visit https://example.com/docs?page=2.",
    "The system is ready. Start the server, send a request, and read the response.",
    "Large language models generate text one token at a time.",
    "Summarize the following paragraph in one sentence.",
    "Translate to French: Good morning, my friend.",
    "Roses are red, violets are blue, sugar is sweet, and so are you.",
    "It was the best of times, it was the worst of times.",
    "  Indented text with  double  spaces\tand a tab.\n\nNew paragraph after a blank line.",
    "UPPERCASE WORDS AND lowercase words And Mixed Case Words.",
    "We're sure they'll say it's what you've done, and I'd agree.",
    "Un café au lait, s'il vous plaît. C'est très bon!",
    "A naïve résumé of the façade: déjà vu, coöperate, Zürich, São Paulo, Ångström.",
    "¿Dónde está la biblioteca? ¡Muy bien, señor!",
    "Grüße aus München: Straße, Mädchen, schön, über.",
    "Привет, мир! Как дела? Всё хорошо.",
    "Γειά σου κόσμε. Αλφα, βήτα, γάμμα.",
    "日本語のテキストです。東京は日本の首都です。",
    "中文：你好，世界！今天天气很好。",
    "한국어: 안녕하세요, 세계!",
    "العربية: مرحبا بالعالم",
    "Emoji: 😀 😂 🎉 🚀 ❤️ 👍 🐍 🌍 ✨ 🤖",
    "Math: ∑ ∫ √ ∞ ≈ ≠ ≤ ≥ π α β γ λ μ σ Ω → ← ↔ × ÷ ±",
    "Currency: € £ ¥ ₹ ₩ ¢ and the copyright sign © and the trademark sign ™.",
    "The end.",
)

# Chat templates (Jinja). String content or OpenAI-style lists of {"type": "text", "text": ...} parts.
_CONTENT_MACRO = (
    "{%- macro render_content(content) -%}"
    "{%- if content is string -%}{{- content -}}"
    "{%- elif content is none -%}"
    "{%- else -%}{%- for part in content -%}{%- if part['type'] == 'text' -%}{{- part['text'] -}}"
    "{%- endif -%}{%- endfor -%}{%- endif -%}"
    "{%- endmacro -%}\n"
)

# ChatML, as Qwen2/Qwen2.5/Qwen3 instruct models use.
_CHATML_TEMPLATE = _CONTENT_MACRO + (
    "{%- for message in messages -%}\n"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}\n"
    "{{- render_content(message['content']) + '<|im_end|>\\n' -}}\n"
    "{%- endfor -%}\n"
    "{%- if add_generation_prompt -%}\n"
    "{{- '<|im_start|>assistant\\n' -}}\n"
    "{%- endif -%}\n"
)

# Zephyr / TinyLlama-Chat style: every turn ends with eos, the generation prompt opens an assistant turn.
_ZEPHYR_TEMPLATE = _CONTENT_MACRO + (
    "{{- bos_token -}}\n"
    "{%- for message in messages -%}\n"
    "{{- '<|' + message['role'] + '|>\\n' + render_content(message['content']) + eos_token + '\\n' -}}\n"
    "{%- endfor -%}\n"
    "{%- if add_generation_prompt -%}\n"
    "{{- '<|assistant|>\\n' -}}\n"
    "{%- endif -%}\n"
)

# Mistral-Instruct style: the system prompt is prepended to the next user turn; the prompt already ends in
# [/INST], so add_generation_prompt adds nothing (as in Mistral's own templates).
_INST_TEMPLATE = _CONTENT_MACRO + (
    "{{- bos_token -}}\n"
    "{%- set ns = namespace(system='') -%}\n"
    "{%- for message in messages -%}\n"
    "{%- if message['role'] == 'system' -%}\n"
    "{%- set ns.system = render_content(message['content']) + '\\n\\n' -%}\n"
    "{%- elif message['role'] == 'user' -%}\n"
    "{{- '[INST] ' + ns.system + render_content(message['content']) + ' [/INST]' -}}\n"
    "{%- set ns.system = '' -%}\n"
    "{%- elif message['role'] == 'assistant' -%}\n"
    "{{- ' ' + render_content(message['content']) + eos_token -}}\n"
    "{%- endif -%}\n"
    "{%- endfor -%}\n"
)


def _check_family(family: str) -> None:
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")


def _special_tokens(family: str) -> dict[str, Any]:
    """Special tokens per family: the ones placed before the BPE vocab and the ones appended after it."""
    if family in ("qwen2", "qwen3"):
        return {
            "leading": [],
            "trailing": ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
            "bos_token": None,
            "eos_token": "<|im_end|>",
            "pad_token": "<|endoftext|>",
            "unk_token": None,
            "config_bos": "<|endoftext|>",
            "add_bos_token": False,
            "chat_template": _CHATML_TEMPLATE,
            "normalize_nfc": True,
        }
    return {
        "leading": ["<unk>", "<s>", "</s>"],
        "trailing": [],
        "bos_token": "<s>",
        "eos_token": "</s>",
        "pad_token": "</s>",
        "unk_token": "<unk>",
        "config_bos": "<s>",
        "add_bos_token": True,
        "chat_template": _ZEPHYR_TEMPLATE if family == "llama" else _INST_TEMPLATE,
        "normalize_nfc": False,
    }


def _train_tokenizer(family: str) -> Any:
    """Trains the byte-level BPE on CORPUS and returns a raw `tokenizers.Tokenizer` (deterministic)."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
    from tokenizers import trainers as bpe_trainers

    spec = _special_tokens(family)
    tok = Tokenizer(models.BPE(fuse_unk=False, byte_fallback=False))
    if spec["normalize_nfc"]:
        tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_SPLIT_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = bpe_trainers.BpeTrainer(
        vocab_size=TOKENIZER_VOCAB_SIZE + len(spec["leading"]),
        min_frequency=1,
        show_progress=False,
        special_tokens=[AddedToken(t, special=True, normalized=False) for t in spec["leading"]],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    # BPE training is deterministic for a fixed corpus (merge ties break by pair order, not hash order).
    tok.train_from_iterator(list(CORPUS), trainer=trainer)
    if spec["trailing"]:
        tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in spec["trailing"]])
    return tok


def build_tokenizer(family: str, model_max_length: int = 1024) -> Any:
    """The family's tokenizer as a `PreTrainedTokenizerFast` (with chat template), not yet saved."""
    _check_family(family)
    from transformers import PreTrainedTokenizerFast

    spec = _special_tokens(family)
    kwargs: dict[str, Any] = {
        "tokenizer_object": _train_tokenizer(family),
        "eos_token": spec["eos_token"],
        "pad_token": spec["pad_token"],
        "chat_template": spec["chat_template"],
        "model_max_length": model_max_length,
        "clean_up_tokenization_spaces": False,
        # Builds the BOS into tokenizer.json's post-processor. transformers 5 neither saves nor reads the flag
        # when tokenizer.json exists, so a reloaded tokenizer reports add_bos_token False but still adds <s>.
        "add_bos_token": spec["add_bos_token"],
        "add_eos_token": False,
    }
    if spec["bos_token"] is not None:
        kwargs["bos_token"] = spec["bos_token"]
    if spec["unk_token"] is not None:
        kwargs["unk_token"] = spec["unk_token"]
    if spec["trailing"]:
        kwargs["additional_special_tokens"] = [t for t in spec["trailing"] if t not in kwargs.values()]
    return PreTrainedTokenizerFast(**kwargs)


def special_token_ids(tokenizer: Any, family: str) -> tuple[int, int, int]:
    """(bos, eos, pad) ids a config of the family's checkpoint names, for its tokenizer."""
    spec = _special_tokens(family)
    return tuple(tokenizer.convert_tokens_to_ids(spec[key]) for key in ("config_bos", "eos_token", "pad_token"))


def _make_config(
    family: str,
    *,
    vocab_size: int,
    bos_token_id: int,
    eos_token_id: int,
    pad_token_id: int,
    hidden_size: int,
    num_layers: int,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int | None,
    intermediate_size: int,
    max_position_embeddings: int,
    tie_word_embeddings: bool,
    rope_parameters: dict | None,
) -> Any:
    from transformers import LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

    if rope_parameters is None:
        rope_parameters = {"rope_type": "default", "rope_theta": _ROPE_THETA[family]}
    kwargs: dict[str, Any] = {
        "vocab_size": vocab_size,
        "hidden_size": hidden_size,
        "num_hidden_layers": num_layers,
        "num_attention_heads": num_heads,
        "num_key_value_heads": num_kv_heads,
        "intermediate_size": intermediate_size,
        "max_position_embeddings": max_position_embeddings,
        "tie_word_embeddings": tie_word_embeddings,
        "rope_parameters": dict(rope_parameters),
        "bos_token_id": bos_token_id,
        "eos_token_id": eos_token_id,
        "pad_token_id": pad_token_id,
        "hidden_act": "silu",
        "rms_norm_eps": 1e-6,
        "initializer_range": INIT_STD,
        "architectures": [_ARCHITECTURES[family]],
        "dtype": "float32",
        "use_cache": True,
    }
    # Qwen2 configs carry no head_dim unless it differs from hidden_size // num_heads; the others always do.
    if head_dim is not None or family != "qwen2":
        kwargs["head_dim"] = head_dim if head_dim is not None else hidden_size // num_heads
    if family == "llama":
        return LlamaConfig(attention_bias=False, mlp_bias=False, **kwargs)
    if family == "mistral":
        return MistralConfig(sliding_window=None, **kwargs)
    if family == "qwen2":
        return Qwen2Config(use_sliding_window=False, sliding_window=None, **kwargs)
    return Qwen3Config(use_sliding_window=False, sliding_window=None, attention_bias=False, **kwargs)


def build_tiny_checkpoint(
    path: str | Path,
    family: str,
    *,
    seed: int = 0,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    head_dim: int | None = None,
    intermediate_size: int = 128,
    max_position_embeddings: int = 1024,
    tie_word_embeddings: bool = False,
    rope_parameters: dict | None = None,
    max_shard_size: str | None = None,
) -> Path:
    """Writes config.json, model safetensors (sharded with model.safetensors.index.json when max_shard_size
    is given), generation_config.json, tokenizer files and a chat template into `path`."""
    _check_family(family)
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)

    tokenizer = build_tokenizer(family, model_max_length=max_position_embeddings)
    bos_id, eos_id, pad_id = special_token_ids(tokenizer, family)

    config = _make_config(
        family,
        vocab_size=len(tokenizer),
        bos_token_id=bos_id,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
        hidden_size=hidden_size,
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        intermediate_size=intermediate_size,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=tie_word_embeddings,
        rope_parameters=rope_parameters,
    )
    save_kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    return save_random_model(path, config, tokenizer, seed, **save_kwargs)


def save_random_model(path: Path, config: Any, tokenizer: Any, seed: int, **save_kwargs: Any) -> Path:
    """A causal LM of `config` with seeded random weights, its generation config (the config's special tokens) and
    `tokenizer`, saved into `path`."""
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    init_weights(model, seed, INIT_STD)
    model.generation_config = GenerationConfig(bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id,
                                               pad_token_id=config.pad_token_id)
    model.save_pretrained(path, **save_kwargs)
    tokenizer.save_pretrained(path)
    return path


_BUILD_SIGNATURE = inspect.signature(build_tiny_checkpoint)


def build_key(signature: inspect.Signature, family: str, kwargs: dict[str, Any],
              format_version: int = FORMAT_VERSION) -> dict[str, Any]:
    """A build's arguments (`signature` is the builder's: `(path, family, **kwargs)`) with their defaults filled in,
    so equal builds share a folder."""
    bound = signature.bind("<path>", family, **kwargs)
    bound.apply_defaults()
    args = dict(bound.arguments)
    del args["path"]
    return {"format_version": format_version, "args": args}


def cached_tiny_checkpoint(family: str, kwargs: dict[str, Any], name: str) -> Path:
    """`build_tiny_checkpoint(folder, family, **kwargs)`, built once into the cache as `name-<key digest>`."""
    key = build_key(_BUILD_SIGNATURE, family, kwargs)
    return cached_build(name, key, lambda path: build_tiny_checkpoint(path, family, **kwargs))


def tiny_checkpoint(family: str, **kwargs: Any) -> Path:
    """Builds once into the cache folder (`cached_build`), keyed by family, kwargs and FORMAT_VERSION, and
    returns the path."""
    _check_family(family)
    if "path" in kwargs:
        raise TypeError("tiny_checkpoint() chooses the path itself; use build_tiny_checkpoint(path, ...)")
    return cached_tiny_checkpoint(family, kwargs, family)
