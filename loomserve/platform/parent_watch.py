"""A spawned process that ends with its parent: the engine must not outlive a front end killed with SIGKILL, which
runs no cleanup of its own (the engine's memory and its IPC folder would stay behind)."""

from __future__ import annotations

import multiprocessing
import os
import threading
from collections.abc import Callable


def exit_with_parent(cleanup: Callable[[], None]) -> None:
    """Once the parent process has died, run `cleanup` and exit. multiprocessing's spawn gives the child a pipe from
    its parent whose far end only the parent holds, so its closing is the parent's death: no polling."""
    parent = multiprocessing.parent_process()
    if parent is None:
        return

    def watch() -> None:
        parent.join()
        cleanup()
        os._exit(1)

    threading.Thread(target=watch, name="loomserve-parent-watch", daemon=True).start()
