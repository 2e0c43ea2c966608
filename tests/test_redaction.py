"""No secret reaches a client or a log line, however the upstream spells it: JSON `\\u` escapes,
non-JSON stream data, nested values, dict keys, event fields, tracebacks; and log lines stay
one line each whatever a client puts in its request."""

from __future__ import annotations

import io
import json
import logging
import re
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
from aiohttp import web

from proxy.errors import Redactor
from proxy.logs import ACCESS_LINE_LIMIT, RedactingFilter, log_safe
from proxy.sse import SSEParser
from tests.conftest import PAID, PROXY_KEY, Served
from tests.fakes import FakeAnthropic, FakeOpenAI, KeyBehaviour, StreamEvent

ProxyApp = Callable[..., Served]

ODD = "gateway-7f3a9c1e5b2d4e6f"  # a configured key of no known shape: only the configured list finds it
STRANGER = "sk-proj-StrangerKey0123456789abcdef"  # not configured, but shaped like a key
CLAUDE = "sk-ant-paid-0123456789"
AUTH = {"authorization": f"Bearer {PROXY_KEY}"}
CHAT = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hello"}], "stream": True}


def escaped(text: str) -> str:
    """`text` with every character written as a JSON `\\uXXXX` escape."""
    return "".join(f"\\u{ord(c):04x}" for c in text)


def decode_escapes(text: str) -> str:
    """`text` with its `\\uXXXX` escapes decoded, as a reader (or a JSON parser) would."""
    return re.sub(r"\\u([0-9a-fA-F]{4})", lambda m: chr(int(m.group(1), 16)), text)


def spelled(template: str, key: str) -> str:
    """Fill a scripted upstream reply: {KEY} plain, {ESC} fully escaped, {ESC1} first character
    escaped, {ESC2} escaped inside a JSON string that is itself inside JSON, {STRANGER} an
    unconfigured key-shaped token, {ESC_STRANGER} that one escaped."""
    return (
        template.replace("{KEY}", key)
        .replace("{ESC2}", escaped(key).replace("\\", "\\\\"))
        .replace("{ESC}", escaped(key))
        .replace("{ESC1}", escaped(key[0]) + key[1:])
        .replace("{ESC_STRANGER}", escaped(STRANGER))
        .replace("{STRANGER}", STRANGER)
    )


def every_reading(text: str) -> str:
    """All a client could read out of a reply: the raw text, and every string and dict key of every
    JSON value in it, decoded, and decoded again when a string is itself JSON (tool arguments)."""
    found: list[str] = [text]

    def walk(value: Any) -> None:
        if isinstance(value, dict):
            for key, item in value.items():
                found.append(key)
                walk(item)
        elif isinstance(value, list):
            for item in value:
                walk(item)
        elif isinstance(value, str):
            found.append(value)
            try:
                inner = json.loads(value)
            except ValueError:
                return
            if isinstance(inner, dict | list):
                walk(inner)

    parser = SSEParser()
    events = parser.feed(text.encode()) + parser.flush()
    found += [event.event for event in events]
    candidates = [text] + [event.data for event in events]
    for candidate in candidates:
        try:
            walk(json.loads(candidate))
        except (ValueError, RecursionError):
            found.append(decode_escapes(candidate))
    return "\n".join(found)


def data_of(text: str) -> list[Any]:
    out: list[Any] = []
    for line in text.splitlines():
        if line.startswith("data: "):
            payload = line.removeprefix("data: ")
            try:
                out.append(json.loads(payload))
            except ValueError:
                out.append(payload)
    return out


# Scripted upstreams ---------------------------------------------------------------------------


class ScriptedOpenAI(FakeOpenAI):
    """Streams `script` (raw SSE text) with the key it was sent filled in (see `spelled`)."""

    script: list[str] = []

    async def _dispatch(self, request: web.Request) -> web.StreamResponse:
        key = request.headers.get("authorization", "").removeprefix("Bearer ")
        events = [StreamEvent(spelled(chunk, key).encode()) for chunk in self.script]
        return await self._stream(request, events, {})


class ScriptedAnthropic(FakeAnthropic):
    """Streams `script` (raw SSE text) with the x-api-key it was sent filled in."""

    script: list[str] = []

    async def _message(self, request: web.Request, body: dict, b: KeyBehaviour, prompt: int) -> web.StreamResponse:
        key = request.headers["x-api-key"]
        events = [StreamEvent(spelled(chunk, key).encode()) for chunk in self.script]
        return await self._stream(request, events, {})


@pytest.fixture
def scripted(proxy_app: ProxyApp) -> Iterator[Callable[[str, list[str]], Served]]:
    """scripted(key, script): the proxy over an OpenAI upstream that streams `script`."""
    fakes: list[FakeOpenAI] = []

    def start(key: str, script: list[str]) -> Served:
        fake = ScriptedOpenAI({key: KeyBehaviour()}).start()
        fake.script = script
        fakes.append(fake)
        return proxy_app(OPENAI_KEY=key, OPENAI_BASE_URL=fake.base_url, PROXY_KEY=PROXY_KEY)

    yield start
    for fake in fakes:
        fake.stop()


def stream_text(served: Served, service: str = "openai", path: str = "/chat/completions", payload: Any = None) -> str:
    with (
        httpx.Client(timeout=10, trust_env=False) as client,
        client.stream("POST", served.proxy(service) + path, json=payload or CHAT, headers=AUTH) as response,
    ):
        assert response.status_code == 200
        return "".join(response.iter_text())


def chunk(content: str) -> str:
    return 'data: {"object":"chat.completion.chunk","choices":[{"index":0,"delta":{"content":"' + content + '"}}]}\n\n'


HELLO = chunk("hi")
DONE = "data: [DONE]\n\n"

# Streams: every event is checked ---------------------------------------------------------------

STREAM_CASES = {
    "error-event-escaped": [HELLO, 'data: {"error":{"message":"key {ESC}","type":"server_error"}}\n\n'],
    "error-event-one-char-escaped": [HELLO, 'data: {"error":{"message":"key {ESC1}","type":"server_error"}}\n\n'],
    "non-json-data": [HELLO, "data: upstream failure {KEY}\n\n"],
    "non-json-data-escaped": [HELLO, "data: upstream failure {ESC}\n\n"],
    "nested-error": [HELLO, 'data: {"choices":[],"x":{"error":"key {KEY}"}}\n\n', DONE],
    "content": [chunk("your key is {KEY}"), DONE],
    "content-escaped": [chunk("your key is {ESC}"), DONE],
    "dict-key": ['data: {"{KEY}":1,"choices":[{"index":0,"delta":{"content":"x"}}]}\n\n', DONE],
    "dict-key-escaped": ['data: {"{ESC}":1,"choices":[{"index":0,"delta":{"content":"x"}}]}\n\n', DONE],
    "event-name-id-comment": ["event: {KEY}\nid: {KEY}\n: {KEY}\n" + HELLO, DONE],
    "multi-line-data": ['data: {"choices":[{"index":0,\ndata: "delta":{"content":"{ESC}"}}]}\n\n', DONE],
    "tool-arguments-escaped-twice": [
        'data: {"choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"function":'
        '{"arguments":"{\\"k\\":\\"{ESC2}\\"}"}}]}}]}\n\n',
        DONE,
    ],
    "stranger-key-escaped": [chunk("{ESC_STRANGER}"), DONE],
    "stranger-key-non-json": ["data: oops {STRANGER}\n\n"],
}


@pytest.mark.parametrize("key", [PAID, ODD], ids=["sk-key", "odd-key"])
@pytest.mark.parametrize("case", list(STREAM_CASES))
def test_no_relayed_stream_event_shows_a_key_however_it_is_spelled(
    scripted: Callable[[str, list[str]], Served], key: str, case: str
) -> None:
    served = scripted(key, STREAM_CASES[case])
    text = stream_text(served)
    readable = every_reading(text)
    for secret in (key, STRANGER):
        assert secret not in readable, readable
    assert "[redacted]" in readable
    assert text.endswith("\n\n")


def test_a_redacted_error_event_is_still_the_streams_last_word(scripted: Callable[[str, list[str]], Served]) -> None:
    served = scripted(ODD, STREAM_CASES["error-event-escaped"])
    events = data_of(stream_text(served))
    assert events[0]["choices"][0]["delta"]["content"] == "hi"
    assert events[-1] == {"error": {"message": "key [redacted]", "type": "server_error"}}
    assert len(events) == 2  # no second error event from the proxy


def test_a_stream_with_nothing_secret_is_relayed_byte_for_byte(scripted: Callable[[str, list[str]], Served]) -> None:
    script = [
        chunk("caf\\u00e9 \\u003cb\\u003e risk-adjusted task-force-2024 flask-sqlalchemy sk-learn-pipeline"),
        chunk("\\u4f60\\u597d"),
        'data: {"choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}\n\n',
        DONE,
    ]
    served = scripted(PAID, script)
    assert stream_text(served) == "".join(script)


def test_a_stream_relays_unchanged_an_escape_that_hides_no_secret(scripted: Callable[[str, list[str]], Served]) -> None:
    script = [chunk("\\u0041BC plain \\u0073kipped"), DONE]  # escapes of key characters, no key behind them
    served = scripted(PAID, script)
    assert stream_text(served) == "".join(script)


class _ScriptedClaude:
    def __init__(self, claude_pool: Callable[..., tuple[Served, FakeAnthropic]], key: str, script: list[str]) -> None:
        self.served, self.fake = claude_pool({key: KeyBehaviour()}, ScriptedAnthropic)
        self.fake.script = script  # type: ignore[attr-defined]


CLAUDE_SCRIPT = [
    'event: message_start\ndata: {"type":"message_start","message":{"id":"msg_1","type":"message",'
    '"role":"assistant","model":"claude-3-5-haiku-20241022","content":[],"stop_reason":null,'
    '"usage":{"input_tokens":3,"output_tokens":1}}}\n\n',
    'event: content_block_start\ndata: {"type":"content_block_start","index":0,'
    '"content_block":{"type":"text","text":""}}\n\n',
    'event: content_block_delta\ndata: {"type":"content_block_delta","index":0,'
    '"delta":{"type":"text_delta","text":"key {ESC} and {ESC_STRANGER}"}}\n\n',
    'event: content_block_stop\ndata: {"type":"content_block_stop","index":0}\n\n',
    'event: message_delta\ndata: {"type":"message_delta","delta":{"stop_reason":"end_turn"},'
    '"usage":{"output_tokens":5}}\n\n',
    'event: message_stop\ndata: {"type":"message_stop"}\n\n',
]


@pytest.mark.parametrize("key", [CLAUDE, ODD], ids=["sk-ant-key", "odd-key"])
def test_claude_stream_never_shows_an_escaped_key(claude_pool, key: str) -> None:
    claude = _ScriptedClaude(claude_pool, key, CLAUDE_SCRIPT)
    payload = {"model": "claude-3-5-haiku-20241022", "max_tokens": 50, "stream": True, "messages": CHAT["messages"]}
    text = stream_text(claude.served, "anthropic", "/messages", payload)
    readable = every_reading(text)
    assert key not in readable and STRANGER not in readable
    assert "key [redacted] and [redacted]" in readable
    assert "message_stop" in text


@pytest.mark.parametrize("key", [CLAUDE, ODD], ids=["sk-ant-key", "odd-key"])
def test_the_openai_door_to_claude_never_shows_an_escaped_key(claude_pool, key: str) -> None:
    claude = _ScriptedClaude(claude_pool, key, CLAUDE_SCRIPT)
    payload = {**CHAT, "model": "claude-3-5-haiku-20241022"}
    text = stream_text(claude.served, "anthropic", "/chat/completions", payload)
    readable = every_reading(text)
    assert key not in readable and STRANGER not in readable
    assert "key [redacted] and [redacted]" in readable
    assert data_of(text)[-1] == "[DONE]"


# Non-streamed replies and relayed headers (the pipeline's `redact.body` / `redact.headers`) ------


@pytest.mark.parametrize("key", [PAID, ODD], ids=["sk-key", "odd-key"])
def test_a_non_streamed_reply_never_shows_a_key_in_body_or_headers(proxy_app: ProxyApp, key: str) -> None:
    with FakeOpenAI({key: KeyBehaviour()}) as fake:
        served = proxy_app(OPENAI_KEY=key, OPENAI_BASE_URL=fake.base_url, PROXY_KEY=PROXY_KEY)
        reply = {"choices": [{"index": 0, "message": {"role": "assistant", "content": f"k {key}"}}], key: STRANGER}
        fake.next_status.append((200, reply, {"x-request-id": f"Bearer {key}"}))
        with httpx.Client(base_url=served.proxy(), headers=AUTH, timeout=10, trust_env=False) as client:
            response = client.post("/chat/completions", json={**CHAT, "stream": False})
    assert response.status_code == 200
    shown = every_reading(response.text) + str(response.headers)
    assert key not in shown and STRANGER not in shown
    assert response.json()["choices"][0]["message"]["content"] == "k [redacted]"
    assert response.headers["x-request-id"] == "Bearer [redacted]"


def test_a_non_streamed_reply_through_the_openai_door_never_shows_a_key(claude_pool) -> None:
    served, fake = claude_pool({CLAUDE: KeyBehaviour()})
    message = {
        "id": "msg_1",
        "type": "message",
        "role": "assistant",
        "model": "claude-3-5-haiku-20241022",
        "content": [{"type": "text", "text": f"key {CLAUDE}"}],
        "stop_reason": "end_turn",
        "usage": {"input_tokens": 3, "output_tokens": 2},
    }
    fake.next_status.append((200, message))
    payload = {**CHAT, "model": "claude-3-5-haiku-20241022", "stream": False}
    with httpx.Client(timeout=10, trust_env=False) as client:
        response = client.post(served.proxy("anthropic") + "/chat/completions", json=payload, headers=AUTH)
    assert response.status_code == 200
    assert CLAUDE not in every_reading(response.text)
    assert response.json()["choices"][0]["message"]["content"] == "key [redacted]"


# The Redactor ---------------------------------------------------------------------------------


@pytest.fixture
def redact() -> Redactor:
    return Redactor([PAID, ODD, 'pass/word"with\\odd-chars'])


@pytest.mark.parametrize(
    "text",
    [
        f"key {ODD}!",
        f"key {escaped(ODD)}!",
        f"key {escaped(ODD[:3])}{ODD[3:]}!",
        f"key {escaped(STRANGER)}!",
        f"key {ODD[:4]}{escaped(ODD[4])}{ODD[5:]}!",
        f"Bearer {STRANGER}",
        "hf_" + "a1B2c3D4e5F6g7H8i9",
        f"repr('refused:\\n{STRANGER}')",
        "Bearer ya29." + "a0AfB_byC1x2Y3z4" * 8,
        "ya29\\u002e" + "a0AfB_byC1x2Y3z4" * 8,
    ],
    ids=[
        "configured",
        "escaped",
        "prefix-escaped",
        "stranger-escaped",
        "one-escaped",
        "stranger",
        "hf-token",
        "stranger-after-escaped-newline",
        "google-access-token",
        "google-access-token-escaped-dot",
    ],
)
def test_text_is_redacted_whether_or_not_escaped(redact: Redactor, text: str) -> None:
    cleaned = redact(text)
    assert "[redacted]" in cleaned
    assert ODD not in cleaned and STRANGER not in cleaned
    assert ODD not in decode_escapes(cleaned) and STRANGER not in decode_escapes(cleaned)


@pytest.mark.parametrize(
    "text",
    [
        "a perfectly ordinary sentence",
        "risk-adjusted task-force-2024 flask-sqlalchemy desk-0123456789 sk-learn-pipeline",
        "caf\\u00e9 \\u003cb\\u003e \\u0041BC",
    ],
)
def test_text_without_a_secret_is_returned_as_the_very_same_object(redact: Redactor, text: str) -> None:
    assert redact(text) is text


def test_a_secret_with_json_special_characters_is_found_in_its_json_spellings(redact: Redactor) -> None:
    secret = 'pass/word"with\\odd-chars'
    raw = json.dumps({"m": secret}).encode()
    assert redact.body(raw) == b'{"m":"[redacted]"}'
    assert redact.body(raw.replace(b"/", b"\\/")) == b'{"m":"[redacted]"}'
    assert redact.body(raw.replace(b"/", b"\\u002f")) == b'{"m":"[redacted]"}'
    assert redact(raw.decode()) == '{"m": "[redacted]"}'


def test_scrub_redacts_dict_keys_and_values_at_any_depth(redact: Redactor) -> None:
    value = {ODD: 1, "a": [{"b": f"x {PAID}"}, 3, None, {"c": {STRANGER: [ODD]}}]}
    assert redact.scrub(value) == {
        "[redacted]": 1,
        "a": [{"b": "x [redacted]"}, 3, None, {"c": {"[redacted]": ["[redacted]"]}}],
    }
    deep: Any = ODD
    for _ in range(5000):
        deep = [deep]
    cleaned = redact.scrub(deep)
    for _ in range(5000):
        cleaned = cleaned[0]
    assert cleaned == "[redacted]"


def test_body_is_the_same_bytes_when_nothing_looks_secret(redact: Redactor) -> None:
    raw = json.dumps({"choices": [{"message": {"content": "caf\u00e9 risk-adjusted " * 500}}]}).encode()
    assert redact.body(raw) is raw
    assert redact.body(b"\xff\xfe not utf-8") == b"\xff\xfe not utf-8"
    clean_escapes = b'{"a":"\\u0041BC \\u00e9"}'
    assert redact.body(clean_escapes) is clean_escapes  # looked at, nothing hidden: untouched


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (f'{{"error":{{"message":"bad key {escaped(ODD)}"}}}}', {"error": {"message": "bad key [redacted]"}}),
        (f'{{"choices":[],"note":"{PAID}"}}', {"choices": [], "note": "[redacted]"}),
        (f'{{"x":{{"{escaped(ODD)}":{{"error":"{STRANGER}"}}}}}}', {"x": {"[redacted]": {"error": "[redacted]"}}}),
        (f'["{escaped(STRANGER)}", 1.5, true]', ["[redacted]", 1.5, True]),
    ],
    ids=["escaped-message", "value", "escaped-dict-key-nested", "list"],
)
def test_body_scrubs_json_keys_and_values_and_reserialises(redact: Redactor, raw: str, expected: Any) -> None:
    cleaned = redact.body(raw.encode())
    assert json.loads(cleaned) == expected
    assert ODD not in every_reading(cleaned.decode()) and STRANGER not in every_reading(cleaned.decode())


@pytest.mark.parametrize(
    "raw",
    [
        f"bad key Bearer {ODD}".encode(),
        f"bad key {escaped(ODD)}".encode(),
        b"\xff" + f"{PAID}".encode(),
        ("{" * 3000 + f'"k": "{escaped(ODD)}"').encode(),  # looks like JSON, is not
    ],
    ids=["text", "text-escaped", "invalid-utf8", "broken-json"],
)
def test_body_redacts_what_is_not_json_as_text(redact: Redactor, raw: bytes) -> None:
    cleaned = redact.body(raw).decode("utf-8", errors="replace")
    assert "[redacted]" in cleaned
    assert ODD not in every_reading(cleaned) and PAID not in cleaned


def test_body_survives_json_nested_deeper_than_python_recurses(redact: Redactor) -> None:
    raw = ("[" * 1000 + f'"{escaped(ODD)}"' + "]" * 1000).encode()
    cleaned = redact.body(raw)
    assert ODD not in every_reading(cleaned.decode()) and b"[redacted]" in cleaned


def test_headers_have_their_values_redacted(redact: Redactor) -> None:
    headers = {"x-request-id": ODD, "openai-processing-ms": f"Bearer {STRANGER}", "request-id": "req_123"}
    assert redact.headers(headers) == {
        "x-request-id": "[redacted]",
        "openai-processing-ms": "Bearer [redacted]",
        "request-id": "req_123",
    }


def test_a_redactor_with_no_secret_still_finds_escaped_key_shaped_tokens() -> None:
    redact = Redactor()
    assert redact.payload(json.dumps({"m": STRANGER}).replace("s", "\\u0073", 1)) == '{"m":"[redacted]"}'
    assert redact.payload("[DONE]") == "[DONE]"


# Logs -----------------------------------------------------------------------------------------


@pytest.fixture
def log_to_text() -> Iterator[Callable[[str], tuple[logging.Logger, io.StringIO]]]:
    """log_to_text(name): a logger writing through a RedactingFilter (as configure_logging sets up)
    to a string, with the handler's own formatter."""
    made: list[tuple[logging.Logger, logging.Handler]] = []

    def make(name: str) -> tuple[logging.Logger, io.StringIO]:
        out = io.StringIO()
        handler = logging.StreamHandler(out)
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        handler.addFilter(RedactingFilter(Redactor([PAID, ODD])))
        logger = logging.getLogger(name)
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        made.append((logger, handler))
        return logger, out

    yield make
    for logger, handler in made:
        logger.removeHandler(handler)


def test_a_traceback_never_shows_a_key(log_to_text) -> None:
    log, out = log_to_text("proxy.test.traceback")
    try:
        raise RuntimeError(f"upstream refused {ODD} and {STRANGER}")
    except RuntimeError:
        log.exception("unexpected error on %s", "POST /proxy/openai/v1/chat/completions")
    text = out.getvalue()
    assert "Traceback (most recent call last)" in text and "RuntimeError: upstream refused [redacted]" in text
    assert ODD not in text and STRANGER not in text


def test_a_traceback_formatted_earlier_by_an_unfiltered_handler_is_redacted_too(log_to_text) -> None:
    log, out = log_to_text("proxy.test.preformatted")
    plain = io.StringIO()
    unfiltered = logging.StreamHandler(plain)
    log.handlers.insert(0, unfiltered)  # formats (and caches exc_text) before the filtered handler
    try:
        try:
            raise ValueError(f"bad {PAID}")
        except ValueError:
            log.error("failed", exc_info=True)
    finally:
        log.removeHandler(unfiltered)
    assert PAID not in out.getvalue() and "ValueError: bad [redacted]" in out.getvalue()


def test_stack_info_never_shows_a_key(log_to_text) -> None:
    log, out = log_to_text("proxy.test.stack")
    record = log.makeRecord(log.name, logging.WARNING, __file__, 1, "look", (), None, sinfo=f"Stack:\n  key={ODD}")
    log.handle(record)
    assert ODD not in out.getvalue() and "key=[redacted]" in out.getvalue()


def test_a_redacted_record_keeps_its_arguments_for_formatters_that_read_them(log_to_text) -> None:
    flt = RedactingFilter(Redactor([ODD]))
    record = logging.LogRecord(
        "uvicorn.access", logging.INFO, __file__, 1, '%s - "%s %s"', ("1.2.3.4", "GET", f"/x?k={ODD}"), None
    )
    flt.filter(record)
    assert record.args == ("1.2.3.4", "GET", "/x?k=[redacted]")
    assert record.getMessage() == '1.2.3.4 - "GET /x?k=[redacted]"'


def test_a_record_with_nothing_secret_is_left_alone() -> None:
    flt = RedactingFilter(Redactor([ODD]))
    args = ("POST", "/proxy/openai/v1/chat/completions", 200)
    record = logging.LogRecord("proxy.access", logging.INFO, __file__, 1, "%s %s status=%d", args, None)
    assert flt.filter(record)
    assert record.msg == "%s %s status=%d" and record.args is args


def test_log_safe_escapes_control_characters_and_truncates() -> None:
    assert log_safe("gpt-4o") == "gpt-4o"
    assert log_safe("gpt-4o\n2026-01-01 INFO proxy.access: FORGED") == "gpt-4o\\n2026-01-01 INFO proxy.access: FORGED"
    assert log_safe("a\rb\x1b[31mc\u2028d\x00") == "a\\rb\\x1b[31mc\\u2028d\\x00"
    long = log_safe("m" * 5_000_000)
    assert long == "m" * 120 + "...(+4999880 chars)"
    assert log_safe("x" * 10, limit=4) == "xxxx...(+6 chars)"
    assert log_safe(None) == "None"


@pytest.fixture
def access_log() -> Iterator[io.StringIO]:
    """The proxy's access log lines, as configure_logging's handlers write them."""
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    handler.addFilter(RedactingFilter(Redactor([PAID, PROXY_KEY])))
    logger = logging.getLogger("proxy.access")
    previous = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield out
    logger.removeHandler(handler)
    logger.setLevel(previous)


def test_a_model_name_cannot_forge_an_access_log_line(proxy_app: ProxyApp, fake_openai: FakeOpenAI, access_log) -> None:
    served = proxy_app(OPENAI_KEY=PAID, OPENAI_BASE_URL=fake_openai.base_url, PROXY_KEY=PROXY_KEY)
    forged = "gpt-4o\n2026-01-01 00:00:00 INFO proxy.access: POST /admin status=200\rX\u2028Y"
    with httpx.Client(base_url=served.proxy(), headers=AUTH, timeout=10, trust_env=False) as client:
        client.post("/chat/completions", json={"model": forged, "messages": []})
        client.post("/chat/completions", json={"model": "m" * 5_000_000, "messages": []})
    lines = access_log.getvalue().splitlines()
    assert len(lines) == 2, lines
    assert all(line.startswith("INFO proxy.access: POST /proxy/openai/v1/chat/completions") for line in lines)
    assert "\\n2026-01-01" in lines[0]
    assert len(lines[1]) < ACCESS_LINE_LIMIT + 100


def test_an_upstream_error_that_is_not_json_never_shows_part_of_a_key(proxy_app: ProxyApp) -> None:
    """A text error body is shown cut to its first 500 bytes: a key across the cut must not leave
    its first half behind (a Mistral key has no shape to recognise it by, only the configured list)."""
    from aiohttp import web as aioweb

    from tests.fakes import ScriptedUpstream

    mistral = "Xq7Lm2Pz9Rt4Vw8Yb3Nc6Fd1Gh5Jk0Ms"  # 32 letters and digits, as Mistral's keys are
    text = "<html><body>" + "x" * (470 - len("<html><body>")) + f" bad key {mistral} </body></html>"

    async def reply(request: aioweb.Request, body: Any) -> aioweb.StreamResponse:
        return aioweb.Response(text=text, status=400, content_type="text/html")

    with ScriptedUpstream(reply) as upstream:
        served = proxy_app(MISTRAL_AI_KEY=mistral, MISTRAL_AI_BASE_URL=upstream.base_url, PROXY_KEY=PROXY_KEY)
        response = httpx.post(
            served.proxy("mistral-ai") + "/chat/completions",
            json={"model": "mistral-large-latest", "messages": [{"role": "user", "content": "hi"}]},
            headers=AUTH, timeout=10,
        )  # fmt: skip
    assert response.status_code == 400
    shown = response.json()["error"]["message"]
    assert shown.startswith("The upstream answered 400: <html>")
    assert mistral[:8] not in every_reading(response.text), shown[-60:]


def test_a_pool_of_a_thousand_keys_has_each_key_redacted_however_spelled() -> None:
    # The cheap check leaves key-shaped secrets to the key-shape pattern (issue 14: compiling the
    # whole list into it too cost 0.4 s at start with 1,000 keys); each must still be found.
    keys = [f"sk-pool-{i:05d}-0123456789abcdef" for i in range(1000)]
    odd_with_slash = "gw/7f3a9c1e5b2d"  # unshaped, and spelled `gw\/7f...` in JSON
    redact = Redactor([*keys, ODD, odd_with_slash])
    for secret in (keys[0], keys[517], keys[-1], ODD, odd_with_slash):
        for text in (f"key {secret}.", f"key {escaped(secret)}.", json.dumps({"k": secret})):
            assert redact.suspicious(text) and redact.suspicious(text.encode())
            cleaned = redact(text)
            assert secret not in decode_escapes(cleaned).replace("\\/", "/"), text
    assert redact("nothing to see here") == "nothing to see here"
