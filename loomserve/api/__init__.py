"""The HTTP face: OpenAI-compatible routes over `AsyncLLM` (FastAPI + uvicorn live only here)."""
