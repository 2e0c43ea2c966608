"""Test chat: streams a reply through this server's own proxy routes over HTTP, with the
credential the user typed, so it takes the same path (auth, keys, limits, usage) as any client."""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator
from typing import Any

import gradio as gr
import httpx

from ui.common import (
    UIContext,
    auth_headers,
    credential_name,
    describe_error,
    error_message,
    esc,
    forwarded_headers,
    http_client,
    is_chat_model,
    parse_body,
    preferred_model,
    service_path,
)

ERROR_MARK = "⚠️ "
PROXY_ERROR_HEADER = "x-proxy-error"  # ERRORS_AS_CHAT marks the proxy's own refusals so
MODEL_MARK = "\n\n<sub>answered by "  # the footer naming the model; never sent back upstream
CHAT_CONCURRENCY = 16
STREAM_TIMEOUT = httpx.Timeout(connect=10.0, read=300.0, write=30.0, pool=10.0)
ANTHROPIC_MAX_TOKENS = 1024


# ---------------------------------------------------------------- history -> OpenAI messages


def _file_name(file: Any) -> str:
    if isinstance(file, dict):
        name = file.get("orig_name") or file.get("path") or file.get("url") or "file"
    else:
        name = getattr(file, "orig_name", None) or getattr(file, "path", None) or "file"
    return str(name).replace("\\", "/").rsplit("/", 1)[-1]


def content_text(content: Any) -> str:
    """Flatten Gradio message content (string, part dicts, file dicts, lists) to plain text."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, (list, tuple)):
        return "\n".join(t for t in (content_text(part) for part in content) if t)
    if isinstance(content, dict):
        kind = content.get("type")
        if kind == "text" or (kind is None and "text" in content):
            return str(content.get("text") or "")
        if kind == "file" or "file" in content:
            return f"[attached file: {_file_name(content.get('file') or content)}]"
        if "path" in content or "url" in content:
            return f"[attached file: {_file_name(content)}]"
        if kind == "component":
            return f"[{content.get('component', 'attachment')}]"
        return ""
    if hasattr(content, "path"):  # FileData-like objects
        return f"[attached file: {_file_name(content)}]"
    return f"[{type(content).__name__}]"


def _field(message: Any, name: str) -> Any:
    return message.get(name) if isinstance(message, dict) else getattr(message, name, None)


def normalise_history(history: list[Any] | None, message: Any = None) -> list[dict[str, str]]:
    """OpenAI chat messages from Gradio history (plus the new user message, if given): text only,
    our error notes, model footers and "thought" boxes dropped, and a user turn that got no
    reply dropped too (it would otherwise ride along inside the next request)."""
    turns = list(history or [])
    if message is not None:
        turns.append({"role": "user", "content": message})
    entries: list[tuple[str, str]] = []
    for turn in turns:
        role = _field(turn, "role")
        if role not in ("user", "assistant", "system"):
            continue
        metadata = _field(turn, "metadata") or {}
        if isinstance(metadata, dict) and metadata.get("title"):
            continue
        text = content_text(_field(turn, "content"))
        if role == "assistant":
            text = text.split(MODEL_MARK, 1)[0]
            if ERROR_MARK + "**" in text:  # every note of ours starts so
                text = text.split(ERROR_MARK + "**", 1)[0]
            text = text.rstrip()
        entries.append((role, text))
    messages: list[dict[str, str]] = []
    for role, text in entries:
        if not text.strip():
            if role == "assistant" and messages and messages[-1]["role"] == "user":
                messages.pop()  # that turn got only an error note: it was never answered
            continue
        if messages and messages[-1]["role"] == role:
            messages[-1]["content"] += "\n\n" + text
        else:
            messages.append({"role": role, "content": text})
    return messages


# ---------------------------------------------------------------- models and routing


# Which service listed a model (the first that did), learnt by fetch_models: the same for every
# visitor, since it follows from the configuration.
LISTED_BY: dict[str, str] = {}


def service_for_model(model: str, services: tuple[str, ...]) -> str:
    """Claude models go to the Anthropic door and Gemini models to Google AI's (both OpenAI format);
    a model another service listed goes there; everything else to OpenAI."""
    if "anthropic" in services and model.lower().startswith("claude"):
        return "anthropic"
    if "google-ai" in services and model.lower().startswith(("gemini", "gemma")):
        return "google-ai"
    if LISTED_BY.get(model) in services:
        return LISTED_BY[model]
    if "openai" in services or not services:
        return "openai"
    return services[0]


def model_ids(data: Any) -> list[str]:
    """Chat model ids from an OpenAI- or Anthropic-style `/models` reply (no embeddings, images,
    audio: the test chat cannot use them)."""
    items = data.get("data") if isinstance(data, dict) else None
    ids = {str(m["id"]) for m in items or [] if isinstance(m, dict) and m.get("id")}
    return sorted(m for m in ids if is_chat_model(m))


def pick_model(models: list[str], current: str | None) -> str | None:
    """Keep the visitor's choice if it is offered; else a sensible chat model; else nothing."""
    if current and current in models:
        return current
    return preferred_model(models)


async def fetch_models(ctx: UIContext, credential: str, request: Any = None) -> tuple[list[str], str]:
    """All models the proxy offers to this credential, and a short escaped note."""
    found: list[str] = []
    problems: list[str] = []
    for service in ctx.services:
        url = ctx.self_url.rstrip("/") + service_path(service) + "/models"
        headers = {**forwarded_headers(ctx, request), **auth_headers(credential, x_api_key=service == "anthropic")}
        try:
            async with http_client(ctx, 15.0) as client:
                response = await client.get(url, headers=headers)
            status, data = response.status_code, parse_body(response.content)
        except httpx.HTTPError as exc:
            status, data = 0, type(exc).__name__
        if 200 <= status < 300:
            for model in model_ids(data):
                if model not in found:
                    found.append(model)
                    if len(LISTED_BY) < 10_000:
                        LISTED_BY.setdefault(model, service)
        else:
            problems.append(describe_error(status, data))
    problems = list(dict.fromkeys(problems))
    if found:
        note = f"{len(found)} models available." + (" Not listed: " + " ".join(problems) if problems else "")
        return found, note
    if not ctx.services:
        return [], "No provider is configured."
    return [], "Could not list models: " + " ".join(problems)


# ---------------------------------------------------------------- streaming


async def sse_data(lines: AsyncIterator[str]) -> AsyncIterator[str]:
    """The `data:` payload of each server-sent event (multi-line data joined by newlines)."""
    buffer: list[str] = []
    async for line in lines:
        if line == "":
            if buffer:
                yield "\n".join(buffer)
                buffer = []
            continue
        if line.startswith("data:"):
            value = line[5:]
            buffer.append(value[1:] if value.startswith(" ") else value)
    if buffer:
        yield "\n".join(buffer)


def chunk_text(chunk: Any) -> str:
    if not isinstance(chunk, dict):
        return ""
    text = ""
    for choice in chunk.get("choices") or []:
        delta = (choice or {}).get("delta") or (choice or {}).get("message") or {}
        content = delta.get("content") if isinstance(delta, dict) else None
        if isinstance(content, str):
            text += content
    return text


def error_note(status: int, data: Any, auth_mode: str = "none") -> str:
    note = ERROR_MARK + "**" + describe_error(status, data) + "**"
    if status == 401 and auth_mode != "none":
        note += f"\n\nEnter your {credential_name(auth_mode)} in the box above the chat."
    return note


def refusal_text(response: httpx.Response) -> str:
    """The error text of an ERRORS_AS_CHAT reply (a completion, whole or streamed)."""
    raw = response.content
    if "text/event-stream" in response.headers.get("content-type", ""):
        for line in raw.decode("utf-8", "replace").splitlines():
            if line.startswith("data:") and line[5:].strip() != "[DONE]":
                try:
                    chunk = json.loads(line[5:])
                except ValueError:
                    continue
                text = chunk_text(chunk) or ((chunk.get("delta") or {}).get("text") if isinstance(chunk, dict) else "")
                if text:
                    return _REFUSAL_PREFIX.sub("", str(text))
        return "refused by the proxy"
    return _REFUSAL_PREFIX.sub("", chunk_text(parse_body(raw)) or "refused by the proxy")


_REFUSAL_PREFIX = re.compile(r"^⚠️ Proxy error \(\d+\): ")


def footer(model: Any) -> str:
    """A small line under a reply naming the model that wrote it (as the upstream reported it)."""
    return MODEL_MARK + esc(str(model)[:200]) + "</sub>" if model else ""


def chat_request(model: str, messages: list[dict[str, str]], service: str) -> dict[str, Any]:
    body: dict[str, Any] = {"model": model, "messages": messages, "stream": True}
    if service == "anthropic":
        body["max_tokens"] = ANTHROPIC_MAX_TOKENS
    return body


def make_respond(ctx: UIContext):
    """The ChatInterface function: an async generator yielding the reply so far."""

    async def respond(
        message: str,
        history: list,
        model: str | None,
        credential: str | None,
        request: gr.Request | None = None,
    ):
        model = (model or "").strip()
        if not model:
            yield ERROR_MARK + "**Pick a model first** (press ↻ to load the list)."
            return
        if ctx.auth_mode != "none" and not (credential or "").strip():
            yield ERROR_MARK + f"**Enter your {credential_name(ctx.auth_mode)} first.**"
            return
        service = service_for_model(model, ctx.services)
        messages = normalise_history(history, message)
        url = ctx.self_url.rstrip("/") + service_path(service) + "/chat/completions"
        headers = {**forwarded_headers(ctx, request), **auth_headers(credential, x_api_key=service == "anthropic")}
        reply = ""
        answered_by = ""
        try:
            async with (
                http_client(ctx, STREAM_TIMEOUT) as client,
                client.stream("POST", url, json=chat_request(model, messages, service), headers=headers) as response,
            ):
                if response.status_code >= 400:
                    body = parse_body(await response.aread())
                    yield error_note(response.status_code, body, ctx.auth_mode)
                    return
                if response.headers.get(PROXY_ERROR_HEADER):  # ERRORS_AS_CHAT: a refusal, not a reply
                    await response.aread()
                    status = int(response.headers[PROXY_ERROR_HEADER].split()[0] or 0)
                    yield error_note(status, refusal_text(response), ctx.auth_mode)
                    return
                if "text/event-stream" not in response.headers.get("content-type", ""):
                    body = parse_body(await response.aread())
                    text = chunk_text(body)
                    yield text + footer(body.get("model") if isinstance(body, dict) else "") if text else error_note(
                        502, body
                    )
                    return
                async for data in sse_data(response.aiter_lines()):
                    if data.strip() == "[DONE]":
                        break
                    try:
                        chunk = json.loads(data)
                    except ValueError:
                        continue
                    if isinstance(chunk, dict) and chunk.get("error"):
                        yield (
                            (reply + "\n\n" if reply else "")
                            + ERROR_MARK
                            + "**Stopped by an error:** "
                            + esc(error_message(chunk))
                        )
                        return
                    if isinstance(chunk, dict) and isinstance(chunk.get("model"), str):
                        answered_by = chunk["model"]
                    piece = chunk_text(chunk)
                    if piece:
                        reply += piece
                        yield reply
        except httpx.HTTPError as exc:
            yield (reply + "\n\n" if reply else "") + error_note(0, type(exc).__name__)
            return
        if not reply:
            yield ERROR_MARK + "**The model returned an empty reply.**"
        elif answered_by:
            yield reply + footer(answered_by)

    return respond


class _ChatInterface(gr.ChatInterface):
    """Gradio's ChatInterface, except that sending a message keeps the input's placeholder
    (Gradio 6.31 blanks it on submit and never puts it back)."""

    def _clear_and_save_textbox(self, message):  # type: ignore[override]
        return type(self.textbox)("", interactive=False), message


class ChatPanel:
    def __init__(self, ctx: UIContext) -> None:
        self.ctx = ctx
        with gr.Row(elem_classes=["form-row"]):
            self.model = gr.Dropdown(
                choices=[],
                value=None,
                label="Model",
                allow_custom_value=True,
                scale=3,
                elem_id="chat-model",
            )
            self.credential = gr.Textbox(
                label=credential_name(ctx.auth_mode).capitalize(),
                type="password",
                value="",
                placeholder=f"paste your {credential_name(ctx.auth_mode)}",
                visible=ctx.auth_mode != "none",
                scale=3,
                elem_id="chat-credential",
            )
            self.refresh = gr.Button("↻ Models", scale=1, min_width=120, elem_id="chat-refresh-models")
        self.note = gr.Markdown("", elem_classes=["muted"], elem_id="chat-note")
        self.fetched = gr.State("")  # the credential the model list was last loaded with (server only)
        self.typed_len = gr.State(0)
        _ChatInterface(
            make_respond(ctx),
            additional_inputs=[self.model, self.credential],
            chatbot=gr.Chatbot(height=460, show_label=False, elem_id="chat-box", feedback_options=None),
            textbox=gr.Textbox(
                placeholder="Type a message…",
                show_label=False,
                scale=7,
                submit_btn=True,
                stop_btn=True,
                elem_id="chat-input",
            ),
            concurrency_limit=CHAT_CONCURRENCY,
            api_visibility="private",
            fill_height=False,
            save_history=False,
        )

    async def refresh_models(self, credential: str | None, current: str | None, request: gr.Request | None = None):
        if self.ctx.auth_mode != "none" and not (credential or "").strip():
            model, note = await self.initial_models(current, request)
            return model, note, ""
        models, note = await fetch_models(self.ctx, credential or "", request)
        if not models:  # a wrong credential: say so, and keep the list and the model picked
            return gr.skip(), note, (credential or "").strip()
        return gr.Dropdown(choices=models, value=pick_model(models, current)), note, (credential or "").strip()

    async def credential_entered(
        self, credential: str | None, current: str | None, fetched: str, request: gr.Request | None = None
    ):
        """Leaving the box, or pasting into it: load the models once for that credential. (Not on
        every keystroke: each wrong credential counts as a guess towards the address's lockout.)"""
        if (credential or "").strip() == fetched or not (credential or "").strip():
            return gr.skip(), gr.skip(), gr.skip()
        return await self.refresh_models(credential, current, request)

    async def credential_typed(
        self, credential: str | None, current: str | None, fetched: str, typed: int, request: gr.Request | None = None
    ):
        """On each change: a jump of more than one character is a paste, so the models load at once."""
        length = len(credential or "")
        if abs(length - (typed or 0)) <= 1:
            return gr.skip(), gr.skip(), gr.skip(), length
        return (*await self.credential_entered(credential, current, fetched, request), length)

    async def initial_models(self, current: str | None, request: gr.Request | None = None):
        """On page load: with no credential needed, the real list; otherwise ask for the credential."""
        if self.ctx.auth_mode == "none":
            models, note = await fetch_models(self.ctx, "", request)
            return gr.Dropdown(choices=models, value=pick_model(models, current)), note
        note = f"Enter your {credential_name(self.ctx.auth_mode)}: the models load as soon as it is in (or press ↻)."
        return gr.Dropdown(choices=[], value=current or None), note

    def wire(self, demo: gr.Blocks) -> None:
        common = dict(api_visibility="private")
        outputs = [self.model, self.note, self.fetched]
        refresh = dict(
            fn=self.refresh_models, inputs=[self.credential, self.model], outputs=outputs, concurrency_limit=8
        )
        self.refresh.click(**refresh, **common, show_progress="minimal")
        self.credential.submit(**refresh, **common, show_progress="minimal")
        entered = [self.credential, self.model, self.fetched]
        self.credential.blur(
            self.credential_entered,
            inputs=entered,
            outputs=outputs,
            concurrency_limit=8,
            show_progress="minimal",
            **common,
        )
        self.credential.change(  # not `input`: that misses values set without key presses
            self.credential_typed,
            inputs=[*entered, self.typed_len],
            outputs=[*outputs, self.typed_len],
            concurrency_limit=8,
            show_progress="minimal",
            trigger_mode="always_last",
            **common,
        )
        demo.load(
            self.initial_models,
            inputs=[self.model],
            outputs=[self.model, self.note],
            concurrency_limit=None,
            show_progress="hidden",
            **common,
        )
