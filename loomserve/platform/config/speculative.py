"""SpeculativeConfig: vLLM's `--speculative-config` JSON read into a checked value.

Methods: "ngram" (prompt lookup: the tokens that followed the latest n-gram's earlier occurrence), "draft_model"
(a smaller checkpoint with the target's tokenizer) and "eagle3" (an EAGLE-3 head trained for the target, fed by its
hidden states). `synthetic_acceptance_rate` is loomserve's own key, for benchmarks only: each draft
token is accepted with that probability whatever the target says, so speed can be measured on random weights (the
output then no longer follows the target's distribution)."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from loomserve.platform.config.model import ModelConfig

METHODS = ("ngram", "draft_model", "eagle3")
_NEEDS_MODEL = ("draft_model", "eagle3")
_DEFAULT_LOOKUP = 5  # vLLM's prompt_lookup_min and _max when neither is given


@dataclass(frozen=True)
class SpeculativeConfig:
    method: str
    num_speculative_tokens: int
    model: str | None = None  # the draft (or EAGLE head) checkpoint; not for ngram
    prompt_lookup_min: int | None = None  # ngram: shortest and longest suffix matched in the prompt
    prompt_lookup_max: int | None = None
    disable_by_batch_size: int | None = None  # steps with at least this many running requests do not speculate
    synthetic_acceptance_rate: float | None = None  # benchmarks only: accept each draft token with this probability

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"unknown speculative method {self.method!r}; choose {', '.join(METHODS)}")
        if self.num_speculative_tokens < 1:
            raise ValueError(f"num_speculative_tokens must be at least 1, got {self.num_speculative_tokens}")
        if self.method in _NEEDS_MODEL and not self.model:
            raise ValueError(f"speculative method {self.method!r} needs a draft \"model\"")
        if self.method == "ngram":
            self._check_lookup()
        if self.disable_by_batch_size is not None and self.disable_by_batch_size < 2:
            raise ValueError(f"disable_by_batch_size must be at least 2, got {self.disable_by_batch_size}")
        rate = self.synthetic_acceptance_rate
        if rate is not None and not 0.0 <= rate <= 1.0:
            raise ValueError(f"synthetic_acceptance_rate must be in [0, 1], got {rate}")

    def _check_lookup(self) -> None:
        low, high = self.prompt_lookup_min, self.prompt_lookup_max
        if low is None or high is None or not 1 <= low <= high:
            raise ValueError(f"need 1 <= prompt_lookup_min <= prompt_lookup_max, got {low} and {high}")

    @property
    def num_lookahead_tokens(self) -> int:
        """KV slots a step books past its own tokens: a draft model writes its drafts' KV ahead of the target."""
        return self.num_speculative_tokens if self.method in _NEEDS_MODEL else 0

    def speculates(self, num_running: int) -> bool:
        """Whether a step with this many running requests speculates (large batches are compute-bound)."""
        return self.disable_by_batch_size is None or num_running < self.disable_by_batch_size


def parse_speculative_config(value: str | dict[str, Any]) -> SpeculativeConfig:
    """A JSON object (or its dict) -> SpeculativeConfig. As in vLLM, a config naming a draft model and no method
    is a draft-model config, and an ngram config giving one lookup bound uses it for the other (neither: 5)."""
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
        low, high = spec.get("prompt_lookup_min"), spec.get("prompt_lookup_max")
        spec["prompt_lookup_min"] = low or high or _DEFAULT_LOOKUP
        spec["prompt_lookup_max"] = high or low or _DEFAULT_LOOKUP
    return SpeculativeConfig(**spec)


def locate_speculative_model(spec: SpeculativeConfig, download_dir: str | None) -> SpeculativeConfig:
    """The config with its draft's or head's checkpoint as a local folder (a hub id fetched once into the hub cache;
    EAGLE-3 heads are often published as `pytorch_model.bin`)."""
    if spec.model is None:
        return spec
    from loomserve.platform.config.checkpoint import CHECKPOINT_FILES, locate_checkpoint

    files = CHECKPOINT_FILES + ["pytorch_model.bin"] if spec.method == "eagle3" else CHECKPOINT_FILES
    return dataclasses.replace(spec, model=locate_checkpoint(spec.model, download_dir=download_dir, files=files))


def check_speculative_config(spec: SpeculativeConfig, model_config: ModelConfig) -> None:
    """Refuse, before any weight loads, what the target cannot speculate with: a pooling model, a draft or EAGLE-3
    head for a multimodal target, a draft whose vocabulary or context differs from the target's, an EAGLE-3 head
    that does not fit the target (`eagle3_config.check_head`)."""
    if model_config.task != "generate":
        raise ValueError(f"speculative decoding needs a generative model; {model_config.model} serves "
                         f"{model_config.task!r}")
    if spec.method == "ngram":
        return
    from transformers import AutoConfig

    from loomserve.platform.config.model import context_limit
    from loomserve.platform.models.registry import is_multimodal

    if is_multimodal(model_config.architecture):
        raise ValueError(f"a {spec.method} proposer for a multimodal target is not supported yet (its positions would "
                         "not follow the target's media): use the 'ngram' method")
    if spec.method == "eagle3":
        from loomserve.platform.spec_decode.eagle3_config import check_head, head_config

        check_head(spec.model, head_config(spec.model), model_config.text_config)
        return

    draft = AutoConfig.from_pretrained(spec.model).get_text_config()
    if draft.vocab_size != model_config.vocab_size:
        raise ValueError(f"the draft model {spec.model} has a vocabulary of {draft.vocab_size} tokens, the target "
                         f"{model_config.vocab_size}: a draft must share the target's tokenizer")
    if context_limit(draft) < model_config.max_model_len:
        raise ValueError(f"the draft model {spec.model} reads at most {context_limit(draft)} tokens, less than "
                         f"max_model_len {model_config.max_model_len}: lower --max-model-len")
