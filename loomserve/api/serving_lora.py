"""Adapters at run time: POST /v1/load_lora_adapter and /v1/unload_lora_adapter (vLLM's routes and bodies),
and the `--lora-modules` loaded at start-up."""

from __future__ import annotations

from collections.abc import Sequence

from fastapi import APIRouter
from fastapi.responses import PlainTextResponse

from loomserve.adapters.registry import UnknownLoRAError
from loomserve.api.errors import APIError
from loomserve.api.lora_paths import NoAdapterError
from loomserve.api.protocol import LoadLoRAAdapterRequest, UnloadLoRAAdapterRequest
from loomserve.api.served_models import Models, ServedModels

router = APIRouter()


@router.post("/v1/load_lora_adapter")
async def load_lora_adapter(body: LoadLoRAAdapterRequest, models: Models) -> PlainTextResponse:
    """200 once the adapter serves (on the main model; `load_inplace` replaces the one of that name); 404 when
    there is no adapter the server may read at the path; 400 with the reason when it cannot serve it (name, rank,
    targets)."""
    await models.main.check_health()
    try:
        await models.add_lora(body.lora_name, body.lora_path, body.load_inplace)
    except NoAdapterError as e:
        raise APIError(str(e), status=404, param="lora_path") from e
    except ValueError as e:
        raise APIError(str(e)) from e
    return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' added successfully.")


@router.post("/v1/unload_lora_adapter")
async def unload_lora_adapter(body: UnloadLoRAAdapterRequest, models: Models) -> PlainTextResponse:
    """200 once new requests can no longer use the adapter (running ones finish); 404 for an unknown name."""
    await models.main.check_health()
    try:
        await models.main.remove_lora(body.lora_name)
    except UnknownLoRAError as e:
        raise APIError(str(e), status=404, param="lora_name") from e
    return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")


async def load_startup_adapters(models: ServedModels, lora_modules: Sequence[tuple[str, str]]) -> None:
    """The `--lora-modules name=path` adapters; one that cannot be served stops the server from starting."""
    for name, path in lora_modules:
        try:
            await models.add_lora(name, path)
        except ValueError as e:
            raise RuntimeError(f"cannot serve --lora-modules {name}={path}: {e}") from e
