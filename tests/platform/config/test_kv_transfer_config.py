"""--kv-offloading-size and --kv-transfer-config read as vLLM reads them, malformed ones refused saying why."""

from __future__ import annotations

import pytest

from loomserve.platform.config.kv_transfer import OFFLOADING, parse_kv_transfer_config


def test_no_flags_keep_kv_on_the_device():
    assert parse_kv_transfer_config(None, None) is None


def test_offloading_size_is_gib_of_host_memory_for_the_offloading_connector():
    config = parse_kv_transfer_config(None, 0.5)
    assert (config.kv_connector, config.offload_bytes) == (OFFLOADING, 2**29)


def test_offloading_connector_json_takes_its_size_from_cpu_bytes_to_use():
    config = parse_kv_transfer_config(
        '{"kv_connector": "OffloadingConnector", "kv_role": "kv_both", '
        '"kv_connector_extra_config": {"cpu_bytes_to_use": 1000}}', None)
    assert config.offload_bytes == 1000


def test_a_producer_role_is_read_from_json():
    config = parse_kv_transfer_config('{"kv_connector": "TcpConnector", "kv_role": "kv_producer"}', None)
    assert config.is_producer and not config.is_consumer and not config.offload_bytes


@pytest.mark.parametrize(("value", "size", "why"), [
    ('{"kv_connector": "TcpConnector", "kv_role": "kv_leader"}', None, "kv_role"),
    ('{"kv_role": "kv_both"}', None, "kv_connector"),
    ('{"kv_connector": "TcpConnector", "kv_rank": 0}', None, "kv_rank"),
    ('{"kv_connector": "OffloadingConnector"}', None, "cpu_bytes_to_use"),
    ('{"kv_connector": "NixlConnector"}', None, "SharedMemoryConnector"),
    (None, -1.0, "positive"),
])
def test_malformed_configs_are_refused_saying_why(value, size, why):
    with pytest.raises(ValueError, match=why):
        parse_kv_transfer_config(value, size)
