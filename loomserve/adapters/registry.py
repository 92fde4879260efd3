"""The front end's table of served adapters: the names requests may put in `model`, with their ids and folders.

Ids come from a counter and are never reused, so an adapter unloaded and loaded again under the same name
is a new adapter to the engine (new slot contents, new prefix-cache keys). With several API processes, each counts
in its own residue class (client i of n: i + 1, i + 1 + n, ...), so ids stay unique without asking anyone; the
engine's table of what is served (`sync`) is the truth every process serves from.
"""

from __future__ import annotations

import itertools

from loomserve.adapters.request import LoRARequest


class UnknownLoRAError(LookupError):
    """No adapter of that name is loaded."""


def already_loaded(name: str) -> str:
    """vLLM's refusal of a name in use."""
    return (f"The lora adapter {name!r} has already been loaded. If you want to load the adapter in place, set "
            "'load_inplace' to True.")


class LoRARegistry:
    def __init__(self, enabled: bool, base_model_name: str, client_index: int = 0, num_clients: int = 1) -> None:
        self.enabled = enabled
        self.base_model_name = base_model_name
        self.adapters: dict[str, LoRARequest] = {}
        self._loading: set[str] = set()
        self._ids = itertools.count(client_index + 1, num_clients)

    def get(self, name: str | None) -> LoRARequest | None:
        return self.adapters.get(name) if name else None

    def reserve(self, name: str, path: str, replace: bool = False) -> LoRARequest:
        """A new adapter for `name` while it loads; raises ValueError if the name cannot be taken (`replace`: a
        loaded adapter of that name may give it up once the new one has loaded, vLLM's `load_inplace`)."""
        if not self.enabled:
            raise ValueError("LoRA adapters are not enabled on this server: start it with --enable-lora")
        if not name or not path:
            raise ValueError("both lora_name and lora_path must be given")
        if name == self.base_model_name:
            raise ValueError(f"{name!r} is the base model's name; choose another lora_name")
        if name in self._loading:
            raise ValueError(f"an adapter named {name!r} is loading now; wait for it or choose another name")
        if name in self.adapters and not replace:
            raise ValueError(already_loaded(name))
        self._loading.add(name)
        return LoRARequest(name, next(self._ids), path)

    def commit(self, lora: LoRARequest) -> LoRARequest | None:
        """Serve `lora` under its name; the adapter it replaces, if any (not itself: the engine's table may have
        brought it first)."""
        self._loading.discard(lora.lora_name)
        replaced = self.adapters.get(lora.lora_name)
        self.adapters[lora.lora_name] = lora
        return replaced if replaced != lora else None

    def abandon(self, lora: LoRARequest) -> None:
        self._loading.discard(lora.lora_name)

    def remove(self, name: str) -> LoRARequest:
        lora = self.adapters.pop(name, None)
        if lora is None:
            raise UnknownLoRAError(f"The lora adapter {name!r} cannot be found.")
        return lora

    def sync(self, adapters: list[LoRARequest]) -> None:
        """Serve exactly the engine's adapters (loaded or unloaded through another API process meanwhile)."""
        self.adapters = {lora.lora_name: lora for lora in adapters}
