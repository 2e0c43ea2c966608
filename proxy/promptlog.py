"""Prompt logging (PROMPT_LOGGING=true): prompts and replies written to a private Hugging Face
dataset as JSONL files, in batches every PROMPT_LOGGING_INTERVAL seconds and at shutdown.

Off by default; when on, /status and the page tell every visitor. Records pass through the
Redactor like everything else the proxy writes: a provider key inside a prompt is not copied."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
import time
import uuid
from typing import Any

from huggingface_hub import HfApi

from proxy.config import Settings
from proxy.errors import Redactor

log = logging.getLogger("proxy.prompts")

NOTICE = "Prompts and replies sent through this proxy are logged by its owner."
MAX_BUFFERED = 5_000  # records waiting for the next upload; beyond it the oldest are dropped (and counted)
MAX_CAPTURE_BYTES = 2_000_000  # of one streamed reply
LOGGED_KINDS = frozenset({"chat", "messages", "completions", "responses", "generate"})
HUB_ENDPOINT: str | None = None  # the Hub's address; tests point it at a fake Hub


class PromptLog:
    def __init__(
        self, repo_id: str, token: str, interval: float, redactor: Redactor, endpoint: str | None = None
    ) -> None:
        self.repo_id = repo_id
        self.interval = interval
        self.redact = redactor
        self._api = HfApi(endpoint=endpoint, token=token, library_name="oai-reverse-proxy")
        self._buffer: list[dict] = []
        self._lock = threading.Lock()
        self._repo_ready = False
        self.uploaded = 0
        self.dropped = 0
        self.last_error: str | None = None

    @classmethod
    def from_settings(cls, settings: Settings) -> PromptLog | None:
        if not settings.prompt_logging:
            return None
        return cls(
            settings.prompt_logging_repo,
            settings.hf_token,
            settings.prompt_logging_interval,
            Redactor(settings.secrets),
            endpoint=HUB_ENDPOINT,
        )

    def add(self, record: dict) -> None:
        with self._lock:
            self._buffer.append(record)
            if len(self._buffer) > MAX_BUFFERED:
                del self._buffer[0]
                self.dropped += 1

    def flush(self) -> int:
        """Upload what is buffered as one JSONL file; returns how many records went. Blocking."""
        with self._lock:
            batch, self._buffer = self._buffer, []
        if not batch:
            return 0
        lines = "".join(json.dumps(self.redact.scrub(r), ensure_ascii=False) + "\n" for r in batch)
        path = time.strftime("prompts/%Y/%m/%d/%H%M%S-", time.gmtime()) + uuid.uuid4().hex[:8] + ".jsonl"
        try:
            if not self._repo_ready:
                self._api.create_repo(self.repo_id, repo_type="dataset", private=True, exist_ok=True)
                self._repo_ready = True
            self._api.upload_file(
                path_or_fileobj=lines.encode("utf-8"),
                path_in_repo=path,
                repo_id=self.repo_id,
                repo_type="dataset",
                commit_message=f"Log {len(batch)} prompts",
            )
        except Exception as exc:
            with self._lock:  # keep them for the next attempt, oldest first, within the bound
                self._buffer[:0] = batch
                overflow = len(self._buffer) - MAX_BUFFERED
                if overflow > 0:
                    del self._buffer[:overflow]
                    self.dropped += overflow
            self.last_error = self.redact(f"{type(exc).__name__}: {str(exc)[:200]}")
            log.error("prompt log: upload to %s failed: %s", self.repo_id, self.last_error)
            return 0
        self.uploaded += len(batch)
        self.last_error = None
        return len(batch)

    async def run(self, stop: asyncio.Event) -> None:
        """Flush every `interval` seconds, and once more when `stop` is set."""
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=self.interval)
            await asyncio.to_thread(self.flush)


class StreamCapture:
    """Collects the text of a relayed stream (OpenAI or Anthropic events), bounded in size."""

    def __init__(self) -> None:
        self._chunks: list[bytes] = []
        self._size = 0

    def feed(self, chunk: bytes) -> None:
        if self._size < MAX_CAPTURE_BYTES:
            self._chunks.append(chunk)
            self._size += len(chunk)

    def text(self) -> str:
        parts: list[str] = []
        for line in b"".join(self._chunks).decode("utf-8", "replace").splitlines():
            if not line.startswith("data:"):
                continue
            try:
                event = json.loads(line[5:].strip())
            except ValueError:
                continue
            parts.append(_delta_text(event))
        return "".join(parts)


def _gemini_text(body: dict) -> str | None:
    """Gemini: candidates[0].content.parts[].text (a whole reply or one stream event)."""
    candidates = body.get("candidates")
    if not isinstance(candidates, list) or not candidates or not isinstance(candidates[0], dict):
        return None
    content = candidates[0].get("content")
    parts = content.get("parts") if isinstance(content, dict) else None
    return "".join(p["text"] for p in parts or () if isinstance(p, dict) and isinstance(p.get("text"), str))


def _delta_text(event: Any) -> str:
    if not isinstance(event, dict):
        return ""
    gemini = _gemini_text(event)
    if gemini is not None:
        return gemini
    delta = event.get("delta")
    if isinstance(delta, dict) and isinstance(delta.get("text"), str):  # Anthropic content_block_delta
        return delta["text"]
    if event.get("type") == "response.output_text.delta" and isinstance(delta, str):  # Responses API
        return delta
    choices = event.get("choices")
    if isinstance(choices, list) and choices and isinstance(choices[0], dict):
        choice = choices[0]
        inner = choice.get("delta")
        if isinstance(inner, dict) and isinstance(inner.get("content"), str):
            return inner["content"]
        if isinstance(choice.get("text"), str):  # legacy completions
            return choice["text"]
    return ""


def reply_text(body: Any) -> str:
    """The text of a non-streamed OpenAI or Anthropic reply."""
    if not isinstance(body, dict):
        return ""
    gemini = _gemini_text(body)
    if gemini is not None:
        return gemini
    output = body.get("output")
    if isinstance(output, list):  # Responses API: message items holding output_text parts
        return "".join(
            part["text"]
            for item in output
            if isinstance(item, dict) and isinstance(item.get("content"), list)
            for part in item["content"]
            if isinstance(part, dict) and part.get("type") == "output_text" and isinstance(part.get("text"), str)
        )
    content = body.get("content")
    if isinstance(content, list):  # Anthropic
        return "".join(p.get("text", "") for p in content if isinstance(p, dict) and isinstance(p.get("text"), str))
    choices = body.get("choices")
    if isinstance(choices, list) and choices and isinstance(choices[0], dict):
        message = choices[0].get("message")
        if isinstance(message, dict) and isinstance(message.get("content"), str):
            return message["content"]
        if isinstance(choices[0].get("text"), str):
            return choices[0]["text"]
    return ""
