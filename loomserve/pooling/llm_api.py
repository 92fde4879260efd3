"""`LLM`'s pooling methods, in vLLM's shapes: `embed`, `classify`, `score` and `encode` (raw pooled tensors).

They run on the same in-process EngineCore as `generate`: every prompt is validated before any request starts,
then the engine steps until each request has its pooled output.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Iterator, Sequence
from typing import Any

from loomserve.modalities.inputs import MultiModalItem
from loomserve.platform.config import EngineConfig
from loomserve.platform.engine import EngineCore
from loomserve.platform.gc_heap import frozen_heap
from loomserve.platform.input_processor import InputProcessor, cache_salt_of
from loomserve.platform.messages import EngineCoreOutput, EngineCoreRequest
from loomserve.pooling.inputs import PoolingInputs, PoolingPrompt, expand_media, prompt_list
from loomserve.pooling.outputs import (
    ClassificationRequestOutput,
    EmbeddingRequestOutput,
    PoolingOutput,
    PoolingRequestOutput,
    ScoringOutput,
    ScoringRequestOutput,
)
from loomserve.pooling.params import PoolingParams
from loomserve.pooling.scoring import plan_scores


class PoolingAPI:
    """Mixed into `LLM`, which provides the engine, its config, the tokenizer and request ids."""

    config: EngineConfig
    engine: EngineCore
    tokenizer: Any
    input_processor: InputProcessor
    _ids: Iterator[int]

    @functools.cached_property
    def pooling_inputs(self) -> PoolingInputs:
        return PoolingInputs(self.config, self.tokenizer)

    def embed(
        self,
        prompts: PoolingPrompt | Sequence[PoolingPrompt],
        pooling_params: PoolingParams | None = None,
        *,
        truncate_prompt_tokens: int | None = None,
        prompt_name: str | None = None,
    ) -> list[EmbeddingRequestOutput]:
        """One embedding per prompt (`.outputs.embedding`), pooled as the checkpoint says unless overridden."""
        self.pooling_inputs.require_task("Embeddings", "embed")
        outputs = self.encode(prompts, pooling_params, truncate_prompt_tokens=truncate_prompt_tokens,
                              prompt_name=prompt_name)
        return [EmbeddingRequestOutput.from_base(o) for o in outputs]

    def classify(
        self, prompts: PoolingPrompt | Sequence[PoolingPrompt], *, truncate_prompt_tokens: int | None = None
    ) -> list[ClassificationRequestOutput]:
        """A sequence classifier's probabilities per prompt (`.outputs.probs`)."""
        self.pooling_inputs.require_task("Classification", "classify")
        outputs = self.encode(prompts, truncate_prompt_tokens=truncate_prompt_tokens)
        return [ClassificationRequestOutput.from_base(o) for o in outputs]

    def score(
        self, text_1: str | Sequence[str], text_2: str | Sequence[str], *, truncate_prompt_tokens: int | None = None
    ) -> list[ScoringRequestOutput]:
        """One score per (text_1, text_2) pair: one-to-one, one-to-many, or many-to-many zipped."""
        plan = plan_scores(self.pooling_inputs, text_1, text_2, truncate_prompt_tokens)
        outputs = self._pool(plan.requests, plan.labels)
        return [
            ScoringRequestOutput(f"score-{i}", ScoringOutput(score), plan.pair_token_ids(i))
            for i, score in enumerate(plan.scores([o.outputs.data for o in outputs]))
        ]

    def encode(
        self,
        prompts: PoolingPrompt | Sequence[PoolingPrompt],
        pooling_params: PoolingParams | None = None,
        *,
        truncate_prompt_tokens: int | None = None,
        prompt_name: str | None = None,
    ) -> list[PoolingRequestOutput[PoolingOutput]]:
        """Raw pooled tensors (`.outputs.data`) of any pooling type: ALL and STEP give one row per token. A dict
        prompt's "cache_salt" keeps its prefix-cache blocks apart from other salts'; a prompt
        `{"prompt": "", "multi_modal_data": {"image": image}}` embeds an image (CLIP, SigLIP)."""
        self.pooling_inputs.require_task("Pooling", "embed", "classify")
        prompts = prompt_list(prompts)
        token_ids = self.pooling_inputs.tokenize(prompts, truncate_prompt_tokens, prompt_name)
        token_ids, mm_items = expand_media(self.input_processor.mm, prompts, token_ids)
        params = self.pooling_inputs.params(pooling_params)
        return self._pool([(ids, params) for ids in token_ids], [f"prompt {i}" for i in range(len(prompts))],
                          [cache_salt_of(p) for p in prompts], mm_items)

    def _pool(
        self,
        requests: list[tuple[list[int], PoolingParams]],
        labels: list[str],
        cache_salts: Sequence[str | None] | None = None,
        mm_items: list[list[MultiModalItem]] | None = None,
    ) -> list[PoolingRequestOutput[PoolingOutput]]:
        for (token_ids, params), label in zip(requests, labels, strict=True):
            self.pooling_inputs.validate(token_ids, params, label)  # all or nothing: refuse before any runs
        order = []
        finished: dict[str, EngineCoreOutput] = {}
        # Collections while adding and stepping walk only the requests' objects (adding thousands of requests
        # set off full collections of the whole model's heap: ~250 us a request).
        with frozen_heap():
            for i, ((token_ids, params), salt) in enumerate(zip(requests, cache_salts or [None] * len(requests),
                                                                strict=True)):
                request_id = str(next(self._ids))
                order.append(request_id)
                request = EngineCoreRequest(request_id, token_ids, None, None, time.time(), cache_salt=salt,
                                            pooling_params=params, mm_items=mm_items[i] if mm_items else [])
                self.engine.add_request(request)
            while len(finished) < len(order):
                finished.update((out.request_id, out) for out in self.engine.step().outputs if out.pooled is not None)
        return [
            PoolingRequestOutput(request_id, PoolingOutput(finished[request_id].pooled), token_ids,
                                 num_cached_tokens=finished[request_id].num_cached_tokens)
            for request_id, (token_ids, _) in zip(order, requests)
        ]
