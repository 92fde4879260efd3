"""The front end's table of served adapters: the names requests may put in `model`, with their ids and folders.

Ids come from a counter and are never reused, so an adapter unloaded and loaded again under the same name
is a new adapter to the engine (new slot contents, new prefix-cache keys).
"""

from __future__ import annotations

import itertools

from loomserve.adapters.request import LoRARequest


class UnknownLoRAError(LookupError):
    """No adapter of that name is loaded."""


class LoRARegistry:
    def __init__(self, enabled: bool, base_model_name: str) -> None:
        self.enabled = enabled
        self.base_model_name = base_model_name
        self.adapters: dict[str, LoRARequest] = {}
        self._loading: set[str] = set()
        self._ids = itertools.count(1)

    def get(self, name: str | None) -> LoRARequest | None:
        return self.adapters.get(name) if name else None

    def reserve(self, name: str, path: str) -> LoRARequest:
        """A new adapter for `name` while it loads; raises ValueError if the name cannot be taken."""
        if not self.enabled:
            raise ValueError("LoRA adapters are not enabled on this server: start it with --enable-lora")
        if not name or not path:
            raise ValueError("both lora_name and lora_path must be given")
        if name == self.base_model_name:
            raise ValueError(f"{name!r} is the base model's name; choose another lora_name")
        if name in self.adapters or name in self._loading:
            raise ValueError(f"an adapter named {name!r} is already loaded; unload it first or choose another name")
        self._loading.add(name)
        return LoRARequest(name, next(self._ids), path)

    def commit(self, lora: LoRARequest) -> None:
        self._loading.discard(lora.lora_name)
        self.adapters[lora.lora_name] = lora

    def abandon(self, lora: LoRARequest) -> None:
        self._loading.discard(lora.lora_name)

    def remove(self, name: str) -> LoRARequest:
        lora = self.adapters.pop(name, None)
        if lora is None:
            raise UnknownLoRAError(f"no LoRA adapter named {name!r} is loaded")
        return lora
