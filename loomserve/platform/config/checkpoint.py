"""Where a checkpoint's files are: a local folder as given, or a Hugging Face hub id fetched once into the hub cache
(`--revision`, `--download-dir`), so everything downstream reads a folder. A name that is neither is refused here,
before anything loads, with what to do about it."""

from __future__ import annotations

import logging
import os
import re

logger = logging.getLogger(__name__)

# What serving reads: configs, safetensors weights, tokenizer and chat-template files (not .bin/.pt/onnx copies).
CHECKPOINT_FILES = ["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja", "*.tiktoken"]
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+|[A-Za-z0-9][\w.-]*")


def looks_like_hub_id(name: str) -> bool:
    """`org/name` or `name`, not a path: no leading `/`, `.` or `~`, at most one `/`."""
    return bool(_HUB_ID.fullmatch(name)) and not name.startswith((".", "~"))


def locate_checkpoint(model: str, revision: str | None = None, download_dir: str | None = None,
                      files: list[str] | None = None) -> str:
    """The local folder of `model`: itself if it is a folder (or a `.gguf` file), else the hub cache's copy of the
    hub id (`files`, default CHECKPOINT_FILES; downloaded when not cached and the hub is not offline). ValueError, in
    one line, for a path that is not there, a hub id the cache lacks while offline, or a download that fails."""
    if os.path.isdir(model) or (os.path.isfile(model) and model.endswith(".gguf")):
        return model
    if not looks_like_hub_id(model):
        raise ValueError(f"no checkpoint folder at {model!r} (and it is not a Hugging Face hub id)")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    fetch = {"revision": revision, "cache_dir": download_dir, "allow_patterns": files or CHECKPOINT_FILES}
    try:
        return snapshot_download(model, local_files_only=True, **fetch)
    except LocalEntryNotFoundError:
        pass
    if _hub_offline():
        raise ValueError(f"{model!r} is not a local folder and not in the Hugging Face cache, and HF_HUB_OFFLINE is "
                         "set: give a checkpoint folder, or download it first (unset HF_HUB_OFFLINE)")
    logger.info("Downloading %s from the Hugging Face hub", model)
    try:
        return snapshot_download(model, **fetch)
    except Exception as exc:  # network, auth, missing repo or revision: all one line to the user
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(f"cannot fetch {model!r} from the Hugging Face hub ({reason}); give a local checkpoint "
                         "folder, or check the name, --revision and the network") from exc


def _hub_offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)
