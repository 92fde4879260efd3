"""argparse flags from EngineArgs' fields: name, type, default, help and choices come from the field, so the CLI
keeps no second list of them."""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from typing import Any

from loomserve.platform.config import EngineArgs


def add_engine_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per EngineArgs field (`max_num_seqs` -> `--max-num-seqs`); the required `model` is positional and
    optional, None when left out."""
    hints = typing.get_type_hints(EngineArgs)
    for f in dataclasses.fields(EngineArgs):
        kwargs = {"help": f.metadata["help"], **_type_kwargs(hints[f.name]),
                  **{k: v for k, v in f.metadata.items() if k != "help"}}
        if f.default is dataclasses.MISSING:
            parser.add_argument(f.name, nargs="?", default=None, **kwargs)
        else:
            parser.add_argument("--" + f.name.replace("_", "-"), default=f.default, **kwargs)


def engine_args_from(ns: argparse.Namespace) -> EngineArgs:
    return EngineArgs(**{name: getattr(ns, name) for name in EngineArgs.field_names()})


def _type_kwargs(hint: Any) -> dict[str, Any]:
    """A field's type -> how argparse reads it. Fields that also take a dict or a memory size are read as text
    (JSON or "4GiB"), which EngineArgs parses itself."""
    kinds = set(typing.get_args(hint)) - {types.NoneType} if _is_union(hint) else {hint}
    origins = {typing.get_origin(k) or k for k in kinds}
    if list in origins:
        return {"nargs": "+"}
    if str in origins:
        return {}
    if origins == {bool}:
        return {"action": argparse.BooleanOptionalAction}
    if len(origins) == 1 and origins <= {int, float}:
        return {"type": origins.pop()}
    raise TypeError(f"no CLI flag type for an EngineArgs field of type {hint}")


def _is_union(hint: Any) -> bool:
    return typing.get_origin(hint) in (typing.Union, types.UnionType)
