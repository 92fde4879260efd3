"""Stored /v1/responses (`--enable-responses-store`, vLLM's VLLM_ENABLE_RESPONSES_API_STORE): each response under
its id with the chat conversation it answered, for GET, `previous_response_id` and the cancel of a background
response, which runs as a task of its own. The store lives in the API process's memory, bounded by count: the
oldest response goes first."""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from loomserve.api.errors import APIError
from loomserve.api.protocol_responses import ResponseObject

CAPACITY = 4096  # responses kept
DISABLED = ("this server stores no responses: start it with --enable-responses-store (vLLM: "
            "VLLM_ENABLE_RESPONSES_API_STORE=1), or send the whole conversation in `input`")


@dataclass
class StoredResponse:
    response: ResponseObject
    messages: list[dict[str, Any]]  # the conversation it answered, without its instructions
    task: asyncio.Task | None = None  # the generation of a background response still running


@dataclass
class ResponseStore:
    capacity: int = CAPACITY
    entries: OrderedDict[str, StoredResponse] = field(default_factory=OrderedDict)

    def put(self, response: ResponseObject, messages: list[dict[str, Any]], task: asyncio.Task | None = None) -> None:
        self.entries[response.id] = StoredResponse(response, messages, task)
        self.entries.move_to_end(response.id)
        while len(self.entries) > self.capacity:
            self.entries.popitem(last=False)

    def update(self, response: ResponseObject) -> None:
        """A background response's new state; dropped if it was evicted or cancelled meanwhile."""
        entry = self.entries.get(response.id)
        if entry is not None and entry.response.status != "cancelled":
            entry.response = response
            entry.task = None

    def get(self, response_id: str) -> StoredResponse:
        """404 for an id this server does not hold (never stored, or evicted)."""
        entry = self.entries.get(response_id)
        if entry is None:
            raise APIError(f"Response with id '{response_id}' not found.", status=404, param="response_id")
        return entry

    def history(self, response_id: str) -> list[dict[str, Any]]:
        """The conversation that continues from a response: what it answered, then its output as the assistant's
        turn (a message's text, a function call's call)."""
        entry = self.get(response_id)
        turns = list(entry.messages)
        for item in entry.response.output:
            if item.type == "message":
                turns.append({"role": "assistant", "content": "".join(part.text for part in item.content)})
            else:
                call = {"id": item.call_id, "type": "function",
                        "function": {"name": item.name, "arguments": item.arguments}}
                turns.append({"role": "assistant", "content": None, "tool_calls": [call]})
        return turns

    def cancel(self, response_id: str) -> ResponseObject:
        """Stop a background response still queued or running; 400 for any other (vLLM's answer)."""
        entry = self.get(response_id)
        if entry.response.status not in ("queued", "in_progress"):
            raise APIError("Cannot cancel a synchronous response.", param="response_id")
        entry.response = entry.response.model_copy(update={"status": "cancelled"})
        if entry.task is not None:
            entry.task.cancel()  # closing the engine stream aborts the request
            entry.task = None
        return entry.response
