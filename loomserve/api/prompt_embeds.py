"""`prompt_embeds` on /v1/completions (vLLM's field, behind --enable-prompt-embeds): each base64 `torch.save`d
tensor [seq_len, hidden] becomes one prompt whose embeddings replace the token embedding lookup."""

from __future__ import annotations

from typing import TYPE_CHECKING

from loomserve.api.errors import APIError
from loomserve.api.prompts import Prompt
from loomserve.platform.prompt_embeds import prompt_embeds_input

if TYPE_CHECKING:
    from loomserve.api.protocol import CompletionRequest
    from loomserve.platform.async_llm import AsyncLLM


def embeds_prompts(engine: AsyncLLM, request: CompletionRequest) -> list[Prompt]:
    """The request's prompt_embeds as prompts (none when it has none); 400 for the flag off, bad base64, a
    non-tensor, a wrong hidden size, or a field that needs the prompt's tokens. Blocking: run on the pool."""
    given = request.prompt_embeds
    if given is None:
        return []
    for field, wants_tokens in (("echo", request.echo), ("prompt_logprobs", request.num_prompt_logprobs is not None),
                                ("use_beam_search", request.use_beam_search)):
        if wants_tokens:
            raise APIError(f"`{field}` is not supported with prompt_embeds", param=field)
    prompts = []
    for encoded in [given] if isinstance(given, str) else given:
        try:
            token_ids, items = prompt_embeds_input(engine.model_config, encoded)
        except ValueError as exc:
            raise APIError(str(exc), param="prompt_embeds") from exc
        prompts.append(Prompt(token_ids, mm_items=items))
    if not prompts:
        raise APIError("`prompt_embeds` must not be empty", param="prompt_embeds")
    return prompts
