"""The OpenAI-format door to Claude: /proxy/anthropic/v1/chat/completions, end to end.

OpenAI chat format in and out, translated to and from Claude's Messages API. The client is the
official openai SDK with base_url `<server>/proxy/anthropic/v1`; the upstream is a fake
api.anthropic.com on a loopback port.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

import httpx
import openai
import pytest
from aiohttp import web

from tests.conftest import (
    PROXY_KEY,
    Served,
)
from tests.fakes import FakeAnthropic, KeyBehaviour, StreamEvent, anthropic_error, sse_event

PAID = "sk-ant-paid-0123456789"
HAIKU = "claude-3-5-haiku-20241022"
SONNET = "claude-sonnet-4-20250514"
HELLO = [{"role": "user", "content": "say hi please"}]
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
PIXEL = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNkYPhfDwAChwGA60e6kgAAAABJRU5ErkJggg=="


# Fixtures and helpers ----------------------------------------------------------------------------



@pytest.fixture
def door(proxy_app: Callable[..., Served], fake_anthropic: FakeAnthropic) -> Served:
    """The proxy with one paid Claude key and a proxy key."""
    return proxy_app(ANTHROPIC_KEY=PAID, ANTHROPIC_BASE_URL=fake_anthropic.base_url, PROXY_KEY=PROXY_KEY)



def client(served: Served, api_key: str = PROXY_KEY) -> openai.OpenAI:
    """The official openai SDK, pointed at the Claude door."""
    return openai.OpenAI(base_url=served.proxy("anthropic"), api_key=api_key, max_retries=0, timeout=10)


def sent(fake: FakeAnthropic) -> dict:
    """The Messages request Claude received last."""
    return fake.requests[-1].json


def raw_stream(served: Served, body: dict) -> str:
    with httpx.stream(
        "POST",
        f"{served.proxy('anthropic')}/chat/completions",
        json={"model": HAIKU, "messages": HELLO, "stream": True, **body},
        headers={"authorization": f"Bearer {PROXY_KEY}"},
        timeout=10,
    ) as response:
        assert response.status_code == 200
        return response.read().decode()


def data_lines(text: str) -> list[Any]:
    """The data of every event of an OpenAI-style stream ('[DONE]' kept as a string)."""
    out = []
    for line in text.splitlines():
        if line.startswith("data:"):
            data = line[5:].strip()
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


def wait_for_usage(served: Served, requests: int) -> dict:
    """/status usage once `requests` requests are counted (a stream is counted as it closes)."""
    deadline = time.monotonic() + 5
    while True:
        usage = httpx.get(f"{served.url}/status", timeout=5).json()["usage"]
        if usage["requests"] >= requests or time.monotonic() > deadline:
            return usage
        time.sleep(0.02)


# Requests in, replies out -------------------------------------------------------------------------


def test_chat_completion_is_answered_by_claude_in_openai_format(door: Served, fake_anthropic: FakeAnthropic) -> None:
    reply = client(door).chat.completions.create(model=HAIKU, messages=HELLO)

    assert reply.object == "chat.completion"
    assert reply.id.startswith("chatcmpl-")
    assert reply.model == HAIKU
    assert reply.choices[0].message.role == "assistant"
    assert reply.choices[0].message.content == "Hello from fake claude"
    assert reply.choices[0].finish_reason == "stop"
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens, reply.usage.total_tokens) == (6, 5, 11)
    assert [r.path for r in fake_anthropic.requests] == ["/v1/messages"]


def test_claude_gets_a_messages_request_with_the_pool_key(door: Served, fake_anthropic: FakeAnthropic) -> None:
    client(door).chat.completions.create(model=HAIKU, messages=HELLO)

    request = fake_anthropic.requests[-1]
    assert request.headers["x-api-key"] == PAID
    assert request.headers["anthropic-version"] == "2023-06-01"
    assert "authorization" not in request.headers
    assert PROXY_KEY not in json.dumps(request.headers) + request.body.decode()
    assert request.json["messages"] == [{"role": "user", "content": [{"type": "text", "text": "say hi please"}]}]


def test_system_and_developer_messages_become_claudes_system_prompt(
    door: Served, fake_anthropic: FakeAnthropic
) -> None:
    messages = [
        {"role": "system", "content": "You are terse."},
        {"role": "developer", "content": "Answer in French."},
        *HELLO,
    ]
    client(door).chat.completions.create(model=HAIKU, messages=messages)

    assert sent(fake_anthropic)["system"] == "You are terse.\n\nAnswer in French."
    assert [m["role"] for m in sent(fake_anthropic)["messages"]] == ["user"]


def test_image_parts_become_claude_image_blocks(door: Served, fake_anthropic: FakeAnthropic) -> None:
    content = [
        {"type": "text", "text": "what is in these pictures"},
        {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PIXEL}"}},
        {"type": "image_url", "image_url": {"url": "https://example.com/cat.jpg"}},
    ]
    client(door).chat.completions.create(model=HAIKU, messages=[{"role": "user", "content": content}])

    blocks = sent(fake_anthropic)["messages"][0]["content"]
    assert blocks[1] == {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": PIXEL}}
    assert blocks[2] == {"type": "image", "source": {"type": "url", "url": "https://example.com/cat.jpg"}}


def test_stop_temperature_and_top_p_are_translated(door: Served, fake_anthropic: FakeAnthropic) -> None:
    client(door).chat.completions.create(
        model=HAIKU, messages=HELLO, stop=["\n\nHuman:", "END"], temperature=0.3, top_p=0.9
    )
    request = sent(fake_anthropic)
    assert request["stop_sequences"] == ["\n\nHuman:", "END"]
    assert (request["temperature"], request["top_p"]) == (0.3, 0.9)

    client(door).chat.completions.create(model=HAIKU, messages=HELLO, stop="END", temperature=1.7)
    request = sent(fake_anthropic)
    assert request["stop_sequences"] == ["END"]
    assert request["temperature"] == 1.0  # OpenAI's 0..2, clamped to Claude's 0..1
    assert "top_p" not in request


def test_max_tokens_defaults_to_the_configured_value(claude_pool) -> None:
    served, fake = claude_pool({PAID: KeyBehaviour()}, ANTHROPIC_DEFAULT_MAX_TOKENS="321")

    client(served).chat.completions.create(model=HAIKU, messages=HELLO)
    assert sent(fake)["max_tokens"] == 321

    client(served).chat.completions.create(model=HAIKU, messages=HELLO, max_tokens=77)
    assert sent(fake)["max_tokens"] == 77

    client(served).chat.completions.create(model=HAIKU, messages=HELLO, max_completion_tokens=55)
    assert sent(fake)["max_tokens"] == 55


def test_reply_cut_by_max_tokens_finishes_with_length(door: Served) -> None:
    reply = client(door).chat.completions.create(model=HAIKU, messages=HELLO, max_tokens=2)

    assert reply.choices[0].finish_reason == "length"


def test_tool_call_round_trip(door: Served, fake_anthropic: FakeAnthropic) -> None:
    question = [{"role": "user", "content": "What is the weather in Paris?"}]
    reply = client(door).chat.completions.create(model=HAIKU, messages=question, tools=[WEATHER_TOOL])

    assert sent(fake_anthropic)["tools"] == [
        {
            "name": "get_weather",
            "input_schema": WEATHER_TOOL["function"]["parameters"],
            "description": "Weather in a city",
        }
    ]
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls"
    call = choice.message.tool_calls[0]
    assert (call.id, call.function.name, json.loads(call.function.arguments)) == (
        "toolu_1",
        "get_weather",
        {"city": "Paris"},
    )

    history = [
        *question,
        choice.message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": "18C and sunny"},
    ]
    final = client(door).chat.completions.create(model=HAIKU, messages=history, tools=[WEATHER_TOOL])

    assert final.choices[0].message.content == "Hello from fake claude"
    turns = sent(fake_anthropic)["messages"]
    assert turns[1]["content"][-1] == {
        "type": "tool_use",
        "id": "toolu_1",
        "name": "get_weather",
        "input": {"city": "Paris"},
    }
    assert turns[2]["content"] == [{"type": "tool_result", "tool_use_id": "toolu_1", "content": "18C and sunny"}]


def test_tool_choice_is_translated(door: Served, fake_anthropic: FakeAnthropic) -> None:
    client(door).chat.completions.create(model=HAIKU, messages=HELLO, tools=[WEATHER_TOOL], tool_choice="required")
    assert sent(fake_anthropic)["tool_choice"] == {"type": "any"}

    named = {"type": "function", "function": {"name": "get_weather"}}
    client(door).chat.completions.create(model=HAIKU, messages=HELLO, tools=[WEATHER_TOOL], tool_choice=named)
    assert sent(fake_anthropic)["tool_choice"] == {"type": "tool", "name": "get_weather"}


def test_openai_sdk_lists_the_claude_models(door: Served) -> None:
    models = list(client(door).models.list())

    assert {m.id for m in models} == set(FakeAnthropic.DEFAULT_MODELS)
    assert all(m.object == "model" and m.owned_by == "anthropic" and isinstance(m.created, int) for m in models)


# Streams -------------------------------------------------------------------------------------------


def test_streamed_chat_completion_arrives_as_openai_chunks(door: Served) -> None:
    chunks = list(client(door).chat.completions.create(model=HAIKU, messages=HELLO, stream=True))

    assert all(c.object == "chat.completion.chunk" and c.model == HAIKU for c in chunks)
    assert len({c.id for c in chunks}) == 1 and chunks[0].id.startswith("chatcmpl-")
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "tok0 tok1 tok2 tok3 tok4 "
    assert [c.choices[0].finish_reason for c in chunks if c.choices[0].finish_reason] == ["stop"]
    assert all(c.usage is None for c in chunks)


def test_stream_ends_with_done(door: Served) -> None:
    lines = data_lines(raw_stream(door, {}))

    assert lines[-1] == "[DONE]"
    assert lines.count("[DONE]") == 1
    assert not any(isinstance(d, dict) and "error" in d for d in lines)


def test_stream_with_include_usage_ends_with_a_usage_chunk(door: Served) -> None:
    stream = client(door).chat.completions.create(
        model=HAIKU, messages=HELLO, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)

    last = chunks[-1]
    assert last.choices == []
    assert (last.usage.prompt_tokens, last.usage.completion_tokens, last.usage.total_tokens) == (6, 5, 11)
    assert all(c.usage is None for c in chunks[:-1])


def test_streamed_tool_call_arrives_in_pieces_that_join_up(door: Served) -> None:
    question = [{"role": "user", "content": "What is the weather in Paris?"}]
    chunks = list(
        client(door).chat.completions.create(model=HAIKU, messages=question, tools=[WEATHER_TOOL], stream=True)
    )

    calls = [call for c in chunks for call in (c.choices[0].delta.tool_calls or [])]
    assert calls[0].id == "toolu_1" and calls[0].function.name == "get_weather"
    assert json.loads("".join(call.function.arguments or "" for call in calls)) == {"city": "Paris"}
    assert [c.choices[0].finish_reason for c in chunks if c.choices[0].finish_reason] == ["tool_calls"]


def test_streamed_reply_cut_by_max_tokens_finishes_with_length(door: Served) -> None:
    chunks = list(client(door).chat.completions.create(model=HAIKU, messages=HELLO, max_tokens=2, stream=True))

    assert [c.choices[0].finish_reason for c in chunks if c.choices[0].finish_reason] == ["length"]


# Errors -------------------------------------------------------------------------------------------


def test_wrong_proxy_key_is_an_openai_authentication_error(door: Served, fake_anthropic: FakeAnthropic) -> None:
    with pytest.raises(openai.AuthenticationError) as caught:
        client(door, api_key="pk-wrong").chat.completions.create(model=HAIKU, messages=HELLO)

    assert set(caught.value.body) == {"message", "type", "param", "code"}
    assert fake_anthropic.requests == []


def test_unknown_model_is_an_openai_not_found_error(door: Served) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        client(door).chat.completions.create(model="claude-9-imaginary", messages=HELLO)

    assert "claude-9-imaginary" in caught.value.body["message"]


def test_claudes_error_reaches_the_client_in_openai_shape_and_redacted(
    door: Served, fake_anthropic: FakeAnthropic
) -> None:
    fake_anthropic.next_status = [(400, anthropic_error("invalid_request_error", f"prompt is too long for {PAID}"))]

    with pytest.raises(openai.BadRequestError) as caught:
        client(door).chat.completions.create(model=HAIKU, messages=HELLO)

    body = caught.value.response.json()
    assert set(body) == {"error"}
    assert body["error"]["type"] == "invalid_request_error"
    assert body["error"]["message"] == "prompt is too long for [redacted]"


@pytest.mark.parametrize(
    "extra",
    [
        {"n": 2},
        {"functions": [{"name": "f", "parameters": {}}]},
        {"messages": [{"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}]},
        {"messages": []},
        {"max_tokens": 0},
        {"max_tokens": "lots"},
        {"temperature": "hot"},
    ],
)
def test_untranslatable_request_is_a_bad_request_that_reaches_no_upstream(
    door: Served, fake_anthropic: FakeAnthropic, extra: dict
) -> None:
    response = httpx.post(
        f"{door.proxy('anthropic')}/chat/completions",
        json={"model": HAIKU, "messages": HELLO, **extra},
        headers={"authorization": f"Bearer {PROXY_KEY}"},
        timeout=5,
    )

    assert response.status_code == 400
    assert response.json()["error"]["type"] == "invalid_request_error"
    assert fake_anthropic.requests == []


def test_every_key_rate_limited_is_an_openai_rate_limit_error(claude_pool) -> None:
    served, _ = claude_pool({"sk-ant-limited-0000000000": KeyBehaviour("rate_limited")}, QUEUE_TIMEOUT="0")

    with pytest.raises(openai.RateLimitError) as caught:
        client(served).chat.completions.create(model=HAIKU, messages=HELLO)

    assert caught.value.body["type"] == "rate_limit_error"
    assert int(caught.value.response.headers["retry-after"]) >= 1


def test_overloaded_key_is_skipped_for_another(claude_pool) -> None:
    served, fake = claude_pool({"sk-ant-broken-0000000000": KeyBehaviour("server_error"), PAID: KeyBehaviour()})

    for _ in range(3):
        assert client(served).chat.completions.create(model=HAIKU, messages=HELLO).choices

    assert fake.calls_by_key[PAID] == 3


def test_stream_cut_midway_ends_with_an_openai_error_event(door: Served, fake_anthropic: FakeAnthropic) -> None:
    fake_anthropic.drop_mid_stream = True

    lines = data_lines(raw_stream(door, {}))

    assert lines[0]["object"] == "chat.completion.chunk"
    assert set(lines[-1]) == {"error"}
    assert lines[-1]["error"]["type"] == "upstream_error"
    assert "[DONE]" not in lines


class ErrorMidStream(FakeAnthropic):
    """Claude that starts a stream, then reports overload inside it (as the real API can), echoing the key."""

    async def _message(self, request: web.Request, body: dict, b: KeyBehaviour, prompt: int) -> web.StreamResponse:
        usage = {"input_tokens": prompt, "output_tokens": 1}
        message = {"id": "msg_1", "type": "message", "role": "assistant", "model": body["model"], "content": []}
        events = [
            {"type": "message_start", "message": {**message, "stop_reason": None, "usage": usage}},
            {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
            {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Hel"}},
            anthropic_error("overloaded_error", f"Overloaded ({request.headers['x-api-key']})"),
        ]
        return await self._stream(request, [StreamEvent(sse_event(e)) for e in events], {})


def test_error_event_from_claude_mid_stream_becomes_one_openai_error_event(claude_pool) -> None:
    served, _ = claude_pool({PAID: KeyBehaviour()}, ErrorMidStream)

    lines = data_lines(raw_stream(served, {}))

    errors = [d for d in lines if isinstance(d, dict) and "error" in d]
    assert len(errors) == 1 and lines[-1] is errors[0]
    assert errors[0]["error"]["message"].startswith("Overloaded")
    assert (errors[0]["error"]["type"], errors[0]["error"]["code"]) == ("service_unavailable", "overloaded")


def test_error_event_from_claude_mid_stream_is_redacted(claude_pool) -> None:
    served, _ = claude_pool({PAID: KeyBehaviour()}, ErrorMidStream)

    text = raw_stream(served, {})

    assert "Overloaded" in text
    assert PAID not in text


def test_error_event_mid_stream_is_redacted_of_any_configured_key(claude_pool) -> None:
    odd_key = "gateway-7f3a9c1e5b2d4e6f"
    served, _ = claude_pool({odd_key: KeyBehaviour()}, ErrorMidStream)

    text = raw_stream(served, {})

    assert "Overloaded" in text
    assert odd_key not in text


def test_openai_sdk_stream_raises_on_an_error_mid_stream(claude_pool) -> None:
    served, _ = claude_pool({PAID: KeyBehaviour()}, ErrorMidStream)

    with pytest.raises(openai.APIError):
        for _ in client(served).chat.completions.create(model=HAIKU, messages=HELLO, stream=True):
            pass


# Usage ---------------------------------------------------------------------------------------------


def test_usage_is_counted_under_claude_families_streamed_or_not(door: Served) -> None:
    client(door).chat.completions.create(model=HAIKU, messages=HELLO)
    for _ in client(door).chat.completions.create(model=SONNET, messages=HELLO, stream=True):
        pass

    usage = wait_for_usage(door, 2)

    assert usage["by_family"] == {
        "claude-haiku": {"requests": 1, "tokens_in": 6, "tokens_out": 5},
        "claude-sonnet": {"requests": 1, "tokens_in": 6, "tokens_out": 5},
    }


def test_cut_stream_is_not_counted_as_a_success(door: Served, fake_anthropic: FakeAnthropic) -> None:
    fake_anthropic.drop_mid_stream = True

    raw_stream(door, {})
    time.sleep(0.2)

    assert httpx.get(f"{door.url}/status", timeout=5).json()["usage"]["requests"] == 0
