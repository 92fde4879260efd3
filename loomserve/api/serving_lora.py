"""Adapters at run time: POST /v1/load_lora_adapter and /v1/unload_lora_adapter (vLLM's routes and bodies),
and the `--lora-modules` loaded at start-up."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import PlainTextResponse

from loomserve.adapters.registry import UnknownLoRAError
from loomserve.api.errors import APIError
from loomserve.api.protocol import LoadLoRAAdapterRequest, UnloadLoRAAdapterRequest
from loomserve.platform.async_llm import AsyncLLM

router = APIRouter()


@router.post("/v1/load_lora_adapter")
async def load_lora_adapter(body: LoadLoRAAdapterRequest, request: Request) -> PlainTextResponse:
    """200 once the adapter serves; 400 with the reason when it cannot (path, name, rank, targets)."""
    engine: AsyncLLM = request.app.state.engine
    await engine.check_health()
    try:
        await engine.add_lora(body.lora_name, body.lora_path)
    except ValueError as e:
        raise APIError(str(e)) from e
    return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' added successfully.")


@router.post("/v1/unload_lora_adapter")
async def unload_lora_adapter(body: UnloadLoRAAdapterRequest, request: Request) -> PlainTextResponse:
    """200 once new requests can no longer use the adapter (running ones finish); 404 for an unknown name."""
    engine: AsyncLLM = request.app.state.engine
    await engine.check_health()
    try:
        await engine.remove_lora(body.lora_name)
    except UnknownLoRAError as e:
        raise APIError(str(e), status=404, param="lora_name") from e
    return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")


async def load_startup_adapters(engine: AsyncLLM, lora_modules: list[tuple[str, str]]) -> None:
    """The `--lora-modules name=path` adapters; one that cannot be served stops the server from starting."""
    for name, path in lora_modules:
        try:
            await engine.add_lora(name, path)
        except ValueError as e:
            raise RuntimeError(f"cannot serve --lora-modules {name}={path}: {e}") from e
