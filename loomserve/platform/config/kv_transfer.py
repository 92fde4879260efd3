"""KVTransferConfig: where KV blocks go beyond the device's pool, from vLLM's `--kv-offloading-size` (GiB of host
memory for a CPU tier of the prefix cache) and `--kv-transfer-config` JSON (a connector and its role)."""

from __future__ import annotations

import dataclasses
import json
import socket
from dataclasses import dataclass, field
from typing import Any

OFFLOADING = "OffloadingConnector"  # the CPU tier, as vLLM names the connector `--kv-offloading-size` sets up
TCP = "TcpConnector"  # prefill -> decode over TCP, any hosts
SHARED_MEMORY = "SharedMemoryConnector"  # prefill -> decode through shared memory, one host
CONNECTORS = (OFFLOADING, TCP, SHARED_MEMORY)
ROLES = ("kv_producer", "kv_consumer", "kv_both")
_KEYS = ("kv_connector", "kv_role", "kv_connector_extra_config", "engine_id", "kv_ip", "kv_port")


@dataclass(frozen=True)
class KVTransferConfig:
    kv_connector: str
    kv_role: str = "kv_both"
    kv_connector_extra_config: dict[str, Any] = field(default_factory=dict)
    engine_id: str | None = None
    kv_ip: str = "127.0.0.1"  # where a producer's worker serves its blocks to consumers
    kv_port: int = 0  # 0: a free port, chosen when the config is read
    offload_bytes: int = 0  # host memory of the CPU tier

    def __post_init__(self) -> None:
        if self.kv_role not in ROLES:
            raise ValueError(f"kv_role must be one of {', '.join(ROLES)}, got {self.kv_role!r}")

    @property
    def is_producer(self) -> bool:
        return self.kv_role in ("kv_producer", "kv_both")

    @property
    def is_consumer(self) -> bool:
        return self.kv_role in ("kv_consumer", "kv_both")


def parse_kv_transfer_config(
    value: str | dict[str, Any] | None, offloading_gib: float | None
) -> KVTransferConfig | None:
    """The flags -> one config, or None when KV stays on the device. `--kv-offloading-size` alone means vLLM's
    OffloadingConnector; a JSON naming it takes its size from `kv_connector_extra_config.cpu_bytes_to_use`."""
    if offloading_gib is not None and offloading_gib <= 0:
        raise ValueError(f"kv_offloading_size must be a positive number of GiB, got {offloading_gib}")
    offload_bytes = int(offloading_gib * 2**30) if offloading_gib else 0
    if value is None:
        return KVTransferConfig(OFFLOADING, offload_bytes=offload_bytes) if offload_bytes else None
    spec = json.loads(value) if isinstance(value, str) else dict(value)
    if not isinstance(spec, dict) or "kv_connector" not in spec:
        raise ValueError(f"kv_transfer_config must be a JSON object naming a \"kv_connector\", got {value!r}")
    unknown = set(spec) - set(_KEYS)
    if unknown:
        raise ValueError(f"unknown kv_transfer_config keys: {', '.join(sorted(unknown))}")
    if spec["kv_connector"] not in CONNECTORS:
        raise ValueError(f"unknown kv_connector {spec['kv_connector']!r}: this engine has {', '.join(CONNECTORS)}")
    if spec["kv_connector"] == OFFLOADING and not offload_bytes:
        offload_bytes = int(spec.get("kv_connector_extra_config", {}).get("cpu_bytes_to_use", 0))
        if offload_bytes <= 0:
            raise ValueError(f"{OFFLOADING} needs --kv-offloading-size or kv_connector_extra_config.cpu_bytes_to_use")
    config = KVTransferConfig(**spec, offload_bytes=offload_bytes)
    if config.kv_connector == TCP and config.is_producer and not config.kv_port:
        config = dataclasses.replace(config, kv_port=_free_port(config.kv_ip))
    return config


def _free_port(host: str) -> int:
    """A TCP port nothing listens on now: the producer's block server binds it once its KV cache exists."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]
