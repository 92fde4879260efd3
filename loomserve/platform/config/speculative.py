"""SpeculativeConfig: vLLM's `--speculative-config` JSON read into a checked value.

Speculative decoding itself is not implemented; EngineArgs refuses a config after checking it, so a malformed
one is reported as such."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any

METHODS = ("ngram", "draft_model", "eagle3")
_NEEDS_MODEL = ("draft_model", "eagle3")


@dataclass(frozen=True)
class SpeculativeConfig:
    method: str
    num_speculative_tokens: int
    model: str | None = None  # the draft (or EAGLE head) checkpoint; not for ngram
    prompt_lookup_min: int | None = None  # ngram: shortest and longest suffix matched in the prompt
    prompt_lookup_max: int | None = None

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"unknown speculative method {self.method!r}; choose {', '.join(METHODS)}")
        if self.num_speculative_tokens < 1:
            raise ValueError(f"num_speculative_tokens must be at least 1, got {self.num_speculative_tokens}")
        if self.method in _NEEDS_MODEL and not self.model:
            raise ValueError(f"speculative method {self.method!r} needs a draft \"model\"")
        if self.method == "ngram":
            self._check_lookup()

    def _check_lookup(self) -> None:
        low, high = self.prompt_lookup_min, self.prompt_lookup_max
        if low is None or high is None:
            raise ValueError("ngram speculation needs prompt_lookup_min and prompt_lookup_max")
        if not 1 <= low <= high:
            raise ValueError(f"need 1 <= prompt_lookup_min <= prompt_lookup_max, got {low} and {high}")


def parse_speculative_config(value: str | dict[str, Any]) -> SpeculativeConfig:
    """A JSON object (or its dict) -> SpeculativeConfig. As in vLLM, a config naming a draft model and no method
    is a draft-model config, and an ngram config giving one lookup bound uses it for the other."""
    spec = json.loads(value) if isinstance(value, str) else dict(value)
    if not isinstance(spec, dict):
        raise ValueError(f"speculative_config must be a JSON object, got {value!r}")
    unknown = set(spec) - {f.name for f in dataclasses.fields(SpeculativeConfig)}
    if unknown:
        raise ValueError(f"unknown speculative_config keys: {', '.join(sorted(unknown))}")
    if "method" not in spec and spec.get("model"):
        spec["method"] = "draft_model"
    if "method" not in spec or "num_speculative_tokens" not in spec:
        raise ValueError("speculative_config needs \"method\" (or a draft \"model\") and \"num_speculative_tokens\"")
    if spec["method"] == "ngram":
        spec.setdefault("prompt_lookup_min", spec.get("prompt_lookup_max"))
        spec.setdefault("prompt_lookup_max", spec.get("prompt_lookup_min"))
    return SpeculativeConfig(**spec)
