"""Hidden states -> vectors and scores: pooling parameters, poolers, the checkpoint's pooling defaults, scoring."""

from loomserve.pooling.params import POOLING_TYPES, PoolingParams

__all__ = ["POOLING_TYPES", "PoolingParams"]
