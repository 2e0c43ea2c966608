"""Anthropic Messages SSE events -> OpenAI ``chat.completion.chunk`` objects."""

from __future__ import annotations

from typing import Any

from proxy.providers.anthropic.translate.reasoning import JSON_TOOL
from proxy.providers.anthropic.translate.response import completion_id, finish_reason, openai_usage

__all__ = ["AnthropicToOpenAIStream", "UpstreamStreamError"]

Chunk = dict[str, Any]


class UpstreamStreamError(Exception):
    """Anthropic sent an ``error`` event mid-stream; the caller reports it to the client."""

    def __init__(self, message: str, *, error_type: str = "api_error") -> None:
        super().__init__(message)
        self.message = message
        self.error_type = error_type

    def to_anthropic_body(self) -> dict[str, Any]:
        """The error as an Anthropic error body (input for ``anthropic_error_to_openai``)."""
        return {
            "type": "error",
            "error": {"type": self.error_type, "message": self.message},
        }


class AnthropicToOpenAIStream:
    """Feeds on Anthropic SSE events, yields OpenAI chat.completion.chunk dicts.

    One instance per response. Thinking streams as ``delta.reasoning_content``; each thinking
    block, once complete with its signature (and each redacted one), comes as
    ``delta.thinking_blocks`` for the client to send back. The response_format tool's JSON
    streams as content. Citation deltas and server-tool blocks are dropped; the caller writes
    ``data: [DONE]`` after the last chunk.
    """

    def __init__(self, *, model: str, created: int, include_usage: bool) -> None:
        self._model = model
        self._created = created
        self._include_usage = include_usage
        self._id = completion_id(None)
        self._started = False
        self._finished = False
        self._done = False
        self._usage: dict[str, Any] = {}
        self._tool_index: dict[
            int, int
        ] = {}  # Anthropic block index -> OpenAI tool call index
        self._json_blocks: set[int] = set()  # blocks of the response_format tool: content
        self._thinking: dict[int, dict[str, str]] = {}  # open thinking blocks by index

    @property
    def usage(self) -> tuple[int, int]:
        """(input_tokens, output_tokens) seen so far; input includes cached prompt tokens."""
        converted = openai_usage(self._usage)
        return converted["prompt_tokens"], converted["completion_tokens"]

    @property
    def done(self) -> bool:
        """Whether ``message_stop`` has been seen."""
        return self._done

    def feed(self, event: str, data: dict) -> list[dict]:
        """Translate one SSE event (name may be ``""``: then ``data["type"]`` names it)."""
        kind = event or data.get("type") or ""
        if kind == "error":
            error = data.get("error") or {}
            raise UpstreamStreamError(
                error.get("message") or "The upstream stream failed.",
                error_type=error.get("type") or "api_error",
            )
        if kind == "message_start":
            message = data.get("message") or {}
            self._id = completion_id(message.get("id"))
            self._update_usage(message.get("usage"))
            return self._start()
        handler = _HANDLERS.get(kind)
        if handler is None:  # ping, content_block_stop and future event types
            return []
        return self._start() + handler(self, data)

    # -- event handlers -------------------------------------------------------

    def _on_block_start(self, data: dict) -> list[Chunk]:
        block = data.get("content_block") or {}
        if block.get("type") == "text" and block.get("text"):
            return [self._chunk({"content": block["text"]})]
        if block.get("type") == "thinking":
            self._thinking[data.get("index", -1)] = {"thinking": "", "signature": ""}
            return []
        if block.get("type") == "redacted_thinking":
            redacted = {"type": "redacted_thinking", "data": block.get("data") or ""}
            return [self._chunk({"thinking_blocks": [redacted]})]
        if block.get("type") == "tool_use" and block.get("name") == JSON_TOOL:
            self._json_blocks.add(data.get("index", -1))
            return []
        if block.get("type") != "tool_use":
            return []
        tool_index = len(self._tool_index)
        self._tool_index[data.get("index", tool_index)] = tool_index
        call = {
            "index": tool_index,
            "id": block.get("id") or "",
            "type": "function",
            "function": {"name": block.get("name") or "", "arguments": ""},
        }
        return [self._chunk({"tool_calls": [call]})]

    def _on_block_delta(self, data: dict) -> list[Chunk]:
        delta = data.get("delta") or {}
        if delta.get("type") == "text_delta" and delta.get("text"):
            return [self._chunk({"content": delta["text"]})]
        open_thinking = self._thinking.get(data.get("index", -1))
        if open_thinking is not None and delta.get("type") in ("thinking_delta", "signature_delta"):
            field = "thinking" if delta["type"] == "thinking_delta" else "signature"
            piece = delta.get(field) or ""
            open_thinking[field] += piece
            return [self._chunk({"reasoning_content": piece})] if field == "thinking" and piece else []
        if data.get("index", -1) in self._json_blocks:
            piece = delta.get("partial_json") if delta.get("type") == "input_json_delta" else None
            return [self._chunk({"content": piece})] if piece else []
        if delta.get("type") == "input_json_delta" and delta.get("partial_json"):
            tool_index = self._tool_index.get(data.get("index", -1))
            if tool_index is None:
                return []
            call = {
                "index": tool_index,
                "function": {"arguments": delta["partial_json"]},
            }
            return [self._chunk({"tool_calls": [call]})]
        return []

    def _on_block_stop(self, data: dict) -> list[Chunk]:
        block = self._thinking.pop(data.get("index", -1), None)
        if block is None:
            return []
        return [self._chunk({"thinking_blocks": [{"type": "thinking", **block}]})]

    def _on_message_delta(self, data: dict) -> list[Chunk]:
        self._update_usage(data.get("usage"))
        stop_reason = (data.get("delta") or {}).get("stop_reason")
        if stop_reason == "tool_use" and self._json_blocks and not self._tool_index:
            stop_reason = "end_turn"  # only the response_format tool: an answer, not a call
        reason = finish_reason(stop_reason)
        if reason is None or self._finished:
            return []
        self._finished = True
        return [self._chunk({}, finish_reason=reason)]

    def _on_message_stop(self, data: dict) -> list[Chunk]:
        self._done = True
        chunks = [] if self._finished else [self._chunk({}, finish_reason="stop")]
        self._finished = True
        if self._include_usage:
            chunks.append(self._envelope([], usage=openai_usage(self._usage)))
        return chunks

    # -- helpers --------------------------------------------------------------

    def _start(self) -> list[Chunk]:
        """The opening role chunk, once (also if an event arrives before message_start)."""
        if self._started:
            return []
        self._started = True
        return [self._chunk({"role": "assistant", "content": ""})]

    def _update_usage(self, usage: dict | None) -> None:
        # message_delta counts are cumulative, so the latest non-null value wins.
        for key, value in (usage or {}).items():
            if isinstance(value, int) and not isinstance(value, bool):
                self._usage[key] = value
            elif key == "output_tokens_details" and isinstance(value, dict):
                self._usage[key] = value  # type: ignore[assignment]

    def _chunk(
        self, delta: dict[str, Any], *, finish_reason: str | None = None
    ) -> Chunk:
        choice = {
            "index": 0,
            "delta": delta,
            "logprobs": None,
            "finish_reason": finish_reason,
        }
        return self._envelope([choice])

    def _envelope(
        self, choices: list[dict[str, Any]], *, usage: dict | None = None
    ) -> Chunk:
        chunk: Chunk = {
            "id": self._id,
            "object": "chat.completion.chunk",
            "created": self._created,
            "model": self._model,
            "choices": choices,
        }
        if self._include_usage:
            # OpenAI sends "usage": null on every chunk but the last when usage is asked for.
            chunk["usage"] = usage
        return chunk


_HANDLERS = {
    "content_block_start": AnthropicToOpenAIStream._on_block_start,
    "content_block_delta": AnthropicToOpenAIStream._on_block_delta,
    "content_block_stop": AnthropicToOpenAIStream._on_block_stop,
    "message_delta": AnthropicToOpenAIStream._on_message_delta,
    "message_stop": AnthropicToOpenAIStream._on_message_stop,
}
