"""PoolingParams: how one request's hidden states become its output (vLLM's `PoolingParams`)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

# CLS: the first token's hidden state; MEAN: the average over the prompt; LAST: the last token's; ALL: every
# token's; STEP: the tokens equal to `step_tag_id` (process-reward style), optionally only `returned_token_ids` dims.
POOLING_TYPES = ("CLS", "MEAN", "LAST", "ALL", "STEP")


@dataclass
class PoolingParams:
    """Per-request pooling settings. Fields left None take the model's defaults (`PoolerConfig.resolve`), so the
    engine only ever sees complete parameters."""

    pooling_type: str | None = None
    normalize: bool | None = None  # L2-normalize each output vector (after `dimensions`)
    dimensions: int | None = None  # matryoshka: keep the first `dimensions` dims, then normalize
    activation: bool | None = None  # classifiers: apply the head's activation (sigmoid / softmax)
    step_tag_id: int | None = None
    returned_token_ids: list[int] | None = None
    token_type_ids: list[int] | None = None  # per-token segment ids of a cross-encoder pair, set by the front end

    def __post_init__(self) -> None:
        if self.pooling_type is not None:
            self.pooling_type = self.pooling_type.upper()
            if self.pooling_type not in POOLING_TYPES:
                raise ValueError(f"pooling_type must be one of {', '.join(POOLING_TYPES)}, got {self.pooling_type!r}")
        if self.dimensions is not None and self.dimensions < 1:
            raise ValueError(f"dimensions must be at least 1, got {self.dimensions}")

    @property
    def needs_whole_prompt(self) -> bool:
        """Pools over more than the last token, whose hidden states (not only the KV) it needs, or carries a pair's
        segment ids, which change the KV but not the prefix-cache keys: its prompt runs in one step and skips the
        prefix cache."""
        return self.pooling_type != "LAST" or bool(self.token_type_ids)

    @property
    def returns_sequence(self) -> bool:
        """One vector per token (ALL, STEP) rather than one per request."""
        return self.pooling_type in ("ALL", "STEP")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
