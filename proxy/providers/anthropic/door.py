"""The OpenAI-format door to Claude: glue between the pipeline and the pure translators."""

from __future__ import annotations

import logging
import time
from collections import OrderedDict

from proxy import sse
from proxy.errors import Kind, ProxyError, openai_error
from proxy.providers.anthropic.translate import (
    AnthropicToOpenAIStream,
    TranslationError,
    UpstreamStreamError,
    anthropic_error_to_openai,
    anthropic_to_openai_response,
    openai_to_anthropic_request,
)
from proxy.providers.anthropic.translate.reasoning import switch_thinking_form
from proxy.providers.base import error_message
from proxy.sse import Event
from proxy.upstream import StreamAbort

MAX_LEARNED_MODELS = 512  # client-chosen model names: the memory is bounded
log = logging.getLogger("proxy.access")


class Door:
    def __init__(self, default_max_tokens: int) -> None:
        self.default_max_tokens = default_max_tokens
        self.thinking_forms: OrderedDict[str, str] = OrderedDict()  # model -> form Claude accepted

    def request(self, payload: dict) -> dict:
        form = self.thinking_forms.get(str(payload.get("model")))
        try:
            return openai_to_anthropic_request(
                payload, default_max_tokens=self.default_max_tokens, thinking_form=form
            )
        except TranslationError as exc:
            raise ProxyError(400, str(exc), Kind.INVALID_REQUEST) from None
        except (TypeError, AttributeError, ValueError, KeyError) as exc:
            # A field of a type the translator did not foresee: the request's fault, not ours.
            log.warning("door: untranslatable request (%s)", type(exc).__name__)
            raise ProxyError(
                400, "The request has a field of an unexpected type; check it against the OpenAI chat API.",
                Kind.INVALID_REQUEST,
            ) from None

    def revise(self, endpoint: object, payload: dict, status: int, body: object) -> bool:
        """Claude refused the thinking form (budget vs adaptive): switch it for one retry, and remember."""
        if status != 400:
            return False
        form = switch_thinking_form(payload, error_message(body))
        if form is None:
            return False
        model = str(payload.get("model"))
        self.thinking_forms[model] = form
        self.thinking_forms.move_to_end(model)
        while len(self.thinking_forms) > MAX_LEARNED_MODELS:
            self.thinking_forms.popitem(last=False)
        return True

    def response(self, body: dict) -> dict:
        """Claude's reply as an OpenAI chat.completion; a reply too broken to translate is a 502."""
        try:
            return anthropic_to_openai_response(body, created=int(time.time()))
        except (TypeError, AttributeError, ValueError, KeyError) as exc:
            log.warning("door: untranslatable reply from the upstream (%s)", type(exc).__name__)
            raise ProxyError(
                502, "The anthropic upstream sent a reply this proxy could not translate.", Kind.UPSTREAM
            ) from None

    def error(self, status: int, body: dict) -> dict:
        return anthropic_error_to_openai(status, body)

    def stream(self, payload: dict):
        """A renderer of Anthropic events into OpenAI chunks, and the OpenAI stream error writer."""
        options = payload.get("stream_options")
        include_usage = isinstance(options, dict) and bool(options.get("include_usage"))
        translator = AnthropicToOpenAIStream(
            model=str(payload.get("model")), created=int(time.time()), include_usage=include_usage
        )

        failure: list[UpstreamStreamError] = []  # Claude's own error event, once seen

        def render(events: list[Event]) -> list[bytes]:
            out: list[bytes] = []
            for event in events:
                data = event.json()
                if not isinstance(data, dict):
                    continue
                try:
                    chunks = translator.feed(event.event, data)
                except UpstreamStreamError as exc:
                    failure.append(exc)
                    raise StreamAbort(exc.message) from None
                out.extend(sse.encode(chunk) for chunk in chunks)
                if translator.done:
                    out.append(sse.encode("[DONE]"))
            return out

        def stream_error(message: str) -> bytes:
            """`message` arrives redacted; Claude's error type, if it sent one, gives type and code."""
            if not failure:
                return sse.encode(openai_error(message, Kind.UPSTREAM))
            body = anthropic_error_to_openai(500, failure[0].to_anthropic_body())
            body["error"]["message"] = message
            return sse.encode(body)

        return render, stream_error
