"""Limits on the shape of a request body: what no real chat needs, refused with a clear 400.

Every check here is linear and cheap, and the pipeline runs them in order of cost: `precheck` on
the raw bytes before they are parsed, `check_counts` on the parsed body before the rate limit
and quota (it looks at list lengths only), `check_depth` (a walk of the whole body) after them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from proxy.errors import Kind, ProxyError

# Model ids are short ("claude-sonnet-4-5-20250929"); a longer name is no model, and every model
# name is used as a key (families, key lists), so it is refused before any lookup.
MAX_MODEL_NAME = 256
# Endpoints whose body holds a conversation: its turns are "messages" (chat, Claude's messages
# and count_tokens) or "input" items (Responses).
_CHAT_KINDS = frozenset({"chat", "messages", "count_tokens", "responses"})
# Gemini's native endpoints: the turns are `contents`, each with `parts`.
_GEMINI_KINDS = frozenset({"generate", "count_tokens"})


@dataclass(frozen=True, slots=True)
class RequestLimits:
    max_messages: int = 10_000
    max_content_parts: int = 1_000
    max_tools: int = 512
    max_json_depth: int = 100

    def precheck(self, raw: bytes, kind: str) -> None:
        """Before parsing: a body with more message objects than allowed is refused unread.

        In valid JSON the bytes `"role":` occur only as an object key (inside a string the quotes
        are escaped), so their count is at most the number of objects with a "role" key: messages.
        Spellings it misses (escapes, a space before the colon) are caught by `check_counts`."""
        if kind in _CHAT_KINDS:
            roles = raw.count(b'"role":')
            if roles > self.max_messages:
                raise self._too_many(f"more than {self.max_messages} messages", self.max_messages, "MAX_MESSAGES")

    def check_counts(self, payload: dict, kind: str) -> None:
        """Messages, content parts per message and tools: list lengths only."""
        if kind in _GEMINI_KINDS and ("contents" in payload or "generateContentRequest" in payload):
            self._check_gemini(payload)
            return
        messages = payload.get("input" if kind == "responses" else "messages")
        if kind in _CHAT_KINDS and isinstance(messages, list):
            if len(messages) > self.max_messages:
                raise self._too_many(f"{len(messages)} messages", self.max_messages, "MAX_MESSAGES")
            for i, message in enumerate(messages):
                content = message.get("content") if isinstance(message, dict) else None
                if isinstance(content, list) and len(content) > self.max_content_parts:
                    raise self._too_many(
                        f"{len(content)} content parts in messages[{i}]", self.max_content_parts, "MAX_CONTENT_PARTS"
                    )
        system = payload.get("system")
        if isinstance(system, list) and len(system) > self.max_content_parts:
            raise self._too_many(f"{len(system)} parts in 'system'", self.max_content_parts, "MAX_CONTENT_PARTS")
        tools = payload.get("tools")
        if isinstance(tools, list) and len(tools) > self.max_tools:
            raise self._too_many(f"{len(tools)} tools", self.max_tools, "MAX_TOOLS")

    def _check_gemini(self, payload: dict) -> None:
        """Gemini's native body: `contents` are the turns, each with `parts`; `systemInstruction`
        has parts; tools hold `functionDeclarations` (countTokens may wrap it all in
        `generateContentRequest`)."""
        inner = payload.get("generateContentRequest")
        for body in (payload, inner) if isinstance(inner, dict) else (payload,):
            contents = body.get("contents")
            if isinstance(contents, list):
                if len(contents) > self.max_messages:
                    raise self._too_many(f"{len(contents)} contents", self.max_messages, "MAX_MESSAGES")
                for i, content in enumerate(contents):
                    parts = content.get("parts") if isinstance(content, dict) else None
                    if isinstance(parts, list) and len(parts) > self.max_content_parts:
                        raise self._too_many(
                            f"{len(parts)} parts in contents[{i}]", self.max_content_parts, "MAX_CONTENT_PARTS"
                        )
            system = body.get("systemInstruction") or body.get("system_instruction")
            parts = system.get("parts") if isinstance(system, dict) else None
            if isinstance(parts, list) and len(parts) > self.max_content_parts:
                raise self._too_many(
                    f"{len(parts)} parts in 'systemInstruction'", self.max_content_parts, "MAX_CONTENT_PARTS"
                )
            tools = body.get("tools")
            if isinstance(tools, list):
                count = len(tools) + sum(len(_declarations(tool)) for tool in tools)
                if count > self.max_tools:
                    raise self._too_many(f"{count} tools and function declarations", self.max_tools, "MAX_TOOLS")

    def check_depth(self, payload: Any) -> None:
        """Objects and lists nested deeper than max_json_depth (a walk level by level, no recursion)."""
        level = [payload]
        depth = 0
        containers = (dict, list)
        while level:
            depth += 1
            if depth > self.max_json_depth:
                raise ProxyError(
                    400,
                    f"The request body is nested more than {self.max_json_depth} levels deep; this proxy "
                    f"accepts at most {self.max_json_depth} (MAX_JSON_DEPTH).",
                    Kind.INVALID_REQUEST,
                    code="request_too_deep",
                )
            below: list = []
            for item in level:
                values = item.values() if type(item) is dict else item
                below.extend([v for v in values if isinstance(v, containers)])
            level = below

    @staticmethod
    def _too_many(what: str, limit: int, setting: str) -> ProxyError:
        return ProxyError(
            400,
            f"This request has {what}; this proxy accepts at most {limit} ({setting}).",
            Kind.INVALID_REQUEST,
            code="request_too_large",
        )


def check_model(model: object) -> str:
    """The request's model name: a non-empty string of at most MAX_MODEL_NAME characters."""
    if not isinstance(model, str) or not model.strip():
        raise ProxyError(400, "The request body needs a 'model' (a string).", Kind.INVALID_REQUEST)
    if len(model) > MAX_MODEL_NAME:
        raise ProxyError(
            400,
            f"The model name is {len(model)} characters long; model names have at most {MAX_MODEL_NAME}.",
            Kind.INVALID_REQUEST,
        )
    return model


def _declarations(tool: object) -> list:
    """The function declarations of one Gemini tool ([] when it has none)."""
    if not isinstance(tool, dict):
        return []
    found = tool.get("functionDeclarations") or tool.get("function_declarations")
    return found if isinstance(found, list) else []
