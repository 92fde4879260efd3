"""From a request's `StructuredOutputsParams` to a grammar a backend can compile, checked without a tokenizer.

xgrammar reads every kind first; what it refuses (a JSON-schema feature it lacks, a Lark grammar) goes to
llguidance; what neither reads is the client's error, a ValueError naming xgrammar's reason. The front end calls
`grammar_spec` before a request is accepted (400 for a bad schema, regex or grammar); the engine compiles the same
spec against the tokenizer off the step path (`compiler.py`).
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from typing import Any

from loomserve.platform.json_args import json_object
from loomserve.platform.structured.params import StructuredOutputsParams

XGRAMMAR, GUIDANCE = "xgrammar", "guidance"


@dataclass(frozen=True)
class GrammarSpec:
    """What to compile: the backend that reads it, the kind (json, json_object, regex, grammar, structural_tag;
    a choice list becomes a grammar) and its text."""

    backend: str
    kind: str
    source: str
    any_whitespace: bool = True


def grammar_spec(params: StructuredOutputsParams) -> GrammarSpec:
    """The spec of `params`; ValueError when neither backend can read it."""
    kind, source = _kind_and_source(params)
    _require_backend()
    spec = GrammarSpec(XGRAMMAR, kind, source, not params.disable_any_whitespace)
    xgrammar_error = _xgrammar_error(spec)
    if xgrammar_error is None:
        return spec
    fallback = GrammarSpec(GUIDANCE, kind, source, spec.any_whitespace)
    if kind != "structural_tag" and not guidance_error(fallback):
        return fallback
    raise ValueError(f"invalid structured output {params.kind}: {xgrammar_error}")


def _require_backend() -> None:
    import importlib.util

    if importlib.util.find_spec("xgrammar") is None:
        raise ValueError("structured output is not available on this server: it needs xgrammar "
                         "(pip install xgrammar llguidance)")


def _kind_and_source(params: StructuredOutputsParams) -> tuple[str, str]:
    kind = params.kind
    if kind == "json":
        try:
            schema = json_object(params.json, "the schema", '{"type": "object"}')
        except ValueError as e:
            raise ValueError(f"invalid structured output json: {e}") from None
        return kind, json.dumps(schema)
    if kind == "choice":
        if not params.choice or not all(isinstance(c, str) for c in params.choice):
            raise ValueError("invalid structured output choice: give a non-empty list of strings")
        # A grammar of the literal alternatives; JSON string escapes are EBNF's.
        return "grammar", "root ::= " + " | ".join(json.dumps(c, ensure_ascii=False) for c in params.choice)
    if kind == "json_object":
        return kind, ""
    return kind, getattr(params, kind)


@functools.lru_cache(maxsize=256)  # clients send the same schema again and again (and n prompts at once)
def _xgrammar_error(spec: GrammarSpec) -> str | None:
    """Why xgrammar cannot read `spec`, or None."""
    import xgrammar as xgr

    try:
        if spec.kind == "json":
            xgr.Grammar.from_json_schema(spec.source, any_whitespace=spec.any_whitespace)
        elif spec.kind == "regex":
            xgr.Grammar.from_regex(spec.source)
        elif spec.kind == "grammar":
            xgr.Grammar.from_ebnf(spec.source)
        elif spec.kind == "structural_tag":
            xgr.Grammar.from_structural_tag(*structural_tag_args(spec.source))
    except (RuntimeError, ValueError, TypeError, xgr.InvalidJSONError, xgr.InvalidStructuralTagError) as e:
        return _short(e)
    return None


@functools.lru_cache(maxsize=256)
def guidance_error(spec: GrammarSpec) -> str:
    """Why llguidance cannot read `spec` ('' when it can)."""
    import llguidance

    try:
        return llguidance.LLMatcher.validate_grammar(guidance_grammar(spec))
    except ValueError as e:  # a grammar it cannot even convert
        return str(e) or type(e).__name__


def guidance_grammar(spec: GrammarSpec) -> str:
    import llguidance

    if spec.kind == "json_object":
        return llguidance.grammar_from("json_schema", '{"type": "object"}')
    return llguidance.grammar_from({"json": "json_schema", "grammar": "grammar"}.get(spec.kind, spec.kind), spec.source)


def structural_tag_args(source: str) -> tuple[Any, ...]:
    """xgrammar's arguments for a structural tag: vLLM's legacy {"structures": [{begin, schema, end}], "triggers"}
    becomes (tags, triggers); any other JSON is xgrammar's own structural-tag format."""
    import xgrammar as xgr

    try:
        tag = json.loads(source)
    except json.JSONDecodeError as e:
        raise ValueError(f"the structural tag is not JSON ({e})") from None
    if isinstance(tag, dict) and "structures" in tag:
        items = [xgr.StructuralTagItem(begin=s["begin"], schema=json.dumps(s.get("schema", {})), end=s["end"])
                 for s in tag["structures"]]
        return items, list(tag.get("triggers", []))
    return (source,)


def _short(error: Exception) -> str:
    """xgrammar's message without its C++ source location prefix ("[time] file.cc:line: ")."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    head, sep, tail = text.partition(".cc:")
    return tail.split(": ", 1)[-1] if sep else text
