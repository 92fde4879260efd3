"""The CPU thread policy: threads sized from the cores the process may use, passive OpenMP waiting handed to the
processes it starts, one thread for small steps."""

from __future__ import annotations

import os
import subprocess
import sys

import torch

from loomserve.platform import threads
from loomserve.platform.threads import StepThreads, available_cores, cgroup_cpu_quota, engine_threads


def test_a_cgroup_v2_quota_lowers_the_available_cores(tmp_path):
    (tmp_path / "cpu.max").write_text("150000 100000\n")
    assert cgroup_cpu_quota(tmp_path) == 1.5
    assert available_cores(tmp_path) == min(2, len(os.sched_getaffinity(0)))


def test_an_unlimited_cgroup_leaves_the_affinity_mask(tmp_path):
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert cgroup_cpu_quota(tmp_path) is None
    assert available_cores(tmp_path) == len(os.sched_getaffinity(0))


def test_a_cgroup_v1_quota_is_read(tmp_path):
    (tmp_path / "cpu").mkdir()
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("50000\n")
    (tmp_path / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert cgroup_cpu_quota(tmp_path) == 0.5
    assert available_cores(tmp_path) == 1


def test_the_flag_wins_over_the_environment_and_the_environment_over_the_cores():
    assert engine_threads(3, front_end_cores=1, env={"OMP_NUM_THREADS": "2"}, cores=8) == 3
    assert engine_threads(None, front_end_cores=1, env={"OMP_NUM_THREADS": "2"}, cores=8) == 2
    assert engine_threads(None, front_end_cores=1, env={}, cores=8) == 7


def test_the_default_leaves_at_least_one_thread():
    assert engine_threads(None, front_end_cores=1, env={}, cores=1) == 1


def test_child_processes_wait_passively_unless_the_user_chose():
    env = {"KMP_BLOCKTIME": "200"}
    threads.set_child_env(env)
    assert env == {"OMP_WAIT_POLICY": "PASSIVE", "KMP_BLOCKTIME": "200"}


def test_small_steps_run_on_one_thread_and_large_ones_on_all():
    before = torch.get_num_threads()
    try:
        step_threads = StepThreads(2)
        step_threads.for_step(StepThreads.SMALL_STEP_TOKENS - 1)
        assert torch.get_num_threads() == 1
        step_threads.for_step(StepThreads.SMALL_STEP_TOKENS)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_cpu_threads_sets_the_offline_engines_threads(qwen2_checkpoint):
    code = ("import torch; from loomserve import LLM; "
            f"LLM({str(qwen2_checkpoint)!r}, device='cpu', cpu_threads=1, kv_cache_memory='4MiB'); "
            "import os; print(torch.get_num_threads(), os.environ['OMP_WAIT_POLICY'])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"})
    assert out.stdout.split() == ["1", "PASSIVE"]
