"""loomserve: one paged-attention engine behind OpenAI-compatible endpoints."""

from loomserve.adapters.request import LoRARequest
from loomserve.platform.beam_search import BeamSearchParams
from loomserve.platform.request import CompletionOutput, Logprob, RequestOutput, SamplingParams
from loomserve.pooling.params import PoolingParams

__version__ = "0.1.0"


def __getattr__(name: str):
    # LLM pulls in transformers and the engine; import it only when asked for.
    if name == "LLM":
        from loomserve.llm import LLM

        return LLM
    raise AttributeError(f"module 'loomserve' has no attribute {name!r}")


__all__ = [
    "LLM", "LoRARequest", "SamplingParams", "BeamSearchParams", "PoolingParams", "RequestOutput", "CompletionOutput",
    "Logprob", "__version__",
]
