"""`loomserve serve [MODEL]` (also `python -m loomserve`): the command line, vLLM's flag names.

Every sub-command registers itself in SUBCOMMANDS (a function adding its parser). A user's mistake ends as one line
on stderr and a non-zero exit, never a traceback (those show with --log-level debug); Ctrl-C and SIGTERM end the
process quietly at any stage.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from collections.abc import Callable
from typing import NoReturn

from loomserve import __version__
from loomserve.api.api_servers import add_api_server_flags
from loomserve.api.engine_flags import add_engine_flags, engine_args_from, expand_dotted_flags
from loomserve.api.frontend_flags import add_frontend_flags
from loomserve.api.limits import add_limit_flags
from loomserve.api.lora_paths import add_lora_path_flags
from loomserve.api.server_features import add_server_feature_flags
from loomserve.platform.logs import configure_logging, debugging

logger = logging.getLogger("loomserve")

EXIT_USER_ERROR = 1
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as a shell reports Ctrl-C
EXIT_TERMINATED = 143  # 128 + SIGTERM

__all__ = ["engine_args_from", "main", "make_parser"]


class Parser(argparse.ArgumentParser):
    """argparse, with a bad flag reported in one line (and where to read more) instead of usage plus error."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")

    def parse_known_args(self, args: list[str] | None = None,
                         namespace: argparse.Namespace | None = None) -> tuple[argparse.Namespace, list[str]]:
        """argparse's, reading vLLM's dotted JSON flags (`--pooler-config.task embed`) first."""
        return super().parse_known_args(expand_dotted_flags(list(sys.argv[1:] if args is None else args)), namespace)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Defaults shown after each flag's help, as `vllm serve --help` does (not where the help already says it,
    nor an empty default)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        default = action.default
        empty = default is None or default is False or default == [] or default == "" or default is argparse.SUPPRESS
        if empty or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def add_serve(commands: argparse._SubParsersAction) -> None:
    serve_parser = commands.add_parser(
        "serve", help="serve a model over OpenAI-compatible HTTP", formatter_class=HelpFormatter,
        description="Serve MODEL (a checkpoint folder, hub id or GGUF file; none: a demo) over OpenAI-compatible HTTP.")
    add_engine_flags(serve_parser)
    add_frontend_flags(serve_parser)
    add_limit_flags(serve_parser)
    add_lora_path_flags(serve_parser)
    add_server_feature_flags(serve_parser)
    add_api_server_flags(serve_parser)
    serve_parser.set_defaults(run=_serve)


def add_proxy(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser("proxy", help="one endpoint in front of disaggregated prefill/decode instances",
                            formatter_class=HelpFormatter)
    p.add_argument("--prefill", nargs="+", required=True, metavar="URL", help="prefill instances (kv_producer)")
    p.add_argument("--decode", nargs="+", required=True, metavar="URL", help="decode instances (kv_consumer)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on")
    p.add_argument("--port", type=int, default=8000, help="TCP port to listen on")
    p.add_argument("--uvicorn-log-level", default="info",
                   choices=["critical", "error", "warning", "info", "debug", "trace"], help="uvicorn's log level")
    p.set_defaults(run=_proxy)


SUBCOMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [add_serve, add_proxy]


def make_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="loomserve", description="loomserve: an LLM serving engine.")
    parser.add_argument("--version", action="version", version=f"loomserve {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    for add in SUBCOMMANDS:
        add(commands)
    return parser


def _serve(ns: argparse.Namespace) -> None:
    from loomserve.api.launch import serve  # uvicorn and the app load only to serve

    serve(ns)


def _proxy(ns: argparse.Namespace) -> None:
    import uvicorn

    from loomserve.api.proxy import build_proxy_app

    logger.info("Proxying http://%s:%d: prefill %s, decode %s", ns.host, ns.port, ns.prefill, ns.decode)
    uvicorn.run(build_proxy_app(ns.prefill, ns.decode), host=ns.host, port=ns.port, log_level=ns.uvicorn_log_level)


def main(argv: list[str] | None = None) -> None:
    ns = make_parser().parse_args(argv)
    if getattr(ns, "log_level", None):
        os.environ["LOOMSERVE_LOGGING_LEVEL"] = ns.log_level  # the engine processes read it too
    previous = signal.signal(signal.SIGTERM, _terminated)
    try:
        configure_logging()
        ns.run(ns)
    except KeyboardInterrupt:
        sys.exit(EXIT_INTERRUPTED)
    except _Terminated:
        sys.exit(EXIT_TERMINATED)
    except Exception as exc:
        _fail(exc)
    finally:
        signal.signal(signal.SIGTERM, previous)


class _Terminated(BaseException):
    """SIGTERM while starting: unwinds like Ctrl-C (uvicorn takes SIGTERM over once it serves)."""


def _terminated(signum: int, frame: object) -> None:
    raise _Terminated()


def _fail(exc: Exception) -> NoReturn:
    from loomserve.api.served_models import one_line

    if debugging():
        logger.exception("loomserve stopped")
    hint = "" if debugging() else " (--log-level debug shows the traceback)"
    sys.stderr.write(f"loomserve: error: {one_line(exc)}{hint}\n")
    sys.exit(EXIT_USER_ERROR)


if __name__ == "__main__":
    main()
