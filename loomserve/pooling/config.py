"""A model's task and pooling defaults, read from its checkpoint as sentence-transformers saved it (which tasks
an architecture serves is the model registry's).

`modules.json` lists the sentence-transformers modules: a `Pooling` module (`1_Pooling/config.json`: CLS, mean or
last-token pooling) and a `Normalize` module. `config_sentence_transformers.json` holds the prompts and, for a
CrossEncoder, the activation of its scores; `sentence_bert_config.json` the longest input it embeds. Everything
can be overridden with `--pooler-config '{"pooling_type": "MEAN", "normalize": true}'`.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loomserve.platform.json_args import json_object
from loomserve.platform.models.bert import ENCODER_SPECS, first_position
from loomserve.platform.models.registry import default_pooling_type, is_encoder_only, resolve_task
from loomserve.pooling.params import POOLING_TYPES, PoolingParams

ACTIVATIONS = ("identity", "sigmoid", "softmax", "tanh")

# sentence-transformers pooling modes this engine computes -> pooling type.
_ST_POOLING_MODES = {"cls": "CLS", "mean": "MEAN", "lasttoken": "LAST"}
_ST_LEGACY_MODE_KEYS = {"pooling_mode_cls_token": "cls", "pooling_mode_mean_tokens": "mean",
                        "pooling_mode_lasttoken": "lasttoken", "pooling_mode_max_tokens": "max",
                        "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
                        "pooling_mode_weightedmean_tokens": "weightedmean"}
# sentence-transformers modules that leave the pooled vector as the engine computes it.
_ST_KNOWN_MODULES = ("Transformer", "Pooling", "Normalize")


@dataclass
class PoolerConfig:
    """How the model's hidden states become its outputs; every field can be set with --pooler-config."""

    pooling_type: str = "LAST"
    normalize: bool = True
    dimensions: int | None = None  # default output size (matryoshka models)
    activation: bool = True  # classifiers: apply `classifier_activation` to the head's logits
    step_tag_id: int | None = None
    returned_token_ids: list[int] | None = None
    classifier_activation: str = "identity"
    is_matryoshka: bool = False  # any `dimensions` up to the hidden size gives a meaningful vector
    matryoshka_dimensions: list[int] | None = None  # the sizes it was trained for (implies is_matryoshka)
    prompts: dict[str, str] = field(default_factory=dict)  # name -> text prepended to the input
    default_prompt_name: str | None = None
    enable_chunked_processing: bool = False  # embed inputs over the context in chunks (pooling/chunked.py)
    max_embed_len: int | None = None  # with chunked processing: the longest input accepted (None: any)
    task: str | None = None  # vLLM's `--pooler-config.task`: the task to serve, as --task

    def __post_init__(self) -> None:
        self.pooling_type = self.pooling_type.upper()
        if self.pooling_type not in POOLING_TYPES:
            raise ValueError(f"pooling_type must be one of {', '.join(POOLING_TYPES)}, got {self.pooling_type!r}")
        if self.classifier_activation not in ACTIVATIONS:
            raise ValueError(f"classifier_activation must be one of {', '.join(ACTIVATIONS)}")
        if self.matryoshka_dimensions:
            self.is_matryoshka = True
        if self.max_embed_len is not None and self.max_embed_len < 1:
            raise ValueError(f"max_embed_len must be at least 1, got {self.max_embed_len}")

    def resolve(self, params: PoolingParams | None) -> PoolingParams:
        """`params` with every unset field taken from this config."""
        given = params.to_dict() if params is not None else {}
        defaults = {name: getattr(self, name) for name in
                    ("pooling_type", "normalize", "dimensions", "activation", "step_tag_id", "returned_token_ids")}
        return PoolingParams(**{**given, **{k: v for k, v in defaults.items() if given.get(k) is None}})

    def check_dimensions(self, dimensions: int | None, hidden_size: int) -> None:
        """ValueError unless the model gives meaningful vectors of `dimensions` dims."""
        if dimensions is None or dimensions == hidden_size:
            return
        if not 1 <= dimensions <= hidden_size:
            raise ValueError(f"dimensions must be between 1 and the model's {hidden_size}, got {dimensions}")
        if not self.is_matryoshka:
            raise ValueError(
                f"This model does not support matryoshka representations: its vectors have {hidden_size} "
                f"dimensions and cannot be shortened to {dimensions}"
            )
        if self.matryoshka_dimensions and dimensions not in self.matryoshka_dimensions:
            sizes = ", ".join(map(str, self.matryoshka_dimensions))
            raise ValueError(f"dimensions {dimensions} is not supported; this model supports {sizes}")

    def prompt(self, name: str | None) -> str:
        """The text prepended to inputs: the named prompt, else the checkpoint's default prompt (if any)."""
        name = name if name is not None else self.default_prompt_name
        if name is None:
            return ""
        if name not in self.prompts:
            known = ", ".join(sorted(self.prompts)) or "none"
            raise ValueError(f"unknown prompt_name {name!r}; this model's prompts: {known}")
        return self.prompts[name]


@dataclass
class PoolingSetup:
    """What the checkpoint says about pooling, for EngineArgs.create_engine_config."""

    task: str
    encoder_only: bool  # bidirectional attention: whole prompts in one step, no KV cache, no prefix cache
    pooler_config: PoolerConfig
    max_model_len: int | None  # a tighter context than max_position_embeddings, if the checkpoint sets one


def resolve_pooling(model: str, hf_config: Any, task: str = "auto", override: str | dict | None = None) -> PoolingSetup:
    override = json_object(override, "--pooler-config", '{"pooling_type": "MEAN"}') if override else {}
    task = _task(task, override.get("task"))
    architecture = (getattr(hf_config, "architectures", None) or ["?"])[0]
    folder = _local_folder(model)
    st = _SentenceTransformerFiles.read(folder) if folder is not None else None
    task = resolve_task(architecture, task, has_pooling=st is not None and st.pooling_type is not None)
    encoder_only = is_encoder_only(architecture)
    config = _default_config(task, default_pooling_type(architecture) or ("CLS" if encoder_only else "LAST"),
                             hf_config, st)
    if override:
        config = _apply_override(config, override)
    limits = [st.max_seq_length] if st is not None and st.max_seq_length else []
    offset = first_position(hf_config) if hf_config.model_type in ENCODER_SPECS else 0
    if offset:  # RoBERTa positions start after the padding index, which costs padding_idx + 1 learned positions
        limits.append(hf_config.max_position_embeddings - offset)
    return PoolingSetup(task, encoder_only, config, min(limits) if limits else None)


def _default_config(
    task: str, pooling_type: str, hf_config: Any, st: _SentenceTransformerFiles | None
) -> PoolerConfig:
    num_labels = getattr(hf_config, "num_labels", 1) if task == "classify" else 1
    config = PoolerConfig(
        pooling_type=pooling_type,
        normalize=task != "classify",
        classifier_activation="sigmoid" if num_labels == 1 else "softmax",
        is_matryoshka=bool(getattr(hf_config, "is_matryoshka", False)),
        matryoshka_dimensions=getattr(hf_config, "matryoshka_dimensions", None),
    )
    legacy = getattr(hf_config, "sbert_ce_default_activation_function", None) or (
        (getattr(hf_config, "sentence_transformers", None) or {}).get("activation_fn"))
    if legacy:
        config.classifier_activation = _activation_name(legacy)
    if st is None:
        return config
    if st.pooling_type is not None:
        config.pooling_type = st.pooling_type
        config.normalize = st.normalize
    if st.activation_fn:
        config.classifier_activation = _activation_name(st.activation_fn)
    config.prompts = st.prompts
    config.default_prompt_name = st.default_prompt_name
    return config


def _task(task: str, pooler_task: str | None) -> str:
    """--task, or --pooler-config's `task` (they must agree when both are given)."""
    if pooler_task is None or pooler_task == task:
        return task
    if task != "auto":
        raise ValueError(f"--task {task} and --pooler-config's task {pooler_task} disagree: give one of them")
    return pooler_task


def _apply_override(config: PoolerConfig, override: dict) -> PoolerConfig:
    known = {f.name for f in dataclasses.fields(PoolerConfig)}
    unknown = sorted(set(override) - known)
    if unknown:
        raise ValueError(f"unknown --pooler-config keys: {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    return PoolerConfig(**{**dataclasses.asdict(config), **override})


def _activation_name(path: str) -> str:
    """'torch.nn.modules.activation.Sigmoid' -> 'sigmoid'."""
    name = path.rsplit(".", 1)[-1].lower()
    if name not in ACTIVATIONS:
        raise ValueError(f"the checkpoint's activation function {path!r} is not supported ({', '.join(ACTIVATIONS)})")
    return name


def _local_folder(model: str) -> Path | None:
    if os.path.isdir(model):
        return Path(model)
    try:  # a hub id: its small json files, from the local hub cache or a download
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(model, allow_patterns=["*.json"]))
    except Exception:  # no hub access: the defaults then come from config.json alone
        return None


@dataclass
class _SentenceTransformerFiles:
    pooling_type: str | None = None  # None: no Pooling module
    normalize: bool = False
    prompts: dict[str, str] = field(default_factory=dict)
    default_prompt_name: str | None = None
    activation_fn: str | None = None
    max_seq_length: int | None = None

    @classmethod
    def read(cls, folder: Path) -> _SentenceTransformerFiles | None:
        modules = _read_json(folder / "modules.json")
        if modules is None:
            return None
        st = cls()
        for module in modules:
            kind = module["type"].rsplit(".", 1)[-1]
            if kind not in _ST_KNOWN_MODULES:
                raise ValueError(f"the sentence-transformers module {module['type']} is not supported")
            if kind == "Transformer" and module.get("path", "") not in ("", "."):
                raise ValueError(f"serve the Transformer module's folder {folder / module['path']} instead")
            if kind == "Pooling":
                st.pooling_type = _pooling_type(_read_json(folder / module["path"] / "config.json") or {})
            st.normalize = st.normalize or kind == "Normalize"
        settings = _read_json(folder / "config_sentence_transformers.json") or {}
        st.prompts = dict(settings.get("prompts") or {})
        st.default_prompt_name = settings.get("default_prompt_name")
        st.activation_fn = settings.get("activation_fn")
        st.max_seq_length = (_read_json(folder / "sentence_bert_config.json") or {}).get("max_seq_length")
        return st


def _pooling_type(config: dict[str, Any]) -> str:
    if config.get("include_prompt") is False:
        raise ValueError("sentence-transformers pooling with include_prompt=false is not supported")
    mode = config.get("pooling_mode")
    if isinstance(mode, list) and len(mode) == 1:
        mode = mode[0]
    if mode is None:
        modes = [name for key, name in _ST_LEGACY_MODE_KEYS.items() if config.get(key)]
        if len(modes) != 1:
            raise ValueError(f"the Pooling module combines modes {modes}; one of cls, mean, lasttoken is supported")
        mode = modes[0]
    if mode not in _ST_POOLING_MODES:
        raise ValueError(f"pooling mode {mode!r} is not supported; supported: {', '.join(_ST_POOLING_MODES)}")
    return _ST_POOLING_MODES[mode]


def _read_json(path: Path) -> Any:
    if not path.is_file():
        return None
    with open(path) as f:
        return json.load(f)
