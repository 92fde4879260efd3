"""Prompts in, validated pooling requests out, for the LLM class and the HTTP routes alike: the checkpoint's prompts,
truncation, cross-encoder pairs, and the checks that turn bad input into a clear ValueError."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from loomserve.platform.config import EngineConfig
from loomserve.platform.input_processor import check_vocabulary
from loomserve.pooling.config import PoolerConfig
from loomserve.pooling.params import PoolingParams

if TYPE_CHECKING:
    from loomserve.modalities.frontend import MultiModalFrontend
    from loomserve.modalities.inputs import MultiModalItem

# A prompt: text, token ids, or vLLM's dict form {"prompt": ...} / {"prompt_token_ids": [...]}.
PoolingPrompt = str | list[int] | dict[str, Any]

# sentence-transformers' encode_query / encode_document use these prompts when the checkpoint has them.
QUERY_PROMPTS = ("query",)
DOCUMENT_PROMPTS = ("document", "passage", "corpus")


class PoolingInputs:
    def __init__(self, config: EngineConfig, tokenizer: Any) -> None:
        mc = config.model_config
        self.model_config = mc
        self.tokenizer = tokenizer
        self.pooler_config: PoolerConfig = mc.pooler_config
        self.max_model_len = mc.max_model_len
        self.max_num_batched_tokens = config.scheduler_config.max_num_batched_tokens
        self.chunked_prefill = config.scheduler_config.enable_chunked_prefill
        self.hidden_size = pooled_width(mc.hf_config)
        self.vocab_size = mc.vocab_size  # read once: a config attribute lookup costs microseconds per request
        self.num_labels = getattr(mc.hf_config, "num_labels", 1) if mc.task == "classify" else None

    def require_task(self, what: str, *tasks: str) -> None:
        """ValueError unless this model serves one of `tasks`."""
        task = self.model_config.task
        if task not in tasks:
            raise ValueError(
                f"{what} needs {' or '.join(_TASK_NOUNS[t] for t in tasks)}; "
                f"{self.model_config.served_model_name} is {_TASK_NOUNS[task]}"
            )

    def require_scores(self) -> None:
        """Scores come from a one-label cross-encoder's head, or from an embedding model's cosine similarity."""
        self.require_task("Scoring", "classify", "embed")
        if self.num_labels is not None and self.num_labels != 1:
            raise ValueError(f"Scoring needs a cross-encoder with one label; this one has {self.num_labels}")

    def params(self, params: PoolingParams | None = None) -> PoolingParams:
        """The request's complete parameters; ValueError for a `dimensions` the model cannot give."""
        resolved = self.pooler_config.resolve(params)
        if self.model_config.task != "classify":
            self.pooler_config.check_dimensions(resolved.dimensions, self.hidden_size)
        return resolved

    def tokenize(
        self,
        prompts: Sequence[PoolingPrompt],
        truncate_prompt_tokens: int | None = None,
        prompt_name: str | None = None,
        add_special_tokens: bool = True,
    ) -> list[list[int]]:
        """Token ids of each prompt. Texts get the checkpoint's prompt (named, else default) prepended and, with
        truncation, are cut by the tokenizer (keeping its special tokens); token ids keep their last tokens."""
        limit = self.truncation(truncate_prompt_tokens)
        prefix = self.pooler_config.prompt(prompt_name)
        out: list[list[int] | None] = [None] * len(prompts)
        texts: list[tuple[int, str]] = []
        for i, prompt in enumerate(prompts):
            if isinstance(prompt, dict):
                prompt = prompt["prompt_token_ids"] if "prompt_token_ids" in prompt else prompt["prompt"]
            if isinstance(prompt, str):
                texts.append((i, prefix + prompt))
            else:
                out[i] = list(prompt)[-limit:] if limit else list(prompt)
        if texts:
            for (i, _), ids in zip(texts, self._encode([t for _, t in texts], limit, add_special_tokens)):
                out[i] = ids
        return out

    def _encode(self, texts: list[str], limit: int | None, add_special_tokens: bool) -> list[list[int]]:
        """Token ids of each text. Without truncation, a fast tokenizer's Rust `encode_batch` is called directly:
        transformers' per-text conversion to a dict cost ~17 us a text, as much as the GPU's whole encoder step."""
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        if limit is None and backend is not None and backend.truncation is None and backend.padding is None:
            return [e.ids for e in backend.encode_batch(texts, add_special_tokens=add_special_tokens)]
        truncation = {"truncation": True, "max_length": limit} if limit else {}
        return self.tokenizer(texts, add_special_tokens=add_special_tokens, **truncation)["input_ids"]

    def tokenize_pairs(
        self, pairs: Sequence[tuple[str, str]], truncate_prompt_tokens: int | None = None
    ) -> list[tuple[list[int], list[int] | None]]:
        """(token ids, segment ids or None when all zero) of each (text_1, text_2) pair, for a cross-encoder."""
        limit = self.truncation(truncate_prompt_tokens)
        truncation = {"truncation": True, "max_length": limit} if limit else {}
        encoded = self.tokenizer([a for a, _ in pairs], [b for _, b in pairs], **truncation)
        types = encoded.get("token_type_ids") or [None] * len(pairs)
        return [(ids, t if t and any(t) else None) for ids, t in zip(encoded["input_ids"], types)]

    def truncation(self, truncate_prompt_tokens: int | None) -> int | None:
        """Tokens to keep: None (no truncation), or 1..max_model_len; -1 means max_model_len."""
        if truncate_prompt_tokens is None:
            return None
        if truncate_prompt_tokens == -1:
            return self.max_model_len
        if not 1 <= truncate_prompt_tokens <= self.max_model_len:
            raise ValueError(
                f"truncate_prompt_tokens must be -1 or between 1 and the model's maximum context length "
                f"{self.max_model_len}, got {truncate_prompt_tokens}"
            )
        return truncate_prompt_tokens

    def truncate_texts(self, texts: Sequence[str], max_tokens: int, what: str) -> list[str]:
        """Each text cut to its first `max_tokens` tokens (0: left whole), as vLLM's max_tokens_per_query /
        max_tokens_per_doc do; ValueError for a limit beyond the context."""
        if not max_tokens:
            return list(texts)
        if max_tokens > self.max_model_len:
            raise ValueError(f"{what} must be at most the model's maximum context length {self.max_model_len}, "
                             f"got {max_tokens}")
        ids = self.tokenizer(list(texts), add_special_tokens=False)["input_ids"]
        return [self.tokenizer.decode(t[:max_tokens]) if len(t) > max_tokens else text for text, t in zip(texts, ids)]

    def chunk_length(self, params: PoolingParams) -> int:
        """The most tokens one pass pools: the context, and the step budget for a prompt that runs whole."""
        whole = not self.chunked_prefill or params.needs_whole_prompt
        return min(self.max_model_len, self.max_num_batched_tokens) if whole else self.max_model_len

    def role_prompt_name(self, roles: tuple[str, ...]) -> str | None:
        """The checkpoint's prompt for queries or documents (QUERY_PROMPTS / DOCUMENT_PROMPTS), if it has one."""
        return next((name for name in roles if name in self.pooler_config.prompts), None)

    def validate(self, token_ids: list[int], params: PoolingParams, what: str = "the input") -> None:
        """ValueError, with the numbers, when `token_ids` cannot be pooled."""
        n = len(token_ids)
        if not n:
            raise ValueError(f"{what} is empty: the model has no tokens to pool (give some text or token ids)")
        if n > self.max_model_len:
            raise ValueError(
                f"This model's maximum context length is {self.max_model_len} tokens. However, {what} has {n} "
                "tokens. Shorten it, or set truncate_prompt_tokens to truncate it."
            )
        if (not self.chunked_prefill or params.needs_whole_prompt) and n > self.max_num_batched_tokens:
            raise ValueError(
                f"{what} has {n} tokens, but this pooling runs a prompt whole in one step of at most "
                f"{self.max_num_batched_tokens} tokens (raise --max-num-batched-tokens)"
            )
        check_vocabulary(token_ids, self.vocab_size, what)
        if params.token_type_ids is not None:
            types = getattr(self.model_config.hf_config, "type_vocab_size", 0) if self.model_config.encoder_only else 0
            if len(params.token_type_ids) != n or not all(0 <= t < types for t in params.token_type_ids):
                raise ValueError(f"token_type_ids must give each of the {n} tokens of {what} a segment id in "
                                 f"[0, {types})")
        if params.returned_token_ids and not all(0 <= i < self.hidden_size for i in params.returned_token_ids):
            raise ValueError(f"returned_token_ids must be in [0, {self.hidden_size})")


def pooled_width(hf_config: Any) -> int:
    """The width of the states pooled into vectors: an image-text model's shared embedding space (CLIP's
    `projection_dim`, SigLIP's text `projection_size`), else the text hidden size."""
    text = hf_config.get_text_config()
    return getattr(hf_config, "projection_dim", None) or getattr(text, "projection_size", None) or text.hidden_size


def expand_media(
    frontend: MultiModalFrontend, prompts: Sequence[PoolingPrompt], token_ids: list[list[int]]
) -> tuple[list[list[int]], list[list[MultiModalItem]]]:
    """Each prompt's token ids with its `multi_modal_data` in place (the model's processor says how), and its media
    items; MediaError (a ValueError) for media the model cannot take."""
    out_ids, out_items = [], []
    for prompt, ids in zip(prompts, token_ids, strict=True):
        mm_data = prompt.get("multi_modal_data") if isinstance(prompt, dict) else None
        ids, items = frontend.apply(ids, mm_data) if mm_data else (ids, [])
        out_ids.append(ids)
        out_items.append(items)
    return out_ids, out_items


def prompt_list(prompts: PoolingPrompt | Sequence[PoolingPrompt]) -> list[PoolingPrompt]:
    """One prompt (text, dict, or token ids) or a sequence of prompts -> a list of prompts."""
    if isinstance(prompts, (str, dict)) or (prompts and isinstance(prompts[0], int)):
        return [prompts]
    return list(prompts)


_TASK_NOUNS = {"generate": "a generative model", "embed": "an embedding model", "classify": "a cross-encoder"}
