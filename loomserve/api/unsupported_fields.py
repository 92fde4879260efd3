"""No silent success: request fields this server does not implement answer 400 naming them.

Every request model forbids fields it does not declare (protocol.py); the validation error for such a field says
here whether it is an OpenAI / vLLM field known to be unimplemented, or not a field of the route at all.
"""

from __future__ import annotations

# OpenAI and vLLM request fields (chat, completions, pooling) that loomserve does not implement.
KNOWN_UNSUPPORTED = frozenset({
    # OpenAI
    "audio", "function_call", "functions", "metadata", "modalities", "prediction", "prompt_cache_key",
    "safety_identifier", "service_tier", "store", "suffix", "verbosity", "web_search_options",
    # vLLM
    "chat_template", "guided_decoding_backend", "guided_whitespace_pattern", "logits_processors", "media_io_kwargs",
    "mm_processor_kwargs", "priority", "request_id", "spaces_between_special_tokens",
    "thinking_token_budget", "vllm_xargs",
})


def extra_field_message(location: list[str]) -> str:
    """The 400 message for a field the request model does not declare, at `location` (e.g. ["suffix"] or
    ["stream_options", "continuous_usage_stats"])."""
    path = ".".join(location)
    if location[-1] in KNOWN_UNSUPPORTED:
        return f"`{path}` is not supported by this server"
    return f"`{path}` is not a known field of this request"
