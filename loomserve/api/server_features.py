"""vLLM's optional server behaviours beyond the Frontend group (usage reporting, request-id headers, the
tokenizer-info and load routes, the shutdown drain), their flags and the options they make (ServerFeatures)."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass

API_KEY_ENV = "LOOMSERVE_API_KEY"  # vLLM's VLLM_API_KEY
RESPONSES_STORE_ENV = "LOOMSERVE_ENABLE_RESPONSES_API_STORE"  # vLLM's VLLM_ENABLE_RESPONSES_API_STORE


@dataclass(frozen=True)
class ServerFeatures:
    force_include_usage: bool = False  # a usage chunk ends every stream, whatever `stream_options` says
    prompt_tokens_details: bool = False  # `usage.prompt_tokens_details` (cached tokens) in answers
    request_id_headers: bool = False  # `X-Request-Id` on every response, echoed or generated
    tokenizer_info_endpoint: bool = False  # GET /tokenizer_info
    server_load_tracking: bool = False  # GET /load: requests being served now
    shutdown_timeout: float = 0.0  # seconds requests in flight may finish once asked to stop (0: abort them)
    responses_store: bool = False  # /v1/responses are kept in memory: GET, previous_response_id, background


def add_server_feature_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("vLLM server options")
    group.add_argument("--enable-force-include-usage", action="store_true",
                       help="end every stream with a usage chunk, even without stream_options.include_usage")
    group.add_argument("--enable-prompt-tokens-details", action="store_true",
                       help="report usage.prompt_tokens_details (cached prompt tokens)")
    group.add_argument("--enable-request-id-headers", action="store_true",
                       help="answer with an X-Request-Id header: the client's, or a new one")
    group.add_argument("--enable-tokenizer-info-endpoint", action="store_true",
                       help="serve GET /tokenizer_info (the tokenizer's configuration and chat template)")
    group.add_argument("--enable-server-load-tracking", action="store_true",
                       help="serve GET /load: the number of requests being served now")
    group.add_argument("--shutdown-timeout", type=non_negative_seconds, default=0.0,
                       help="on Ctrl-C / SIGTERM, seconds the requests in flight may take to finish before they are "
                            "aborted (0: abort them at once)")
    group.add_argument("--enable-responses-store", action="store_true",
                       default=os.environ.get(RESPONSES_STORE_ENV, "") not in ("", "0"),
                       help="keep /v1/responses in memory (the most recent 4096) for GET /v1/responses/{id}, "
                            f"previous_response_id and background responses; default: {RESPONSES_STORE_ENV}=1")


def server_features(ns: argparse.Namespace) -> ServerFeatures:
    return ServerFeatures(
        force_include_usage=ns.enable_force_include_usage, prompt_tokens_details=ns.enable_prompt_tokens_details,
        request_id_headers=ns.enable_request_id_headers, tokenizer_info_endpoint=ns.enable_tokenizer_info_endpoint,
        server_load_tracking=ns.enable_server_load_tracking, shutdown_timeout=ns.shutdown_timeout,
        responses_store=ns.enable_responses_store,
    )


def api_keys_from(flag: list[str] | None) -> list[str]:
    """`--api-key` (one or more keys), else the LOOMSERVE_API_KEY environment variable, else none."""
    if flag:
        return list(flag)
    key = os.environ.get(API_KEY_ENV)
    return [key] if key else []


def non_negative_seconds(value: str) -> float:
    seconds = float(value)
    if not seconds >= 0:
        raise argparse.ArgumentTypeError(f"expected seconds >= 0, got {value}")
    return seconds
