"""The front end's cost per image chat item, without a server (`benchmarks/multimodal.py --frontend-only`).

Each mode does what the API process does for one image between reading its bytes and handing the request to the
engine socket: decode, preprocess, serialize a request carrying the item (`platform/messages.py`).

  before  decode + resize + float32 rescale/normalize on the host (the numpy steps the front end ran before pixels
          moved to the device), serializing float32 pixel_values
  after   decode + resize on uint8, serializing uint8 pixels and their table; the float steps run on the engine's
          device (`modalities/pixels.py`)
  cached  the same bytes again: the processor cache answers without decoding or preprocessing, and the request
          goes to the engine without the pixels, which it holds (`modalities/sent_items.py`)

Times are per image on one thread (median and mean over the images), then images/s with --threads threads.
"""

from __future__ import annotations

import argparse
import base64
import statistics
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

from loomserve.modalities.budget import MediaSpend
from loomserve.modalities.config import MultiModalConfig
from loomserve.modalities.frontend import MultiModalFrontend
from loomserve.modalities.image import normalize, resize, smart_resize, to_rgb
from loomserve.modalities.inputs import MultiModalItem, PlaceholderRange
from loomserve.modalities.media import MediaRef
from loomserve.modalities.processors.base import ProcessedItem
from loomserve.modalities.sent_items import MediaSenders
from loomserve.platform.config import EngineArgs
from loomserve.platform.messages import EngineCoreRequest, pack


def _png_bytes(url: str) -> bytes:
    return base64.b64decode(url.split(",", 1)[1])


def _wire_bytes(p: ProcessedItem, senders: MediaSenders | None = None) -> int:
    """Serialize a request of the item as it crosses to the engine (through `senders`, which leave out the tensors of
    items the engine holds, when given); its size in bytes."""
    item = MultiModalItem("image", p.content_hash, PlaceholderRange(0, p.num_tokens), p.data, p.meta)
    request = EngineCoreRequest("r", [0] * p.num_tokens, None, None, 0.0, mm_items=[item])
    return len(pack(request if senders is None else senders.strip(request, 0)))


def _before(frontend: MultiModalFrontend, ref: MediaRef, data: bytes) -> int:
    """The former front end: pixel_values [1, 3, H, W] float32 normalized on the host."""
    proc = frontend.processor
    rgb = to_rgb(proc.decode(ref, data, MediaSpend()))
    height, width = smart_resize(rgb.height, rgb.width, proc.patch * proc.merge, *proc.image_pixels)
    pixels = normalize(resize(rgb, height, width, proc.resample), 1 / 255, proc.mean, proc.std)[None]
    grid = torch.tensor((1, height // proc.patch, width // proc.patch))
    item = ProcessedItem({"pixel_values": torch.from_numpy(pixels), "grid_thw": grid},
                         int(grid.prod()) // proc.merge**2, "0" * 64, {})
    return _wire_bytes(item)


def _after(frontend: MultiModalFrontend, senders: MediaSenders, ref: MediaRef, data: bytes) -> int:
    [item] = frontend.process_all([ref], [data], MediaSpend())["image"]
    return _wire_bytes(item, senders)


def _time_each(fn: Callable[[MediaRef, bytes], int], work: list[tuple[MediaRef, bytes]]) -> tuple[list[float], int]:
    times, size = [], 0
    for ref, data in work:
        start = time.perf_counter()
        size = fn(ref, data)
        times.append(time.perf_counter() - start)
    return times, size


def _rate(fn: Callable[[MediaRef, bytes], int], work: list[tuple[MediaRef, bytes]], threads: int) -> float:
    """Images per second with `threads` threads sharing the work."""
    with ThreadPoolExecutor(threads) as pool:
        start = time.perf_counter()
        list(pool.map(lambda w: fn(*w), work))
        return len(work) / (time.perf_counter() - start)


def run_frontend_benchmark(model: Path, args: argparse.Namespace) -> int:
    from transformers import AutoTokenizer

    from benchmarks.multimodal import image_url

    config = EngineArgs(model=str(model), load_format="dummy").create_engine_config()
    tokenizer = AutoTokenizer.from_pretrained(str(model))
    n = args.num_requests
    urls = [image_url(args.image_size, seed) for seed in range(2 * n)]
    work = [(MediaRef("image", url=u), _png_bytes(u)) for u in urls]
    repeated = [work[0]] * (2 * n)
    rows: list[list[Any]] = []
    for mode in ("before", "after", "cached"):
        frontend = MultiModalFrontend(config.model_config, tokenizer, MultiModalConfig())
        fn = _mode_fn(mode, frontend, MediaSenders(frontend.mm_config.processor_cache_bytes, 1))
        items = repeated if mode == "cached" else work
        if mode == "cached":
            fn(*items[0])  # the first sight of the image fills the cache
        times, size = _time_each(fn, items[:n])
        rate = _rate(fn, items[n:], args.threads)
        rows.append([mode, f"{statistics.median(times) * 1e3:.2f}", f"{statistics.mean(times) * 1e3:.2f}",
                     f"{1 / statistics.mean(times):,.0f}", f"{rate:,.0f}", f"{size / 1e6:.3f}"])
    print(f"- shape {args.shape}, {args.image_size}x{args.image_size} PNG images, {n} per mode, "
          f"{args.threads} threads for the rate, torch threads {torch.get_num_threads()}\n")
    header = ["mode", "ms/image p50", "ms/image mean", "images/s 1 thread", f"images/s {args.threads} threads",
              "MB on the wire"]
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---" for _ in header) + "|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    return 0


def _mode_fn(mode: str, frontend: MultiModalFrontend, senders: MediaSenders) -> Callable[[MediaRef, bytes], int]:
    if mode == "before":
        return lambda ref, data: _before(frontend, ref, data)
    return lambda ref, data: _after(frontend, senders, ref, data)

