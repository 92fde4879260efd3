"""The CPU thread policy: how many intra-op threads a CPU engine runs, how its OpenMP threads wait, and the small
pool the front end keeps.

On a host whose cores other work also uses, an OpenMP thread that spins while it waits for its team burns the very
core its teammate needs; every op of a step then waits for the slowest thread to get a core back (measured on 2
shared cores: 2 threads ran the same embedding work at a third of the speed of 1, issue 24). So:

- engine threads come from `--cpu-threads`, else OMP_NUM_THREADS, else the cores this process may actually use
  (its affinity mask and its cgroup quota) less one left to the front end, and never more than those cores;
- OpenMP threads wait passively (OMP_WAIT_POLICY=PASSIVE, KMP_BLOCKTIME=0) unless the user says otherwise. OpenMP
  reads these once, when torch loads it, so they are set in the environment a process is started with;
- the front end (HTTP, tokenizers, detokenizing) runs its torch and tokenizer work on one thread, off the engine's.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, MutableMapping
from pathlib import Path

import torch

# OpenMP waits without spinning; Intel's OpenMP (MKL builds) sleeps at once. setdefault: a user's choice stands.
PASSIVE_OPENMP_ENV: Mapping[str, str] = {"OMP_WAIT_POLICY": "PASSIVE", "KMP_BLOCKTIME": "0"}
# The front end tokenizes one request at a time: no Rust thread pool beside the engine's threads.
FRONT_END_ENV: Mapping[str, str] = {"TOKENIZERS_PARALLELISM": "false", "RAYON_NUM_THREADS": "1"}

_CGROUP_ROOT = Path("/sys/fs/cgroup")


def available_cores(cgroup_root: Path = _CGROUP_ROOT) -> int:
    """The cores this process may run on: its affinity mask, lowered by a cgroup CPU quota (v2 `cpu.max`, v1
    `cpu.cfs_quota_us` / `cpu.cfs_period_us`), rounded up; at least 1."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    quota = cgroup_cpu_quota(cgroup_root)
    if quota is not None:
        cores = min(cores, math.ceil(quota))
    return max(1, cores)


def cgroup_cpu_quota(cgroup_root: Path = _CGROUP_ROOT) -> float | None:
    """The CPU quota in cores (1.5 = 150 ms per 100 ms), None when unlimited or not readable."""
    v2 = cgroup_root / "cpu.max"
    if v2.is_file():
        quota, _, period = v2.read_text().partition(" ")
        return None if quota == "max" else int(quota) / int(period)
    v1_quota, v1_period = cgroup_root / "cpu" / "cpu.cfs_quota_us", cgroup_root / "cpu" / "cpu.cfs_period_us"
    if v1_quota.is_file() and v1_period.is_file():
        quota_us = int(v1_quota.read_text())
        return None if quota_us <= 0 else quota_us / int(v1_period.read_text())
    return None


def engine_threads(cpu_threads: int | None, front_end_cores: int = 0, env: Mapping[str, str] = os.environ,
                   cores: int | None = None) -> int:
    """Intra-op threads of a CPU engine: `cpu_threads`, else OMP_NUM_THREADS, else the available cores less
    `front_end_cores` (1 in the server, whose front end runs beside the engine; 0 for the offline `LLM`). What the
    user asked for is honoured even above the cores (they know the host); the default never exceeds them."""
    if cpu_threads is not None:
        if cpu_threads < 1:
            raise ValueError(f"cpu_threads must be at least 1, got {cpu_threads}")
        return cpu_threads
    from_env = env.get("OMP_NUM_THREADS", "").split(",")[0].strip()
    if from_env.isdigit() and int(from_env) > 0:
        return int(from_env)
    return max(1, (cores or available_cores()) - front_end_cores)


def set_child_env(environ: MutableMapping[str, str] = os.environ) -> None:
    """Make the processes started from here (the engine's) wait passively; call before starting them. A value the
    user set is kept."""
    for name, value in PASSIVE_OPENMP_ENV.items():
        environ.setdefault(name, value)


def apply_engine_threads(cpu_threads: int | None, front_end_cores: int = 0) -> int:
    """Set a CPU engine's torch threads by the policy (processes it starts then wait passively too); returns how
    many."""
    threads = engine_threads(cpu_threads, front_end_cores)
    torch.set_num_threads(threads)
    set_child_env()
    return threads


def apply_front_end_threads(environ: MutableMapping[str, str] = os.environ) -> None:
    """The API process: one torch thread, no tokenizer thread pool, passive OpenMP for anything it starts."""
    for name, value in FRONT_END_ENV.items():
        environ.setdefault(name, value)
    set_child_env(environ)
    torch.set_num_threads(1)


class StepThreads:
    """Small steps run on one thread: splitting a matmul of a few dozen rows saves less than waking a sleeping
    (passive) OpenMP thread for each op costs, and a second thread waiting for a contended core stalls the step.
    Larger steps use every engine thread."""

    SMALL_STEP_TOKENS = 64  # below this, one thread (measured roughly on 2 shared cores: benchmarks/cpu_threads.py)

    def __init__(self, threads: int) -> None:
        self.threads = threads
        self.current = torch.get_num_threads()

    def for_step(self, num_tokens: int) -> None:
        wanted = 1 if num_tokens < self.SMALL_STEP_TOKENS else self.threads
        if wanted != self.current:  # set only on a change: every set re-sizes OpenMP's team
            torch.set_num_threads(wanted)
            self.current = wanted
