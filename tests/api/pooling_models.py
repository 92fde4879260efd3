"""Names of the models the pooling server (tests/api/conftest.py `pooling_server`) serves beside the demo."""

from loomserve.demo import DEMO_EMBEDDING_NAME, DEMO_NAME

MINILM = DEMO_EMBEDDING_NAME  # the real all-MiniLM-L6-v2 of the embedded default
CHAT = DEMO_NAME
DECODER_EMBEDDER = "tiny-qwen3-embedding"
CROSS_ENCODER = "tiny-bert-reranker"
