"""Content hashes of media items: SHA-256 over a canonical serialization, never Python's `hash()`.

The hash covers the modality, the processing settings that change what the encoder sees or where its
output lands (sizes, frame rate), and the decoded content with its shape and dtype (for images: mode,
size and pixels), so two items share a hash only when they would produce the same encoder output.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import numpy as np


def content_hash(modality: str, settings: dict[str, Any], *arrays: np.ndarray) -> str:
    h = hashlib.sha256()
    h.update(json.dumps([modality, settings], sort_keys=True, default=str).encode())
    for array in arrays:
        array = np.ascontiguousarray(array)
        h.update(json.dumps([str(array.dtype), list(array.shape)]).encode())
        h.update(memoryview(array).cast("B"))
    return h.hexdigest()
