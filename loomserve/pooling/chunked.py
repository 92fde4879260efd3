"""Long-input embedding (`--pooler-config '{"enable_chunked_processing": true, "max_embed_len": N}'`), as vLLM does
it: a prompt longer than one pass can take is split into consecutive chunks of its token ids, each chunk is pooled
on its own, and the chunk vectors are combined by their mean weighted with the chunks' token counts. Chunks are
pooled raw (no matryoshka cut, no normalization) and the mean is finished as one vector would be, so for MEAN pooling
the result is the mean over every token's state (each chunk read in its own context)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch

from loomserve.pooling.params import PoolingParams
from loomserve.pooling.poolers import finish_vectors

PoolingRequests = list[tuple[list[int], PoolingParams]]


@dataclass
class ChunkedRequests:
    """The engine requests of some prompts (a long prompt: several) and how their outputs make one per prompt."""

    requests: PoolingRequests
    owners: list[int]  # per engine request: the prompt it belongs to
    prompts: PoolingRequests  # the prompts as given

    def combine(self, outputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """The engine requests' outputs, in order -> one output per prompt."""
        sums: list[torch.Tensor | None] = [None] * len(self.prompts)
        counts = [0] * len(self.prompts)
        whole: dict[int, torch.Tensor] = {}
        for (ids, params), owner, out in zip(self.requests, self.owners, outputs, strict=True):
            if params is self.prompts[owner][1]:  # the prompt ran whole: its output is final
                whole[owner] = out
                continue
            weighted = out.float() * len(ids)  # [D]
            sums[owner] = weighted if sums[owner] is None else sums[owner] + weighted
            counts[owner] += len(ids)
        return [whole[i] if i in whole else finish_vectors(sums[i] / counts[i], params)
                for i, (_, params) in enumerate(self.prompts)]


def split_long(prompts: PoolingRequests, chunk_length: int, max_embed_len: int | None) -> ChunkedRequests:
    """Each prompt as one request, or (longer than `chunk_length` tokens) as raw chunks of at most that many; a
    ValueError for a prompt over `max_embed_len` tokens."""
    requests: PoolingRequests = []
    owners: list[int] = []
    for i, (ids, params) in enumerate(prompts):
        if max_embed_len is not None and len(ids) > max_embed_len:
            raise ValueError(f"input {i} has {len(ids)} tokens, more than this model's max_embed_len of "
                             f"{max_embed_len} (--pooler-config); shorten it or set truncate_prompt_tokens")
        if len(ids) <= chunk_length:
            requests.append((ids, params))
            owners.append(i)
            continue
        raw = replace(params, normalize=False, dimensions=None)
        for start in range(0, len(ids), chunk_length):
            requests.append((ids[start : start + chunk_length], raw))
            owners.append(i)
    return ChunkedRequests(requests, owners, prompts)
