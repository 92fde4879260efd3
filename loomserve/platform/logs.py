"""Logging set-up shared by the API process and the engine processes it starts: a dictConfig JSON file named by
LOOMSERVE_LOGGING_CONFIG_PATH (as vLLM's VLLM_LOGGING_CONFIG_PATH), else LOOMSERVE_LOGGING_LEVEL (default INFO) in
one line format. The environment carries both to the engine processes."""

from __future__ import annotations

import json
import logging
import logging.config
import os

LEVELS = ("debug", "info", "warning", "error", "critical")


def configure_logging(where: str = "") -> None:
    """Configure the root logger for this process; `where` tags its lines (e.g. "[engine]")."""
    path = os.environ.get("LOOMSERVE_LOGGING_CONFIG_PATH")
    if path:
        with open(path) as f:
            logging.config.dictConfig(json.load(f))
        return
    tag = f" {where}" if where else ""
    logging.basicConfig(level=logging_level(), format=f"%(asctime)s %(levelname)s{tag} %(name)s: %(message)s")


def logging_level() -> str:
    level = os.environ.get("LOOMSERVE_LOGGING_LEVEL", "info").lower()
    if level not in LEVELS:
        raise ValueError(f"LOOMSERVE_LOGGING_LEVEL={level!r}: choose {', '.join(LEVELS)}")
    return level.upper()


def debugging() -> bool:
    """Whether loomserve logs at debug level (tracebacks of user errors are shown then)."""
    return logging_level() == "DEBUG" or logging.getLogger("loomserve").isEnabledFor(logging.DEBUG)
