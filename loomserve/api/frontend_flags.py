"""The HTTP front end's flags (vLLM's "Frontend" group and logging), checked as they are parsed, and the options
they make for the app (FrontendOptions)."""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass, field

from loomserve.api.chat_flags import ChatOptions, add_chat_flags, chat_options
from loomserve.api.server_features import ServerFeatures, api_keys_from, server_features
from loomserve.platform.config.checkpoint import looks_like_hub_id
from loomserve.platform.logs import LEVELS


@dataclass
class FrontendOptions:
    """What the app needs beyond its models."""

    api_keys: list[str] = field(default_factory=list)  # any of them opens the API routes; none: no check
    lora_modules: list[tuple[str, str]] = field(default_factory=list)  # (name, path) adapters loaded at start-up
    allowed_origins: list[str] = field(default_factory=lambda: ["*"])  # CORS, as vLLM's defaults
    allowed_methods: list[str] = field(default_factory=lambda: ["*"])
    allowed_headers: list[str] = field(default_factory=lambda: ["*"])
    allow_credentials: bool = False
    root_path: str = ""  # the path prefix a proxy serves the app under
    enable_offline_docs: bool = False  # /docs from assets served here, not from a CDN
    log_stats: bool = True  # the periodic stats line
    ready_message: str = ""  # logged once every model is ready and the socket listens
    metrics_compat: list[str] = field(default_factory=list)  # also emit /metrics under these servers' prefixes
    chat: ChatOptions = field(default_factory=ChatOptions)  # content format, tool-call and reasoning parsers
    features: ServerFeatures = field(default_factory=ServerFeatures)


def add_frontend_flags(parser: argparse.ArgumentParser) -> None:
    http = parser.add_argument_group("Frontend")
    http.add_argument("--host", default="127.0.0.1", help="address to listen on")
    http.add_argument("--port", type=port_number, default=8000, help="TCP port to listen on")
    http.add_argument("--uds", default=None, help="listen on this Unix domain socket instead of --host/--port")
    http.add_argument("--api-key", nargs="+", default=None, metavar="KEY",
                      help="require `Authorization: Bearer <key>` (any of the keys) on the API routes; default: the "
                           "LOOMSERVE_API_KEY environment variable")
    http.add_argument("--lora-modules", nargs="+", default=[], type=lora_module, metavar="NAME=PATH",
                      help='adapters to serve from the start: name=path or {"name": ..., "path": ...}')
    http.add_argument("--embedding-model", action="append", default=[], type=extra_model, metavar="NAME=PATH",
                      help="also serve an embedding model (/v1/embeddings, /v1/score, /rerank) as NAME; repeatable")
    http.add_argument("--rerank-model", action="append", default=[], type=extra_model, metavar="NAME=PATH",
                      help="also serve a cross-encoder (/v1/score, /rerank, /classify) as NAME; repeatable")
    http.add_argument("--chat-template", type=chat_template, default=None,
                      help="a Jinja chat template (a file, or the template itself) replacing the tokenizer's")
    add_chat_flags(http)
    http.add_argument("--allowed-origins", type=json_list, default=["*"], help="CORS origins, a JSON list")
    http.add_argument("--allowed-methods", type=json_list, default=["*"], help="CORS methods, a JSON list")
    http.add_argument("--allowed-headers", type=json_list, default=["*"], help="CORS headers, a JSON list")
    http.add_argument("--allow-credentials", action="store_true", help="CORS: allow credentials")
    http.add_argument("--ssl-keyfile", type=existing_file, default=None, help="TLS private key file (serve HTTPS)")
    http.add_argument("--ssl-certfile", type=existing_file, default=None, help="TLS certificate file")
    http.add_argument("--ssl-ca-certs", type=existing_file, default=None, help="CA certificates to verify clients")
    http.add_argument("--root-path", default="", help="the path prefix a proxy serves the app under")
    http.add_argument("--enable-offline-docs", action="store_true",
                      help="serve /docs from assets installed here instead of a CDN (for hosts without internet)")
    http.add_argument("--uvicorn-log-level", default="info",
                      choices=["critical", "error", "warning", "info", "debug", "trace"], help="uvicorn's log level")
    logs = parser.add_argument_group("Observability")
    logs.add_argument("--log-level", choices=LEVELS, default=None,
                      help="loomserve's log level (default: LOOMSERVE_LOGGING_LEVEL or info); debug also shows "
                           "tracebacks of errors; LOOMSERVE_LOGGING_CONFIG_PATH names a logging dictConfig JSON file")
    logs.add_argument("--disable-log-stats", action="store_true",
                      help="no periodic stats line (every LOOMSERVE_LOG_STATS_INTERVAL seconds, default 10)")
    logs.add_argument("--metrics-compat", nargs="+", choices=["vllm"], default=[], metavar="SERVER",
                      help="also emit every /metrics series under this server's prefix (vllm: `vllm:`), so its "
                           "Grafana dashboards and alerts work unchanged")
    logs.add_argument("--enable-log-requests", action="store_true", help="log each request as it arrives")


def frontend_options(ns: argparse.Namespace) -> FrontendOptions:
    return FrontendOptions(
        api_keys=api_keys_from(ns.api_key), lora_modules=list(ns.lora_modules), allowed_origins=ns.allowed_origins,
        allowed_methods=ns.allowed_methods, allowed_headers=ns.allowed_headers,
        allow_credentials=ns.allow_credentials, root_path=ns.root_path, enable_offline_docs=ns.enable_offline_docs,
        log_stats=not ns.disable_log_stats, metrics_compat=list(ns.metrics_compat), chat=chat_options(ns),
        features=server_features(ns),
    )


def port_number(value: str) -> int:
    port = int(value)
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"a port is 0-65535, got {value}")
    return port


def existing_file(value: str) -> str:
    if not os.path.isfile(value):
        raise argparse.ArgumentTypeError(f"no such file: {value}")
    return value


def json_list(value: str) -> list[str]:
    try:
        items = json.loads(value)
    except json.JSONDecodeError:
        raise argparse.ArgumentTypeError(f'expected a JSON list, e.g. \'["https://example.com"]\', got {value!r}') \
            from None
    if not isinstance(items, list) or not all(isinstance(item, str) for item in items):
        raise argparse.ArgumentTypeError(f"expected a JSON list of strings, got {value!r}")
    return items


def chat_template(value: str) -> str:
    """A template file's text, or the template given inline (vLLM's rule: it has Jinja braces)."""
    if os.path.isfile(value):
        with open(value) as f:
            return f.read()
    if "{" in value:
        return value
    raise argparse.ArgumentTypeError(f"no chat template file at {value!r} (an inline template has Jinja {{ }})")


def lora_module(value: str) -> tuple[str, str]:
    """`name=path` or vLLM's JSON form `{"name": ..., "path": ...}` -> (name, path); the path must be a folder
    here (adapters are read from local folders)."""
    if value.lstrip().startswith("{"):
        try:
            spec = json.loads(value)
            name, path = spec["name"], spec["path"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise argparse.ArgumentTypeError(f'expected {{"name": ..., "path": ...}}, got {value!r}') from e
    else:
        name, sep, path = value.partition("=")
        if not (sep and name and path):
            raise argparse.ArgumentTypeError(f"expected name=path, got {value!r}")
    if not os.path.isdir(path):
        raise argparse.ArgumentTypeError(f"no adapter folder at {path!r} (for {name!r})")
    if not os.path.isfile(os.path.join(path, "adapter_config.json")):
        raise argparse.ArgumentTypeError(f"{path!r} has no adapter_config.json: not a PEFT adapter folder")
    return name, path


def extra_model(value: str) -> str:
    """`NAME=PATH` or `PATH` of --embedding-model / --rerank-model; the path must be a folder here (or a hub id)."""
    path = value.rpartition("=")[2]
    if not os.path.isdir(path) and not looks_like_hub_id(path):
        raise argparse.ArgumentTypeError(f"no model folder at {path!r}")
    return value
