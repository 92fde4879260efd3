"""LoRARequest: which adapter a request runs with, as vLLM names it (name, positive int id, folder)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class LoRARequest:
    """A PEFT adapter folder; `lora_int_id` identifies the adapter in the engine (slots, caches, KV keys)."""

    lora_name: str
    lora_int_id: int
    lora_path: str

    def __post_init__(self) -> None:
        if not self.lora_name:
            raise ValueError("lora_name must not be empty")
        if self.lora_int_id < 1:
            raise ValueError(f"lora_int_id must be a positive integer, got {self.lora_int_id}")

    @property
    def kv_cache_key(self) -> tuple:
        """What an adapter adds to prefix-cache keys: KV computed under one adapter is never reused by another."""
        return ("lora", self.lora_int_id, self.lora_name, self.lora_path)

    def to_wire(self) -> list:
        return [self.lora_name, self.lora_int_id, self.lora_path]

    @classmethod
    def from_wire(cls, w: list | None) -> LoRARequest | None:
        return None if w is None else cls(w[0], w[1], w[2])
