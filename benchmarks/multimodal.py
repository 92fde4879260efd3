"""Image-chat serving throughput: `loomserve serve` under concurrent OpenAI-style clients, unique vs repeated images.

What it measures
----------------
A Qwen2-VL server (a subprocess of `loomserve serve`) answers N chat requests, each one image (a PNG data
URL of --image-size px square) plus a short question, exactly --output-len greedy tokens (EOS ignored),
sent by --concurrency clients at once. The clock runs from the first request to the last answer. Scenarios:

  unique          every request brings a new image: decode + preprocess + vision encoder + full prefill each time
  repeated        every request brings the same image: the processor cache (no decoding or preprocessing
                  again; the engine holds the pixels, so none are sent), the encoder cache and the prefix
                  cache (its blocks carry the image's content hash) answer everything but the first
  repeated-no-pc  the same image with --no-enable-prefix-caching: only the encoder cache is reused

Reported per scenario: requests/s, output tokens/s, latency p50/p90/max, and the share of prompt tokens
served from the prefix cache, for the fastest of --repeats runs (each run with images not sent before).
Before timing, each server answers --warmup requests with other images.

--frontend-only times, without a server, the front end's cost per image (one thread, --num-requests unique images,
and as many again with --threads threads): decode + preprocess + serialize for the engine, `before` (float32
pixel_values made on the host, as the front end did before pixels went to the device), `after` (uint8 pixels, the
float steps on the engine's device) and `cached` (the same bytes again: a processor-cache hit), with the bytes
each item puts on the wire.

Shapes: `tiny` serves the tiny Qwen2-VL test checkpoint (real weights; images at most 112x112, 16 tokens);
`qwen2-vl-small`, `qwen2-vl-2b` and `qwen2-vl-7b` write config-only folders (Qwen2-VL's processor
settings, the real models' shapes for 2b and 7b) and serve them with dummy weights (`--load-format dummy`).

    python -m benchmarks.multimodal --shape tiny --num-requests 48 --concurrency 8 --image-size 112
    python -m benchmarks.multimodal --shape qwen2-vl-small --num-requests 24 --concurrency 4 --image-size 448
    python -m benchmarks.multimodal --shape qwen2-vl-2b --num-requests 512 --concurrency 64 --image-size 448
    python -m benchmarks.multimodal --shape qwen2-vl-2b --frontend-only --num-requests 64 --image-size 448

Add `--server-args '--mm-processor-cache-gb 0'` to see the repeated scenarios without the processor cache.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from PIL import Image

from benchmarks.common import environment, pad_tokenizer_vocab, percentile
from loomserve.testing.cache import cached_build
from loomserve.testing.mm_checkpoints import QWEN_VL_TEMPLATE, QWEN_VL_TOKENS, build_mm_tokenizer, tiny_mm_checkpoint
from loomserve.testing.server import Server

PRESET_FORMAT_VERSION = 2

# The real models' shapes (Qwen/Qwen2-VL-2B-Instruct, Qwen/Qwen2-VL-7B-Instruct config.json), and a small one
# whose vision tower still dominates the work of an image request, for CPUs.
PRESETS: dict[str, dict[str, Any]] = {
    "qwen2-vl-small": {
        "text": {"hidden_size": 256, "intermediate_size": 688, "num_hidden_layers": 4, "num_attention_heads": 4,
                 "num_key_value_heads": 2, "vocab_size": 32768, "max_position_embeddings": 8192},
        "vision": {"depth": 8, "embed_dim": 384, "hidden_size": 256, "mlp_ratio": 4, "num_heads": 6},
        "tie_word_embeddings": False,
    },
    "qwen2-vl-2b": {
        "text": {"hidden_size": 1536, "intermediate_size": 8960, "num_hidden_layers": 28, "num_attention_heads": 12,
                 "num_key_value_heads": 2, "vocab_size": 151936, "max_position_embeddings": 32768},
        "vision": {"depth": 32, "embed_dim": 1280, "hidden_size": 1536, "mlp_ratio": 4, "num_heads": 16},
        "tie_word_embeddings": True,
    },
    "qwen2-vl-7b": {
        "text": {"hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28, "num_attention_heads": 28,
                 "num_key_value_heads": 4, "vocab_size": 152064, "max_position_embeddings": 32768},
        "vision": {"depth": 32, "embed_dim": 1280, "hidden_size": 3584, "mlp_ratio": 4, "num_heads": 16},
        "tie_word_embeddings": False,
    },
}
SCENARIOS = ("unique", "repeated", "repeated-no-pc")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--shape", choices=["tiny", *PRESETS], default="tiny")
    p.add_argument("--num-requests", type=int, default=48)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--image-size", type=int, default=112, help="side of the square test images, in pixels")
    p.add_argument("--output-len", type=int, default=16)
    p.add_argument("--warmup", type=int, default=4)
    p.add_argument("--repeats", type=int, default=2, help="timed runs per scenario; the fastest is reported")
    p.add_argument("--scenarios", nargs="+", choices=SCENARIOS, default=list(SCENARIOS))
    p.add_argument("--server-args", default="", help="extra `loomserve serve` flags, e.g. '--max-num-seqs 128'")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    p.add_argument("--frontend-only", action="store_true",
                   help="time the front end's work per image (no server): before/after/cached")
    p.add_argument("--threads", type=int, default=4, help="--frontend-only: threads of the throughput run")
    return p.parse_args(argv)


# ----------------------------------------------------------------------------------------------- checkpoint


def build_preset_checkpoint(shape: str) -> Path:
    """config.json, processor configs and a full-vocabulary tokenizer with Qwen2-VL's special tokens."""
    preset = PRESETS[shape]
    return cached_build(shape, [PRESET_FORMAT_VERSION, preset], partial(_write_preset, preset))


def _write_preset(preset: dict[str, Any], folder: Path) -> None:
    """The preset's tokenizer (padded to its vocabulary), model, generation and processor configs into `folder`."""
    from transformers import GenerationConfig, Qwen2VLConfig

    text = preset["text"]
    tokenizer = build_mm_tokenizer("qwen2", QWEN_VL_TOKENS, QWEN_VL_TEMPLATE, text["max_position_embeddings"])
    tokenizer.save_pretrained(folder)
    pad_tokenizer_vocab(folder / "tokenizer.json", text["vocab_size"])
    ids = tokenizer.convert_tokens_to_ids
    head_dim = text["hidden_size"] // text["num_attention_heads"]
    mrope_section = [n * head_dim // 128 for n in (16, 24, 24)]  # Qwen2-VL's split of a 128-dim head
    config = Qwen2VLConfig(
        text_config={**text, "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0,
                                                 "mrope_section": mrope_section},
                     "rms_norm_eps": 1e-6, "eos_token_id": ids("<|im_end|>"), "use_sliding_window": False},
        vision_config={**preset["vision"], "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2,
                       "in_channels": 3, "hidden_act": "quick_gelu"},
        image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"),
        tie_word_embeddings=preset["tie_word_embeddings"], architectures=["Qwen2VLForConditionalGeneration"],
        dtype="bfloat16",
    )
    config.save_pretrained(folder)
    GenerationConfig(eos_token_id=ids("<|im_end|>")).save_pretrained(folder)
    (folder / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "Qwen2VLImageProcessor", "min_pixels": 3136, "max_pixels": 12845056,
        "patch_size": 14, "temporal_patch_size": 2, "merge_size": 2,
    }))


# ----------------------------------------------------------------------------------------------- workload


def image_url(size: int, seed: int) -> str:
    """A smooth random image (upsampled 8x8 noise plus grain) as a PNG data URL, like a photo compresses."""
    rng = np.random.RandomState(seed)
    coarse = Image.fromarray(rng.randint(0, 256, (8, 8, 3), dtype=np.uint8)).resize((size, size), Image.BILINEAR)
    grain = rng.randint(-8, 9, (size, size, 3))
    pixels = np.clip(np.asarray(coarse, dtype=np.int64) + grain, 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def chat_body(url: str, output_len: int) -> dict[str, Any]:
    content = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "Describe this image."}]
    return {"messages": [{"role": "user", "content": content}], "max_tokens": output_len, "temperature": 0,
            "ignore_eos": True}


@dataclass
class ScenarioResult:
    name: str
    num_requests: int
    wall_s: float
    latencies: list[float]
    output_tokens: int
    prompt_tokens: int
    cached_tokens: int

    def row(self) -> list[str]:
        lat = self.latencies
        return [self.name, f"{self.num_requests / self.wall_s:,.2f}", f"{self.output_tokens / self.wall_s:,.1f}",
                f"{percentile(lat, 50):.3f}", f"{percentile(lat, 90):.3f}", f"{max(lat):.3f}",
                f"{self.cached_tokens / max(self.prompt_tokens, 1):.0%}", f"{self.wall_s:.2f}"]


async def send_all(url: str, bodies: list[dict[str, Any]], concurrency: int) -> tuple[float, list[dict], list[float]]:
    """POST every body with `concurrency` clients; (wall seconds, responses, per-request latencies)."""
    queue: asyncio.Queue = asyncio.Queue()
    for i, body in enumerate(bodies):
        queue.put_nowait((i, body))
    responses: list[dict] = [{}] * len(bodies)
    latencies = [0.0] * len(bodies)

    async def client(http: httpx.AsyncClient) -> None:
        while not queue.empty():
            i, body = queue.get_nowait()
            start = time.perf_counter()
            reply = await http.post("/v1/chat/completions", json=body)
            reply.raise_for_status()
            latencies[i] = time.perf_counter() - start
            responses[i] = reply.json()

    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as http:
        start = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(concurrency)))
        return time.perf_counter() - start, responses, latencies


def run_scenario(name: str, url: str, args: argparse.Namespace, seed: int) -> ScenarioResult:
    if name == "unique":
        urls = [image_url(args.image_size, seed + i) for i in range(args.num_requests)]
    else:
        urls = [image_url(args.image_size, seed)] * args.num_requests
    bodies = [chat_body(u, args.output_len) for u in urls]
    wall, responses, latencies = asyncio.run(send_all(url, bodies, args.concurrency))
    usage = [r["usage"] for r in responses]
    return ScenarioResult(
        name, len(bodies), wall, latencies,
        output_tokens=sum(u["completion_tokens"] for u in usage),
        prompt_tokens=sum(u["prompt_tokens"] for u in usage),
        cached_tokens=sum((u.get("prompt_tokens_details") or {}).get("cached_tokens", 0) for u in usage),
    )


def make_server(model: Path, dummy: bool, server_args: str, prefix_caching: bool) -> Server:
    """`loomserve serve` for one group of scenarios, logging to a file in $TMPDIR."""
    flags = ["--uvicorn-log-level", "warning", "--enable-prompt-tokens-details",  # usage reports cached tokens
             *(["--load-format", "dummy"] if dummy else []), *server_args.split()]
    if not prefix_caching:
        flags.append("--no-enable-prefix-caching")
    log = f"loomserve-multimodal-bench-{os.getpid()}-{'pc' if prefix_caching else 'no-pc'}.log"
    return Server(str(model), flags, Path(os.environ.get("TMPDIR", "/tmp")) / log)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    dummy = args.shape != "tiny"
    model = build_preset_checkpoint(args.shape) if dummy else tiny_mm_checkpoint("qwen2_vl")
    if args.frontend_only:
        from benchmarks.multimodal_frontend import run_frontend_benchmark

        return run_frontend_benchmark(model, args)
    results = []
    for prefix_caching in (True, False):
        names = [s for s in args.scenarios if (s == "repeated-no-pc") != prefix_caching]
        if not names:
            continue
        server = make_server(model, dummy, args.server_args, prefix_caching)
        with server.running(timeout=1800):
            url = server.url
            warmup = [chat_body(image_url(args.image_size, 10_000 + i), args.output_len) for i in range(args.warmup)]
            asyncio.run(send_all(url, warmup, args.concurrency))
            for i, name in enumerate(names):
                runs = [run_scenario(name, url, args, seed=100_000 * (i + 1) + 1000 * r) for r in range(args.repeats)]
                results.append(min(runs, key=lambda r: r.wall_s))
                print(f"{name}: walls {[round(r.wall_s, 2) for r in runs]} best {results[-1].row()}", flush=True)
    import torch

    env = environment(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    print("\n" + "\n".join(f"- {k}: {v}" for k, v in env.items()))
    print(f"- shape {args.shape}, {args.num_requests} requests, concurrency {args.concurrency}, "
          f"{args.image_size}x{args.image_size} images, {args.output_len} output tokens, server args "
          f"'{args.server_args}'\n")
    header = ["scenario", "req/s", "output tok/s", "p50 s", "p90 s", "max s", "prefix-cached", "wall s"]
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---" for _ in header) + "|")
    for r in results:
        print("| " + " | ".join(r.row()) + " |")
    if args.json:
        args.json.write_text(json.dumps({"env": env, "args": {k: str(v) for k, v in vars(args).items()},
                                         "results": [vars(r) for r in results]}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
