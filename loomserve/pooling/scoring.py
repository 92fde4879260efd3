"""Scores of text pairs: a cross-encoder's head output, or the cosine similarity of a bi-encoder's embeddings;
pairing of `text_1` / `text_2`, and rerank ordering."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from loomserve.pooling.inputs import DOCUMENT_PROMPTS, QUERY_PROMPTS, PoolingInputs
from loomserve.pooling.params import PoolingParams


def score_pairs(text_1: str | Sequence[str], text_2: str | Sequence[str]) -> list[tuple[str, str]]:
    """One-to-one, one-to-many (a single text_1 against every text_2) or many-to-many (zipped) pairs."""
    first = [text_1] if isinstance(text_1, str) else list(text_1)
    second = [text_2] if isinstance(text_2, str) else list(text_2)
    if not first or not second:
        raise ValueError("text_1 and text_2 must each hold at least one text")
    if len(first) == 1:
        first = first * len(second)
    elif len(first) != len(second):
        raise ValueError(
            f"text_1 has {len(first)} texts and text_2 has {len(second)}: give one text_1, or as many as text_2"
        )
    return list(zip(first, second))


def cross_encoder_score(output: torch.Tensor) -> float:
    """A one-label cross-encoder's output [1] (after its activation) -> the score."""
    return output.item()


def cosine_scores(first: torch.Tensor, second: torch.Tensor) -> list[float]:
    """Row-wise cosine similarity of [N, D] and [N, D] embeddings."""
    return F.cosine_similarity(first.float(), second.float(), dim=-1).tolist()


def rerank_order(scores: Sequence[float], top_n: int | None = None) -> list[int]:
    """Indices of `scores` from the most to the least relevant (ties keep input order), the first `top_n` if given."""
    order = sorted(range(len(scores)), key=lambda i: -scores[i])
    return order[:top_n] if top_n else order


@dataclass
class ScorePlan:
    """The pooling requests a score call runs, and how their outputs make one score per pair."""

    requests: list[tuple[list[int], PoolingParams]]
    labels: list[str]  # how errors name each request ("pair 2", "text_2 5")
    pair_requests: list[tuple[int, ...]]  # per pair: its one request (cross-encoder) or its two (bi-encoder)

    def scores(self, outputs: Sequence[torch.Tensor]) -> list[float]:
        """`outputs` of `requests`, in order -> one score per pair."""
        if all(len(r) == 1 for r in self.pair_requests):
            return [cross_encoder_score(outputs[i]) for (i,) in self.pair_requests]
        first = torch.stack([outputs[i] for i, _ in self.pair_requests])
        second = torch.stack([outputs[j] for _, j in self.pair_requests])
        return cosine_scores(first, second)

    def pair_token_ids(self, pair: int) -> list[int]:
        return [t for i in self.pair_requests[pair] for t in self.requests[i][0]]

    @property
    def num_tokens(self) -> int:
        return sum(len(ids) for ids, _ in self.requests)


def plan_scores(
    inputs: PoolingInputs, text_1: str | Sequence[str], text_2: str | Sequence[str],
    truncate_prompt_tokens: int | None = None, params: PoolingParams | None = None,
) -> ScorePlan:
    """A cross-encoder reads each pair as one input; a bi-encoder embeds each distinct text once, queries with the
    checkpoint's query prompt and documents with its document prompt (as sentence-transformers' encode_query /
    encode_document do), and compares them by cosine similarity."""
    inputs.require_scores()
    pairs = score_pairs(text_1, text_2)
    params = inputs.params(params)
    if inputs.model_config.task == "classify":
        tokenized = inputs.tokenize_pairs(pairs, truncate_prompt_tokens)
        requests = [(ids, replace(params, token_type_ids=types)) for ids, types in tokenized]
        return ScorePlan(requests, [f"pair {i}" for i in range(len(pairs))], [(i,) for i in range(len(pairs))])
    queries = list(dict.fromkeys(a for a, _ in pairs))
    documents = list(dict.fromkeys(b for _, b in pairs))
    query_ids = inputs.tokenize(queries, truncate_prompt_tokens, inputs.role_prompt_name(QUERY_PROMPTS))
    document_ids = inputs.tokenize(documents, truncate_prompt_tokens, inputs.role_prompt_name(DOCUMENT_PROMPTS))
    requests = [(ids, params) for ids in query_ids + document_ids]
    labels = [f"text_1 {i}" for i in range(len(queries))] + [f"text_2 {i}" for i in range(len(documents))]
    query_index = {text: i for i, text in enumerate(queries)}
    document_index = {text: len(queries) + i for i, text in enumerate(documents)}
    return ScorePlan(requests, labels, [(query_index[a], document_index[b]) for a, b in pairs])
