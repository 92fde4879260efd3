"""LoRAConfig: how many adapters share a step, their largest rank, and how many stay in host memory."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class LoRAConfig:
    max_loras: int = 1  # adapters in one step (device slots)
    max_lora_rank: int = 16
    max_cpu_loras: int = 1  # adapters kept in host memory, least recently used evicted first

    def __post_init__(self) -> None:
        if self.max_loras < 1 or self.max_lora_rank < 1:
            raise ValueError(f"max_loras and max_lora_rank must be at least 1, got {self.max_loras}, "
                             f"{self.max_lora_rank}")
        if self.max_cpu_loras < self.max_loras:
            raise ValueError(f"max_cpu_loras ({self.max_cpu_loras}) must be at least max_loras ({self.max_loras})")
