"""`--api-server-count`: vLLM's flag and its short form, and the default count of API server processes."""

from __future__ import annotations

import pytest

from loomserve.api.api_servers import api_server_count
from loomserve.api.cli import make_parser


def test_the_flag_and_its_short_form_set_the_count():
    for flag in ("--api-server-count", "-asc"):
        assert make_parser().parse_args(["serve", "m", flag, "3"]).api_server_count == 3


def test_a_count_below_one_is_refused():
    with pytest.raises(SystemExit):
        make_parser().parse_args(["serve", "m", "--api-server-count", "0"])


def test_a_cpu_engine_gets_one_api_process_whatever_the_cores():
    assert api_server_count(None, "cpu", cores=64) == 1


@pytest.mark.parametrize(("cores", "count"), [(2, 1), (8, 2), (16, 4), (128, 4)])
def test_a_gpu_host_gets_one_api_process_per_four_cores_up_to_four(cores, count):
    assert api_server_count(None, "cuda", cores=cores) == count


def test_an_asked_for_count_stands():
    assert api_server_count(3, "cpu") == 3
