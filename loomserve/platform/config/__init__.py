"""The engine's configuration: one module per sub-config, EngineArgs -> EngineConfig in engine.py."""

from loomserve.platform.config.cache import CacheConfig, parse_memory
from loomserve.platform.config.engine import EngineArgs, EngineConfig
from loomserve.platform.config.lora import LoRAConfig
from loomserve.platform.config.model import (
    ModelConfig,
    context_limit,
    default_served_name,
    resolve_device,
    resolve_dtype,
)
from loomserve.platform.config.parallel import ParallelConfig
from loomserve.platform.config.scheduler import SchedulerConfig
from loomserve.platform.config.speculative import SpeculativeConfig, parse_speculative_config

__all__ = [
    "CacheConfig", "EngineArgs", "EngineConfig", "LoRAConfig", "ModelConfig", "ParallelConfig", "SchedulerConfig",
    "SpeculativeConfig", "context_limit", "default_served_name", "parse_memory", "parse_speculative_config",
    "resolve_device", "resolve_dtype",
]
