"""The runner's pooling stage: hidden states of the requests whose prompt ends this step -> their outputs.

CLS and LAST take one token's state, MEAN averages the prompt's, ALL keeps every token's, STEP the tokens equal to
`step_tag_id` (and only the `returned_token_ids` dims). A classifier (a model with a `classify` head) turns each
single vector into logits and applies its activation (sigmoid for one label, softmax for several, or what the
checkpoint names); other vectors are truncated to `dimensions` and L2-normalized, as sentence-transformers'
Normalize module does. Outputs are float32 tensors on the model's device, computed without waiting for it (the
runner brings them to the host with the step's sampled tokens).
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from loomserve.platform.sampler import to_device
from loomserve.pooling.batch import PoolingSpan
from loomserve.pooling.config import PoolerConfig
from loomserve.pooling.params import PoolingParams

_ACTIVATIONS = {
    "identity": lambda x: x,
    "sigmoid": torch.sigmoid,
    "softmax": lambda x: torch.softmax(x, dim=-1),
    "tanh": torch.tanh,
}


class Pooler:
    def __init__(self, model: nn.Module, config: PoolerConfig) -> None:
        self.classify = model.classify if "classify" in model.pooling_tasks else None
        self.activation = _ACTIVATIONS[config.classifier_activation]

    def __call__(self, hidden: torch.Tensor, spans: list[PoolingSpan]) -> dict[str, torch.Tensor]:
        """hidden [T, hidden] -> request id -> output ([D], [num_labels] or [n, D])."""
        if not spans:
            return {}
        single = [s for s in spans if not s.params.returns_sequence]
        out: dict[str, torch.Tensor] = {}
        if single:
            vectors = pool_vectors(hidden, single)  # [B, hidden]
            if self.classify is not None:
                logits = self.classify(vectors).float()  # [B, num_labels]
                for s, row in zip(single, logits):
                    out[s.request_id] = self.activation(row) if s.params.activation else row
            else:
                out.update(finish_each(vectors.float(), single))
        for s in spans:
            if s.params.returns_sequence:
                out[s.request_id] = finish_vectors(token_vectors(hidden, s), s.params)
        return out


def pool_vectors(hidden: torch.Tensor, spans: list[PoolingSpan]) -> torch.Tensor:
    """One vector per span (CLS, LAST or MEAN) -> [B, hidden], in the hidden states' dtype."""
    out = torch.empty(len(spans), hidden.shape[1], dtype=hidden.dtype, device=hidden.device)
    picked = [(i, s.start if s.params.pooling_type == "CLS" else s.end - 1)
              for i, s in enumerate(spans) if s.params.pooling_type != "MEAN"]
    if picked:
        rows, index = (to_device(x, torch.int64, hidden.device) for x in zip(*picked))
        out[rows] = hidden[index]
    means = [(i, s) for i, s in enumerate(spans) if s.params.pooling_type == "MEAN"]
    if means:
        starts = np.array([s.start for _, s in means])
        lengths = np.array([s.end for _, s in means]) - starts
        segment = np.repeat(np.arange(len(means)), lengths)  # [N] which span each row belongs to
        offsets = np.cumsum(lengths) - lengths  # [M] where each span's rows start in `index`
        index = np.arange(len(segment)) + (starts - offsets)[segment]  # [N] rows of every mean span
        index_t, segment_t, lengths_t = (to_device(x, torch.int64, hidden.device) for x in (index, segment, lengths))
        sums = torch.zeros(len(means), hidden.shape[1], dtype=torch.float32, device=hidden.device)
        sums.index_add_(0, segment_t, hidden[index_t].float())
        rows = to_device([i for i, _ in means], torch.int64, hidden.device)
        out[rows] = (sums / lengths_t[:, None]).to(hidden.dtype)
    return out


def finish_each(vectors: torch.Tensor, spans: list[PoolingSpan]) -> dict[str, torch.Tensor]:
    """vectors [B, hidden] -> each span's finished vector; spans that ask for the same finish share one call."""
    by_finish: dict[tuple[int | None, bool], list[int]] = defaultdict(list)
    for i, s in enumerate(spans):
        by_finish[(s.params.dimensions, s.params.normalize)].append(i)
    out = {}
    for rows in by_finish.values():
        picked = vectors if len(rows) == len(spans) else vectors[to_device(rows, torch.int64, vectors.device)]
        finished = finish_vectors(picked, spans[rows[0]].params)  # [b, D]
        out.update(zip((spans[i].request_id for i in rows), finished.unbind(0)))
    return out


def token_vectors(hidden: torch.Tensor, span: PoolingSpan) -> torch.Tensor:
    """ALL: every token's state [n, hidden]; STEP: the rows at `step_tag_id` tokens, `returned_token_ids` dims."""
    rows = hidden[span.start : span.end].float()
    params = span.params
    if params.pooling_type == "STEP":
        if params.step_tag_id is not None:  # found among the prompt's tokens on the host: a device mask would sync
            tagged = np.flatnonzero(np.asarray(span.prompt_token_ids) == params.step_tag_id)
            rows = rows[to_device(tagged, torch.int64, hidden.device)]
        if params.returned_token_ids:
            rows = rows[:, to_device(params.returned_token_ids, torch.int64, hidden.device)]
    return rows


def finish_vectors(x: torch.Tensor, params: PoolingParams) -> torch.Tensor:
    """Matryoshka truncation, then L2 normalization, along the last dim."""
    if params.dimensions is not None:
        x = x[..., : params.dimensions]
    return F.normalize(x, p=2, dim=-1) if params.normalize else x
