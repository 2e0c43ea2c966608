"""OpenAI's Responses API (`POST /responses`) through a key shared by several people.

Stored state: OpenAI keeps a response (and lets anyone holding the key read, continue or delete
it) when `store` is true, which is the API's default. Through a shared key that would let one
friend's conversation be read or continued by another, and fill the owner's storage. So, unless
the owner sets OPENAI_RESPONSES_STORE=true, the proxy sends `store: false` and refuses the fields
that read stored state (`previous_response_id`, `conversation`) or need it (`background`), with
a message saying how to continue a conversation statelessly (send the history in `input`, with
`include: ["reasoning.encrypted_content"]`, as Codex CLI does). Reading or deleting a response
and listing its input items (`GET`/`DELETE /responses/{id}`, `/input_items`) are never on the
allow-list, whatever the setting.
"""

from __future__ import annotations

from typing import Any

from proxy import sse
from proxy.errors import Kind, ProxyError
from proxy.providers.base import StreamMeter, token_count
from proxy.sse import Event
from proxy.usage import Usage

STATEFUL_FIELDS = ("previous_response_id", "conversation", "background")
TERMINAL = frozenset({"response.completed", "response.incomplete", "response.failed"})
DELTAS = frozenset(
    {"response.output_text.delta", "response.refusal.delta", "response.function_call_arguments.delta",
     "response.reasoning_text.delta", "response.reasoning_summary_text.delta",
     "response.custom_tool_call_input.delta"}
)  # fmt: skip


def enforce_store_policy(payload: dict, allow_store: bool) -> None:
    """Force `store: false` and refuse stateful fields, unless the owner allows stored responses."""
    if allow_store:
        return
    for name in STATEFUL_FIELDS:
        if payload.get(name) not in (None, False, ""):
            raise ProxyError(
                400,
                f"'{name}' is not available through this proxy: its key is shared, so responses are not "
                "stored upstream (store is forced to false). Send the whole conversation in 'input' instead "
                "(with include: [\"reasoning.encrypted_content\"] to carry reasoning across turns).",
                Kind.INVALID_REQUEST,
            )
    payload["store"] = False


def responses_usage(usage: Any) -> Usage | None:
    """Usage of a Responses reply: input/output tokens with cached and reasoning details."""
    if not isinstance(usage, dict):
        return None
    in_details = usage.get("input_tokens_details")
    out_details = usage.get("output_tokens_details")
    return Usage(
        token_count(usage.get("input_tokens")),
        token_count(usage.get("output_tokens")),
        cached=token_count(in_details.get("cached_tokens")) if isinstance(in_details, dict) else 0,
        reasoning=token_count(out_details.get("reasoning_tokens")) if isinstance(out_details, dict) else 0,
    )


class ResponsesStreamMeter(StreamMeter):
    """Reads usage from the terminal event (`response.completed`, `.incomplete` or `.failed`)."""

    def __init__(self) -> None:
        super().__init__()
        self.sequence = 0

    def accept(self, event: Event) -> bool:
        name, data = event.event, None
        if not name and '"response.' in event.data:  # a compatible server that names events in data only
            data = event.json()
            name = str(data.get("type") or "") if isinstance(data, dict) else ""
        if name in DELTAS:
            data = data if data is not None else event.json()
            if isinstance(data, dict) and isinstance(data.get("delta"), str):
                self.text_chars += len(data["delta"])
                self.sequence = _sequence(data, self.sequence)
            return True
        if name in TERMINAL:
            data = data if data is not None else event.json()
            response = data.get("response") if isinstance(data, dict) else None
            usage = responses_usage(response.get("usage")) if isinstance(response, dict) else None
            if usage is not None:
                self.usage, self.seen_usage = usage, True
            self.finished = True
        return True

    def stream_error(self, message: str) -> bytes:
        """The Responses API's own `error` event (the openai SDK yields it as ResponseErrorEvent)."""
        body = {"type": "error", "code": "upstream_error", "message": message, "param": None,
                "sequence_number": self.sequence + 1}  # fmt: skip
        return sse.encode(body, event="error")


def _sequence(data: dict, current: int) -> int:
    number = data.get("sequence_number")
    return number if isinstance(number, int) and number > current else current
