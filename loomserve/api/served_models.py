"""The models one server serves, each its own engine (own process, own memory budget), addressed by `model`.

`loomserve serve CHAT --embedding-model NAME=PATH --rerank-model NAME=PATH` serves a generative model plus
pooling models; a request names its model in `model` (absent: the first model that serves the route). LoRA
adapters (`--enable-lora`) ride on the main model: `model` may also name one of them.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from contextlib import AbstractContextManager
from typing import Annotated

from fastapi import Depends, Request

from loomserve.api.admission import Admission, Hold
from loomserve.api.errors import APIError
from loomserve.api.limits import ServerLimits
from loomserve.api.lora_paths import LoRAPathPolicy
from loomserve.platform.async_llm import AsyncLLM, StatLogger
from loomserve.platform.config import EngineArgs
from loomserve.platform.engine_group import EngineLink

logger = logging.getLogger("loomserve")

_TASK_NOUNS = {"generate": "a generative model", "embed": "an embedding model", "classify": "a cross-encoder"}


def served_name(args: EngineArgs) -> str:
    return args.served_model_names()[0]


def check_unique_names(all_args: Sequence[EngineArgs]) -> None:
    names = [name for args in all_args for name in args.served_model_names()]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ValueError(f"several models are served as {', '.join(repeated)}: give each a NAME=PATH of its own")


class EngineStartError(RuntimeError):
    """An engine that did not start: its model's name and why, in one line (the full story at debug level)."""


def start_engines(all_args: Sequence[EngineArgs], stat_loggers: Sequence[list[StatLogger]],
                  log_requests: bool = False, links: Sequence[EngineLink] | None = None) -> list[AsyncLLM]:
    """Start every engine at once (each loads its model in its own process, each in a thread of its own that does
    not hold up the process's exit on Ctrl-C), or join the engines of `links` (one per model, started by another
    process); all or none."""
    results: list[AsyncLLM | BaseException | None] = [None] * len(all_args)

    def start(i: int) -> None:
        if links is None:
            logger.info("Loading %s from %s", served_name(all_args[i]), all_args[i].model)
        try:
            link = links[i] if links is not None else None
            results[i] = AsyncLLM(all_args[i], stat_loggers[i], log_requests=log_requests, link=link)
        except BaseException as exc:
            results[i] = exc

    threads = [threading.Thread(target=start, args=(i,), daemon=True) for i in range(len(all_args))]
    for thread in threads:
        thread.start()
    for thread in threads:
        while thread.is_alive():  # a timed join lets Ctrl-C through
            thread.join(0.2)
    failed = [(args, r) for args, r in zip(all_args, results) if isinstance(r, BaseException)]
    if failed:
        for engine in results:
            if isinstance(engine, AsyncLLM):
                engine.shutdown()
        args, exc = failed[0]
        logger.debug("%s did not start", served_name(args), exc_info=exc)
        raise EngineStartError(f"{served_name(args)} did not start: {one_line(exc)}") from exc
    return list(results)


def one_line(exc: BaseException) -> str:
    """An error as one line: its message's last line (a traceback's is the exception itself)."""
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    return lines[-1] if lines else type(exc).__name__


class ServedModels:
    def __init__(self, engines: Sequence[AsyncLLM], limits: ServerLimits, admissions: dict[str, Admission],
                 lora_paths: LoRAPathPolicy) -> None:
        self.engines = {engine.model_config.served_model_name: engine for engine in engines}
        self.aliases = {alias: engine for engine in engines for alias in engine.model_config.served_model_aliases}
        self.main = engines[0]
        self.limits = limits
        self.admissions = admissions  # served name -> its admission control
        self.lora_paths = lora_paths

    def admit(self, engine: AsyncLLM, count: int) -> AbstractContextManager[Hold]:
        """Hold `count` engine requests of `engine` for the block; 429 when its queue is full."""
        return self.admissions[engine.model_config.served_model_name].hold(count)

    def get(self, model: str | None) -> AsyncLLM:
        """The engine serving `model`, a model or one of its LoRA adapters (absent: the main model); 404 for a name
        not served here."""
        if model is None:
            return self.main
        engine = self.engines.get(model) or self.aliases.get(model) or next(
            (engine for engine in self.engines.values() if engine.loras.get(model) is not None), None
        )
        if engine is None:
            raise APIError(f"The model `{model}` does not exist.", status=404, param="model")
        return engine

    def for_route(self, model: str | None, route: str, tasks: tuple[str, ...]) -> AsyncLLM:
        """The engine of `model` if its task is one of `tasks` (absent: the first model that is); else 400 (404 for
        an unknown name), naming the models that can serve the route."""
        able = [name for name, engine in self.engines.items() if engine.model_config.task in tasks]
        if model is None and able:
            return self.engines[able[0]]
        engine = self.get(model) if model is not None else self.main
        if engine.model_config.task in tasks:
            return engine
        which = f"; models here that can: {', '.join(able)}" if able else "; no model served here can"
        raise APIError(
            f"The model `{model or engine.model_config.served_model_name}` does not support {route}: it is "
            f"{_TASK_NOUNS[engine.model_config.task]}{which}",
            param="model",
        )

    async def for_generation(self, model: str | None, route: str) -> AsyncLLM:
        """`for_route` for a generative route. An API process that joined the engines looks an unknown name up again
        after asking them for their adapter table: another API process may have just loaded it, its table not here
        yet. Known names cost nothing more."""
        try:
            return self.for_route(model, route, ("generate",))
        except APIError as exc:
            if exc.status != 404 or not (self.main.joined and self.main.loras.enabled):
                raise
        await self.main.refresh_loras()
        return self.for_route(model, route, ("generate",))

    async def add_lora(self, lora_name: str, lora_path: str, replace: bool = False) -> None:
        """Serve a LoRA adapter of the main model as `lora_name` (`replace`: instead of the one of that name);
        ValueError saying why it cannot be served (NoAdapterError: no adapter the server may read at the path)."""
        if self.engines.get(lora_name, self.main) is not self.main:
            raise ValueError(f"{lora_name!r} is the name of another model served here; choose another lora_name")
        if self.main.loras.enabled:  # else the engine says adapters are off, whatever the path
            self.lora_paths.check(lora_path)
        await self.main.add_lora(lora_name, lora_path, replace)

    async def join_adapters(self) -> None:
        """In an API process that joined engines another started: serve the adapters already loaded (through
        another API process, or --lora-modules)."""
        if self.main.joined and self.main.loras.enabled:
            await self.main.refresh_loras()

    async def check_health(self) -> None:
        for engine in self.engines.values():
            await engine.check_health()

    def check_heartbeats(self) -> None:
        """503 naming the first engine silent for longer than --engine-heartbeat-timeout (frozen, or stuck)."""
        timeout = self.limits.engine_heartbeat_timeout
        for name, engine in self.engines.items():
            silent = engine.silent_for()
            if silent > timeout:
                raise APIError(f"The engine of {name} has not answered for {silent:.1f} s", status=503)

    def shutdown(self) -> None:
        for engine in self.engines.values():
            engine.shutdown()


async def _served_models(request: Request) -> ServedModels:  # async: no worker-thread hop per request
    return request.app.state.models


Models = Annotated[ServedModels, Depends(_served_models)]  # a route's parameter: the server's models
