"""KV blocks between instances on one host through shared memory (`SharedMemoryConnector`), without TCP.

A producer's runner writes the blocks it holds for a finished prefill into a file of their own in a directory both
instances share (`kv_connector_extra_config.shared_storage_path`, default /dev/shm: memory, never a disk), named in
the request's `kv_transfer_params` (`remote_file`); it writes a temporary file first and renames it, so a reader
never sees a part. Its device blocks are free once written. The consumer's runner waits for the file to appear
(while the producer lives: its engine holds a lock on a file of its own, `remote_lock`, which works across PID
namespaces too), reads it straight into a tensor of its own block layout, and removes it: that is its
acknowledgement. A file that no consumer took is removed after the producer's `abort_timeout_s`. Consumers only
read names a producer makes, in their own configured directory: a client's `kv_transfer_params` cannot point them
at other files.

The file holds the blocks' raw bytes, [n, layers, 2, block_size, kv_heads, head_dim] in the KV cache's dtype; a
consumer whose layout differs (another model, dtype or block size) finds the wrong size and computes the prompt.
"""

from __future__ import annotations

import concurrent.futures
import fcntl
import logging
import math
import os
import queue
import re
import threading
import time
import uuid
from pathlib import Path

import torch

from loomserve.platform.kv_transfer.copier import device_index, gather_blocks

logger = logging.getLogger(__name__)

DEFAULT_DIR = "/dev/shm"
_PREFIX = "loomserve-kv-"
_FILE_NAME = re.compile(rf"{_PREFIX}[0-9a-f]{{32}}(\.lock)?")  # a request's KV, or a producer's lock
_POLL_S = 0.002  # how often a consumer looks for a file not yet written


def new_file_name() -> str:
    return f"{_PREFIX}{uuid.uuid4().hex}"


def is_file_name(name: object) -> bool:
    """Whether `name` is one a producer makes, of a KV file or its lock (and nothing else: no directory, no other
    file)."""
    return isinstance(name, str) and _FILE_NAME.fullmatch(name) is not None


class SharedMemoryTransport:
    def __init__(self, directory: str, timeout_s: float) -> None:
        self.directory = Path(directory)
        self.timeout_s = timeout_s
        self.caches: list[torch.Tensor] = []
        self.writer = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="loomserve-kv-shm-write")
        self.writes: dict[str, concurrent.futures.Future] = {}  # request id -> its file being written
        self.expiring: queue.Queue[tuple[float, Path]] = queue.Queue()  # deadlines in order: one timeout for all
        threading.Thread(target=self._expire, name="loomserve-kv-shm-expire", daemon=True).start()

    def register_kv_caches(self, kv_caches: list[torch.Tensor]) -> None:
        self.caches = kv_caches

    def hold(self, held: dict[str, dict], dropped: list[str]) -> None:
        """Write each held request's blocks (`remote_block_ids`) to its file (`remote_file`); the device copy is
        queued on the compute stream now, so later steps may write over the blocks. Dropped requests need nothing:
        their files, once written, go at the timeout."""
        for request_id, params in held.items():
            device = self.caches[0].device
            blocks = gather_blocks(self.caches, device_index(params["remote_block_ids"], device))
            host = torch.empty(blocks.shape, dtype=blocks.dtype, pin_memory=device.type == "cuda")
            host.copy_(blocks, non_blocking=True)
            landed = None
            if device.type == "cuda":
                landed = torch.cuda.Event()
                landed.record()
            self.writes[request_id] = self.writer.submit(self._write, host, landed,
                                                         self.directory / params["remote_file"])

    def _write(self, host: torch.Tensor, landed: torch.cuda.Event | None, path: Path) -> None:
        if landed is not None:
            landed.synchronize()
        part = path.with_name(path.name + ".part")
        try:
            with open(part, "wb") as f:
                f.write(_raw(host))
            os.replace(part, path)
        except OSError:  # e.g. the directory is full (a container's /dev/shm is often 64 MiB)
            part.unlink(missing_ok=True)
            path.touch()  # an empty file: the consumer finds it wrong at once and computes the prompt itself
            raise
        finally:
            self.expiring.put((time.monotonic() + self.timeout_s, path))

    def take_sent(self) -> list[str]:
        """Requests whose blocks are written (their device blocks may go); a failed write is logged and let go too:
        the consumer then computes the prompt itself."""
        sent = [request_id for request_id, future in self.writes.items() if future.done()]
        for request_id in sent:
            error = self.writes.pop(request_id).exception()
            if error is not None:
                logger.warning("writing the KV of %s to %s failed: %s", request_id, self.directory, error)
        return sent

    def _expire(self) -> None:
        while True:
            deadline, path = self.expiring.get()
            time.sleep(max(0.0, deadline - time.monotonic()))
            if path.exists():
                logger.warning("no decode instance took the KV in %s within %.0f s: removing it", path, self.timeout_s)
                path.unlink(missing_ok=True)

    def fetch(self, load: dict, timeout_s: float) -> torch.Tensor:
        """The blocks [n, layers, 2, block, heads, dim] `load["remote_block_ids"]` in `load["remote_file"]`, after its
        first `load["skip_blocks"]` (the consumer has those already), once the file appears; removes it. Raises OSError
        saying why when they cannot be had."""
        path = self.directory / load["remote_file"]
        first = self.caches[0]
        block_shape = (len(self.caches), 2, *first.shape[2:])
        blocks = torch.empty((len(load["remote_block_ids"]), *block_shape), dtype=first.dtype)
        raw = _raw(blocks)
        skip, total = load["skip_blocks"], load["skip_blocks"] + len(blocks)
        block_bytes = math.prod(block_shape) * first.dtype.itemsize
        deadline = time.monotonic() + timeout_s
        while not path.exists():
            if time.monotonic() > deadline:
                raise TimeoutError(f"{path} did not appear within {timeout_s:.0f} s")
            if not _held(self.directory / load["remote_lock"]):
                raise ConnectionError(f"the prefill instance is gone (its {load['remote_lock']} is not held): {path} "
                                      "never came")
            time.sleep(_POLL_S)
        try:
            with open(path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                if size != total * block_bytes:
                    raise OSError(f"{path} holds {size} bytes, not the {total * block_bytes} of {total} KV blocks here")
                f.seek(skip * block_bytes)
                f.readinto(raw)
        finally:
            path.unlink(missing_ok=True)
        return blocks


class ProducerLock:
    """A file in the shared directory that a producer's engine holds locked for its life: consumers waiting for its
    KV stop waiting once no one holds it (the kernel lets go of a dead process's locks)."""

    def __init__(self, directory: str) -> None:
        self.name = f"{_PREFIX}{uuid.uuid4().hex}.lock"
        self.file = open(Path(directory) / self.name, "w")  # noqa: SIM115 -- held open for the engine's life
        fcntl.flock(self.file, fcntl.LOCK_EX)


def _held(path: Path) -> bool:
    """Whether a producer still holds its lock file `path`."""
    try:
        with open(path) as f:
            fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except FileNotFoundError:
        return False
    return False


def _raw(t: torch.Tensor) -> memoryview:
    """The bytes of a contiguous host tensor, shared with it (any dtype, fp8 and bf16 included)."""
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())
