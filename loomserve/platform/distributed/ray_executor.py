"""The Ray executor (`distributed_executor_backend="ray"`): one Ray actor per tensor-parallel rank, for clusters that
run Ray.

The actors are placed by a placement group (a bundle of one GPU, or one CPU, per rank) on the Ray cluster this
process is connected to, or on a local Ray instance started here when there is none (as vLLM does). Each actor joins
the ranks' torch.distributed group (NCCL on CUDA, gloo on CPU) at rank 0's node and runs the multi-process
executor's worker loop over a socket back to this executor, which speaks to it exactly as to a local rank process.
Ray is imported only here, when chosen.
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
import threading
from multiprocessing.connection import Listener
from typing import Any

from loomserve.platform.config import EngineConfig
from loomserve.platform.distributed.multi_node import accept_remote_ranks
from loomserve.platform.executor import MultiprocExecutor, _free_port, _RankLink, serve_rank_at

logger = logging.getLogger(__name__)


class _RankActor:
    """What runs inside each Ray actor."""

    def rendezvous(self) -> str:
        """The ranks' rendezvous, tcp://address:port on this actor's node (rank 0's hosts it)."""
        import ray

        return f"tcp://{ray.util.get_node_ip_address()}:{_free_port('')}"

    def run(self, address: tuple[str, int], authkey: bytes, config: EngineConfig, rank: int, init_method: str) -> None:
        serve_rank_at(address, authkey, config, rank, init_method)


class RayExecutor(MultiprocExecutor):
    """The multi-process executor's broadcast of steps and calls, to ranks that are Ray actors."""

    def __init__(self, config: EngineConfig) -> None:
        import ray
        from ray.util.placement_group import placement_group, remove_placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        size = config.parallel_config.tensor_parallel_size
        on_cuda = config.model_config.device.type == "cuda"
        _connect_ray(size, on_cuda)
        self._remove_placement_group = remove_placement_group
        self._placement_group = placement_group([{"GPU": 1} if on_cuda else {"CPU": 1}] * size, strategy="PACK")
        ray.get(self._placement_group.ready())
        actor_cls = ray.remote(_RankActor)
        self.actors = [
            actor_cls.options(num_cpus=0 if on_cuda else 1, num_gpus=1 if on_cuda else 0,
                              scheduling_strategy=PlacementGroupSchedulingStrategy(self._placement_group, rank))
            .remote() for rank in range(size)]
        init_method = ray.get(self.actors[0].rendezvous.remote())
        authkey = secrets.token_bytes(32)  # only these actors may take a rank's place
        listener = Listener(("0.0.0.0", 0), backlog=size, authkey=authkey)
        address = (ray.util.get_node_ip_address(), listener.address[1])
        self._runs = [actor.run.remote(address, authkey, config, rank, init_method)
                      for rank, actor in enumerate(self.actors)]
        threading.Thread(target=_stop_accepting_when_an_actor_ends, args=(self._runs, listener), daemon=True).start()
        try:
            ranks = accept_remote_ranks(listener, range(size))
        except OSError:  # the watcher shut the listener: an actor ended before it connected
            ended, _ = ray.wait(self._runs, num_returns=1)
            try:
                ray.get(ended)  # raises the actor's error
            finally:
                self._release()
            raise RuntimeError("a Ray actor of a rank ended before it connected") from None
        self.ranks = [_RankLink(ranks[rank], rank) for rank in range(size)]

    def shutdown(self) -> None:
        super().shutdown()
        self._release()

    def _release(self) -> None:
        """The actors and their placement, given back to the cluster."""
        import ray

        for actor in self.actors:
            ray.kill(actor)
        self._remove_placement_group(self._placement_group)


def _connect_ray(size: int, on_cuda: bool) -> None:
    """Join the Ray cluster RAY_ADDRESS names, or start a local instance with room for every rank."""
    import ray

    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"])
        return
    logger.info("Starting a local Ray instance for %d ranks", size)
    resources = {} if on_cuda else {"num_cpus": max(size, os.cpu_count() or 1)}
    ray.init(include_dashboard=False, **resources)


def _stop_accepting_when_an_actor_ends(runs: list[Any], listener: Listener) -> None:
    """A rank's actor that ends while the others wait to connect (a failed start) must not leave them waiting."""
    import ray

    ray.wait(runs, num_returns=1, timeout=None)
    try:  # close() alone does not wake an accept() blocked in another thread (Linux); shutting the socket down does
        listener._listener._socket.shutdown(socket.SHUT_RDWR)
    except (AttributeError, OSError):  # already accepted every rank and closed
        pass
