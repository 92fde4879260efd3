"""Where LoRA adapters may be loaded from, and what the server tells about paths.

`/v1/load_lora_adapter` reads only from folders under `--allowed-lora-paths` (default: just the `--lora-modules`
folders named at start-up). A path outside them, one that does not exist and one without an adapter get one and the
same answer, so the endpoint cannot be used to probe the server's filesystem. `/v1/models` shows no server paths
unless `--show-model-paths` asks for them.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

NO_ADAPTER = ("No LoRA adapter can be loaded from this lora_path: it is not under the server's --allowed-lora-paths "
              "or holds no adapter")


class NoAdapterError(ValueError):
    """No adapter the server may read at a lora_path (404, as vLLM answers a path without an adapter)."""


@dataclass(frozen=True)
class LoRAPathPolicy:
    allowed: tuple[Path, ...] = ()  # resolved folders adapters may come from
    show_model_paths: bool = False

    @classmethod
    def of(cls, allowed: Sequence[str], startup_paths: Sequence[str], show_model_paths: bool) -> LoRAPathPolicy:
        return cls(tuple(Path(os.path.realpath(p)) for p in [*allowed, *startup_paths]), show_model_paths)

    def check(self, path: str) -> None:
        """NoAdapterError (the same whatever the reason) unless `path` is an adapter folder under an allowed folder."""
        real = Path(os.path.realpath(path))
        inside = any(real.is_relative_to(folder) for folder in self.allowed)
        if not (inside and (real / "adapter_config.json").is_file()):
            raise NoAdapterError(NO_ADAPTER)

    def shown(self, path: str, instead: str) -> str:
        """`path` as /v1/models shows it: `instead` when paths are not shown and `path` is one on this server."""
        return path if self.show_model_paths or not os.path.exists(path) else instead


def add_lora_path_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--allowed-lora-paths", nargs="+", default=[], metavar="DIR",
                        help="folders /v1/load_lora_adapter may load adapters from (default: only the --lora-modules)")
    parser.add_argument("--show-model-paths", action=argparse.BooleanOptionalAction, default=False,
                        help="show models' and adapters' server paths in /v1/models `root`")


def lora_path_policy_from(ns: argparse.Namespace) -> LoRAPathPolicy:
    return LoRAPathPolicy.of(ns.allowed_lora_paths, [path for _, path in ns.lora_modules], ns.show_model_paths)
