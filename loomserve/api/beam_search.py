"""`use_beam_search` on /v1/completions and /v1/chat/completions: the search of platform/beam_search.py driven over
AsyncLLM, one step's beams as concurrent one-token requests; its n best beams become the n choices.

The search yields one RequestOutput, at the end, in the shape the routes already answer and stream.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator

from loomserve.adapters.request import LoRARequest
from loomserve.api.errors import APIError
from loomserve.api.prompts import Prompt
from loomserve.api.protocol import SamplingRequest
from loomserve.api.serving import collect_final
from loomserve.platform.async_llm import AsyncLLM
from loomserve.platform.beam_search import BeamSearch, BeamSearchBatch, BeamSearchParams
from loomserve.platform.request import CompletionOutput, RequestOutput, resolve_num_logprobs


def beam_search_params(engine: AsyncLLM, request: SamplingRequest, prompt: Prompt, max_tokens: int) -> BeamSearchParams:
    """The request's search (`n` beams, as vLLM); 400 for what a search cannot give."""
    if prompt.mm_items:
        raise APIError("`use_beam_search` takes text prompts only", param="use_beam_search")
    if request.num_prompt_logprobs is not None:
        raise APIError("`use_beam_search` gives no prompt logprobs (`prompt_logprobs`, `echo` with `logprobs`)",
                       param="use_beam_search")
    if request.best_of is not None and request.best_of != request.n:
        raise APIError("`use_beam_search` returns its `n` best beams: leave `best_of` out", param="best_of")
    mc = engine.model_config
    cap = resolve_num_logprobs(mc.max_logprobs, mc.vocab_size)
    if 2 * request.n > cap:
        raise APIError(f"beam search with {request.n} beams asks each step for {2 * request.n} logprobs; this server "
                       f"gives at most {cap} (--max-logprobs)", param="n")
    return BeamSearchParams(
        beam_width=request.n, max_tokens=max_tokens, ignore_eos=bool(request.ignore_eos),
        temperature=request.temperature or 0.0, length_penalty=request.length_penalty,
        early_stopping=request.early_stopping, include_stop_str_in_output=bool(request.include_stop_str_in_output),
    )


async def beam_search(
    engine: AsyncLLM, prompt: Prompt, params: BeamSearchParams, request_id: str, lora_request: LoRARequest | None
) -> AsyncGenerator[RequestOutput, None]:
    """Search, then yield the best beams as one finished RequestOutput (leaving early aborts the step running)."""
    mc = engine.model_config
    search = BeamSearch(prompt.token_ids, params, engine.input_processor.eos_token_id, mc.max_model_len)
    batch = BeamSearchBatch([search])
    step_params = params.step_params()
    step = 0
    while not batch.done:
        outputs = await collect_final([
            engine.generate(tokens, step_params, f"{request_id}-{step}-{i}", lora_request=lora_request)
            for i, tokens in enumerate(batch.prompts())
        ])
        batch.advance([output.outputs[0].logprobs[0] for output in outputs])
        step += 1
    start = search.num_prompt_tokens
    choices = [
        CompletionOutput(index=i, text=engine.tokenizer.decode(beam.tokens[start:], skip_special_tokens=True),
                         token_ids=beam.tokens[start:], cumulative_logprob=beam.cum_logprob, logprobs=beam.logprobs,
                         finish_reason=beam.finish_reason, stop_reason=beam.stop_reason)
        for i, beam in enumerate(search.best())
    ]
    yield RequestOutput(request_id, prompt.text, prompt.token_ids, choices, finished=True)

