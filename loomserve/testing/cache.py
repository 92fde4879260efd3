"""The local cache of built checkpoints: each build runs once per key, safely under concurrent builders."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any


def cache_root() -> Path:
    return Path(os.environ.get("LOOMSERVE_CACHE_DIR") or Path.home() / ".cache" / "loomserve")


def cached_build(name: str, key: Any, build: Callable[[Path], Any]) -> Path:
    """Runs `build(folder)` once per (name, key) into the cache folder (env LOOMSERVE_CACHE_DIR, default
    ~/.cache/loomserve) under `name-<SHA-256 of key>`, and returns the folder. Safe when several processes
    call it at once: each builds into a temp dir in the same parent, then os.rename; if the target already
    exists, it is used."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=repr).encode()).hexdigest()
    root = cache_root() / "tiny_checkpoints"
    target = root / f"{name}-{digest}"
    if target.is_dir():
        return target
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{target.name}-", dir=root))
    try:
        build(tmp)
        try:
            os.rename(tmp, target)
        except OSError:
            # Another process finished first (rename onto a non-empty directory fails): use its build.
            if not target.is_dir():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target
