"""What the benchmarks share: model shape presets and their config-only checkpoint folders, the --shape/--model
flags, the machine and software a run was measured on, and percentiles. Run any benchmark as
`python -m benchmarks.NAME` from the repository root."""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import shlex
import subprocess
import sys
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from loomserve.testing.cache import cached_build
from loomserve.testing.checkpoints import build_tokenizer

# Bump when the files a preset folder holds change.
PRESET_FORMAT_VERSION = 1

PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {
        "family": "llama",
        "hidden_size": 256,
        "num_hidden_layers": 4,
        "num_attention_heads": 8,
        "num_key_value_heads": 2,
        "intermediate_size": 688,
        "vocab_size": 32000,
        "max_position_embeddings": 4096,
        "tie_word_embeddings": False,
        "rope_theta": 10000.0,
    },
    "qwen2.5-0.5b": {
        "family": "qwen2",
        "hidden_size": 896,
        "num_hidden_layers": 24,
        "num_attention_heads": 14,
        "num_key_value_heads": 2,
        "intermediate_size": 4864,
        "vocab_size": 151936,
        "max_position_embeddings": 32768,
        "tie_word_embeddings": True,
        "rope_theta": 1000000.0,
    },
    "qwen3-8b": {
        "family": "qwen3",
        "hidden_size": 4096,
        "num_hidden_layers": 36,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "intermediate_size": 12288,
        "vocab_size": 151936,
        "max_position_embeddings": 40960,
        "tie_word_embeddings": False,
        "rope_theta": 1000000.0,
    },
    "tiny-moe": {
        "family": "qwen3_moe",
        "hidden_size": 256,
        "num_hidden_layers": 4,
        "num_attention_heads": 8,
        "num_key_value_heads": 2,
        "head_dim": 32,
        "intermediate_size": 688,
        "moe_intermediate_size": 128,
        "num_experts": 16,
        "num_experts_per_tok": 4,
        "norm_topk_prob": True,
        "vocab_size": 32000,
        "max_position_embeddings": 4096,
        "tie_word_embeddings": False,
        "rope_theta": 1000000.0,
    },
    "qwen3-30b-a3b": {
        "family": "qwen3_moe",
        "hidden_size": 2048,
        "num_hidden_layers": 48,
        "num_attention_heads": 32,
        "num_key_value_heads": 4,
        "head_dim": 128,
        "intermediate_size": 6144,
        "moe_intermediate_size": 768,
        "num_experts": 128,
        "num_experts_per_tok": 8,
        "norm_topk_prob": True,
        "vocab_size": 151936,
        "max_position_embeddings": 40960,
        "tie_word_embeddings": False,
        "rope_theta": 1000000.0,
    },
}


def attention_heads(shape: str) -> tuple[int, int, int]:
    """(query heads, KV heads, head dim) of a preset."""
    preset = PRESETS[shape]
    heads = preset["num_attention_heads"]
    return heads, preset["num_key_value_heads"], preset.get("head_dim") or preset["hidden_size"] // heads


# ----------------------------------------------------------------------------------------------- flags


def add_model_flags(p: argparse.ArgumentParser, load_format_help: str) -> None:
    """--shape PRESET or --model PATH, and --load-format (`load_format_help` names what it sets)."""
    model = p.add_mutually_exclusive_group()
    model.add_argument("--shape", choices=sorted(PRESETS), default="tiny", help="model shape preset (dummy weights)")
    model.add_argument("--model", help="a checkpoint folder instead of a preset")
    p.add_argument("--load-format", default=None, help=f"{load_format_help} (default: dummy for presets, else auto)")


def resolve_model(args: argparse.Namespace) -> tuple[Path, str]:
    """The checkpoint folder of --model, else --shape's preset folder, and the load format to read it with."""
    model_path = Path(args.model) if args.model else build_preset_checkpoint(args.shape)
    return model_path, args.load_format or ("auto" if args.model else "dummy")


# -------------------------------------------------------------------------------------- preset folders


def make_hf_config(preset: dict[str, Any], eos_token_id: int | None = None) -> Any:
    """A transformers config object for a preset (RoPE settings in `rope_parameters`, transformers 5)."""
    from transformers import LlamaConfig, Qwen2Config, Qwen3Config, Qwen3MoeConfig

    spec = {k: v for k, v in preset.items() if k not in ("family", "rope_theta")}
    family = preset["family"]
    common = {
        **spec,
        "rope_parameters": {"rope_type": "default", "rope_theta": preset["rope_theta"]},
        "hidden_act": "silu",
        "rms_norm_eps": 1e-6,
        "eos_token_id": eos_token_id,
        "dtype": "bfloat16",
    }
    if family == "llama":
        return LlamaConfig(architectures=["LlamaForCausalLM"], attention_bias=False, mlp_bias=False, **common)
    if family == "qwen3_moe":
        return Qwen3MoeConfig(architectures=["Qwen3MoeForCausalLM"], use_sliding_window=False, sliding_window=None,
                              attention_bias=False, **common)
    if family == "qwen2":
        return Qwen2Config(architectures=["Qwen2ForCausalLM"], use_sliding_window=False, sliding_window=None, **common)
    return Qwen3Config(
        architectures=["Qwen3ForCausalLM"],
        use_sliding_window=False,
        sliding_window=None,
        attention_bias=False,
        **common,
    )


def pad_tokenizer_vocab(tokenizer_json: Path, vocab_size: int) -> None:
    """Give every id below vocab_size a token (`Ġt123`-style fillers no merge produces), so any id the model
    samples detokenizes to text, as with a real tokenizer (unknown ids decode to nothing and stall the
    incremental detokenizer)."""
    data = json.loads(tokenizer_json.read_text())
    vocab: dict[str, int] = data["model"]["vocab"]
    taken = set(vocab) | {t["content"] for t in data["added_tokens"]}
    used = set(vocab.values()) | {t["id"] for t in data["added_tokens"]}
    counter = 0
    for token_id in range(vocab_size):
        if token_id in used:
            continue
        while f"Ġt{counter}" in taken:
            counter += 1
        vocab[f"Ġt{counter}"] = token_id
        counter += 1
    tokenizer_json.write_text(json.dumps(data, ensure_ascii=False))


def build_preset_checkpoint(shape: str) -> Path:
    """config.json + a full-vocabulary byte-level BPE tokenizer in a cache folder (no weights: dummy load)."""
    preset = PRESETS[shape]
    return cached_build(shape, [PRESET_FORMAT_VERSION, preset], partial(_write_preset, preset))


def _write_preset(preset: dict[str, Any], folder: Path) -> None:
    """The preset's tokenizer (padded to its vocabulary) and config.json into `folder`."""
    family = "qwen3" if preset["family"] == "qwen3_moe" else preset["family"]  # Qwen3-MoE uses Qwen3's tokenizer
    tokenizer = build_tokenizer(family, model_max_length=preset["max_position_embeddings"])
    tokenizer.save_pretrained(folder)
    pad_tokenizer_vocab(folder / "tokenizer.json", preset["vocab_size"])
    make_hf_config(preset, eos_token_id=tokenizer.eos_token_id).save_pretrained(folder)


def prompt_vocab_size(model_path: Path) -> int:
    """Ids must be valid for the model and, for real checkpoints, for its tokenizer too."""
    from transformers import AutoConfig, AutoTokenizer

    vocab = AutoConfig.from_pretrained(model_path).get_text_config().vocab_size
    return min(vocab, len(AutoTokenizer.from_pretrained(model_path)))


# ----------------------------------------------------------------------------------------- environment


def device_name(device: torch.device) -> str:
    """The GPU's name (read with nvidia-smi, so a client process creates no CUDA context), else the CPU's."""
    if device.type == "cuda":
        return _gpu_name(device.index or 0)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} logical CPUs)"
    except OSError:
        pass
    return platform.processor() or "cpu"


def _gpu_name(index: int) -> str:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader", "-i", str(index)],
                             capture_output=True, text=True, timeout=20)
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip().splitlines()[0]
    except (OSError, subprocess.SubprocessError):
        pass
    return "cuda (name unknown)"


def git_commit() -> str:
    """The checkout's short commit, `+dirty` when tracked files differ from it."""
    try:
        commit = _git("rev-parse", "--short", "HEAD") or "unknown"
        return commit + ("+dirty" if _git("status", "--porcelain", "--untracked-files=no") else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _git(*args: str) -> str:
    here = Path(__file__).resolve().parent
    return subprocess.run(["git", *args], capture_output=True, text=True, timeout=10, cwd=here).stdout.strip()


def environment(device: torch.device) -> dict[str, str]:
    """What a result was measured on: device, versions, threads, date, commit and the machine's load."""
    import transformers

    return {
        "device": device_name(device),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "threads": str(torch.get_num_threads()) if device.type == "cpu" else "-",
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "(unset)"),
        "date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"),
        "commit": git_commit(),
        "load avg (1/5/15m)": " ".join(f"{x:.2f}" for x in os.getloadavg()),
    }


def print_run_header(argv: list[str] | None, device: torch.device) -> dict[str, str]:
    """Print the command line and the environment (`environment`) as `# ` lines; returns the environment."""
    env = environment(device)
    print(f"# {command_line(argv)}")
    for key, value in env.items():
        print(f"# {key}: {value}")
    return env


def command_line(argv: list[str] | None = None) -> str:
    """How this run was started, `python -m benchmarks.NAME ARGS`, as the reports quote it."""
    spec = sys.modules["__main__"].__spec__
    name = spec.name if spec is not None else Path(sys.argv[0]).stem
    return shlex.join(["python", "-m", name, *(argv if argv is not None else sys.argv[1:])])


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    """A Markdown table, columns padded to their widest cell."""
    widths = [max(len(x) for x in col) for col in zip(header, *rows, strict=True)]
    line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"
    return "\n".join([line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, rows)])


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (linear interpolation); NaN for no values."""
    return float(np.percentile(values, q)) if values else float("nan")


@contextlib.contextmanager
def busy_core(enabled: bool = True) -> Iterator[None]:
    """A bounded background CPU load while the block runs: one process spinning on one core (the "contended" mode
    of the CPU benchmarks: other work on the host, measured rather than guessed)."""
    if not enabled:
        yield
        return
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        yield
    finally:
        spinner.kill()
        spinner.wait()
