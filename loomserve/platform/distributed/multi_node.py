"""Tensor-parallel ranks on more than one host (vLLM's `--nnodes/--node-rank/--master-addr/--master-port`).

Node 0 runs EngineCore and its own share of the ranks as local processes; every other node runs only its share
(`loomserve serve ... --node-rank N --headless`). Each rank joins the torch.distributed group at
master_addr:master_port (NCCL across hosts, gloo on CPU), and the ranks of other nodes connect to the executor on node 0
at master_addr:master_port + 1, over which they follow its steps in the same wire form and worker loop as a local rank.
"""

from __future__ import annotations

import logging
import multiprocessing
import time
from multiprocessing.connection import Connection, Listener

from loomserve.platform.config import EngineConfig
from loomserve.platform.config.parallel import ParallelConfig

logger = logging.getLogger(__name__)

_CONNECT_TIMEOUT_S = 600.0  # how long a headless node waits for node 0 to listen
_RETRY_S = 0.2


def node_ranks(pc: ParallelConfig, node_rank: int) -> range:
    """The global ranks node `node_rank` runs: an even, contiguous share."""
    per_node = pc.tensor_parallel_size // pc.nnodes
    return range(node_rank * per_node, (node_rank + 1) * per_node)


def steps_address(pc: ParallelConfig) -> tuple[str, int]:
    return pc.master_addr, pc.master_port + 1


def rank_listener(pc: ParallelConfig) -> Listener:
    """Node 0's socket the other nodes' ranks connect to (on every interface: master_addr may be a public name)."""
    return Listener(("0.0.0.0", steps_address(pc)[1]), backlog=pc.tensor_parallel_size)


def accept_remote_ranks(listener: Listener, ranks: range) -> dict[int, Connection]:
    """Wait until each of `ranks` has connected and said which rank it is; the connections by rank."""
    from loomserve.platform import wire

    logger.info("Waiting for ranks %d-%d to connect at port %d", ranks.start, ranks.stop - 1,
                listener.address[1])
    conns: dict[int, Connection] = {}
    with listener:
        while len(conns) < len(ranks):
            conn = listener.accept()
            rank = wire.decode(conn.recv_bytes())
            if rank not in ranks or rank in conns:
                conn.close()
                raise ValueError(f"a node connected as rank {rank}; expected one of {list(ranks)} once each: check "
                                 "--nnodes, --node-rank and --tensor-parallel-size on every node")
            conns[rank] = conn
    return conns


def run_headless(config: EngineConfig) -> None:
    """A node other than 0: start its ranks, each following node 0's executor, and wait until they end."""
    pc = config.parallel_config
    if pc.node_rank == 0:
        raise ValueError("--headless runs the ranks of a node other than 0: give it --node-rank (1 .. nnodes - 1)")
    ranks = node_ranks(pc, pc.node_rank)
    init_method = f"tcp://{pc.master_addr}:{pc.master_port}"
    logger.info("Node %d: ranks %s following node 0 at %s:%d", pc.node_rank, list(ranks), *steps_address(pc))
    if len(ranks) == 1:  # this process is the rank: no second interpreter to start
        _rank_main(config, ranks[0], init_method)
        return
    ctx = multiprocessing.get_context("spawn")
    processes = [ctx.Process(target=_rank_main, args=(config, rank, init_method), name=f"loomserve-runner-{rank}")
                 for rank in ranks]
    for process in processes:
        process.start()
    for process in processes:
        process.join()


def _rank_main(config: EngineConfig, rank: int, init_method: str) -> None:
    from loomserve.platform.executor import serve_rank_at

    address = steps_address(config.parallel_config)
    deadline = time.monotonic() + _CONNECT_TIMEOUT_S
    while True:  # node 0 may start after this node
        try:
            serve_rank_at(address, None, config, rank, init_method)
            return
        except ConnectionRefusedError:
            if time.monotonic() > deadline:
                raise
            time.sleep(_RETRY_S)
