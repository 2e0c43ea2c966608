"""The Claude surface 2026 clients use: count_tokens, models.retrieve, thinking, the doubled /v1,
and the OpenAI-format door's reasoning, response_format, cache_control and usage details.

Clients: the anthropic SDK, the openai SDK on the door, and raw requests shaped like Claude
Code's; the upstream is the fake api.anthropic.com on a loopback port.
"""

from __future__ import annotations

import json
import time
from typing import Any

import anthropic
import httpx
import openai
import pytest

from proxy.providers.anthropic.translate.reasoning import takes_adaptive
from tests.conftest import PROXY_KEY, Served
from tests.fakes import FakeAnthropic, KeyBehaviour

PAID = "sk-ant-paid-0123456789"
ADMIN = "admin-key-for-tests-0001"
HAIKU = "claude-3-5-haiku-20241022"
SONNET = "claude-sonnet-4-20250514"  # budget-form thinking
OPUS_46 = "claude-opus-4-6"  # adaptive thinking with an effort
HELLO = [{"role": "user", "content": "say hi please"}]


@pytest.fixture
def claude(claude_pool) -> tuple[Served, FakeAnthropic]:
    return claude_pool({PAID: KeyBehaviour()})


def native(served: Served, base: str | None = None) -> anthropic.Anthropic:
    return anthropic.Anthropic(
        base_url=base or f"{served.url}/proxy/anthropic", api_key=PROXY_KEY, max_retries=0, timeout=10
    )


def door(served: Served) -> openai.OpenAI:
    return openai.OpenAI(base_url=served.proxy("anthropic"), api_key=PROXY_KEY, max_retries=0, timeout=10)


def sent(fake: FakeAnthropic) -> dict:
    return fake.requests[-1].json


def last_event(served: Served) -> dict:
    deadline = time.monotonic() + 3
    while not served.runtime.ledger.recent(1) and time.monotonic() < deadline:
        time.sleep(0.02)
    return served.runtime.ledger.recent(1)[0]


# count_tokens ------------------------------------------------------------------------------------


def test_count_tokens_is_forwarded_on_the_pool_and_answered_in_anthropic_shape(claude) -> None:
    served, fake = claude
    count = native(served).messages.count_tokens(
        model=HAIKU, system="be brief", messages=[{"role": "user", "content": "how many tokens is this"}]
    )

    assert count.input_tokens == 5 + 3 + 2
    (call,) = fake.requests
    assert call.path == "/v1/messages/count_tokens" and call.key == PAID
    assert last_event(served)["tokens_in"] == 0  # counting is charged nothing


def test_count_tokens_is_free_of_quota_but_rate_limited(claude_pool) -> None:
    served, fake = claude_pool({PAID: KeyBehaviour()}, GATEKEEPER="user_token", ADMIN_KEY=ADMIN,
                               TEXT_MODEL_RATE_LIMIT="2")  # fmt: skip
    admin = httpx.Client(base_url=f"{served.url}/admin/api", headers={"authorization": f"Bearer {ADMIN}"})
    user = admin.post("/users", json={"nickname": "carol", "token_limits": {"claude-haiku": 50}}).json()
    client = anthropic.Anthropic(base_url=f"{served.url}/proxy/anthropic", api_key=user["token"], max_retries=0)

    for _ in range(2):
        client.messages.count_tokens(model=HAIKU, messages=HELLO)
    with pytest.raises(anthropic.RateLimitError) as limited:
        client.messages.count_tokens(model=HAIKU, messages=HELLO)

    assert limited.value.body["error"]["type"] == "rate_limit_error"
    assert admin.get(f"/users/{user['token']}").json()["token_counts"].get("claude-haiku", 0) == 0
    assert len(fake.requests) == 2


def test_a_claude_code_shaped_count_tokens_call_with_beta_query_is_served(claude) -> None:
    served, fake = claude
    reply = httpx.post(
        f"{served.url}/proxy/anthropic/v1/messages/count_tokens?beta=true",
        json={"model": SONNET, "messages": [{"role": "user", "content": "foo"}], "tools": []},
        headers={"x-api-key": PROXY_KEY, "anthropic-version": "2023-06-01",
                 "anthropic-beta": "claude-code-20250219,interleaved-thinking-2025-05-14,oauth-2025-04-20"},
        timeout=10,
    )  # fmt: skip

    assert reply.status_code == 200 and reply.json() == {"input_tokens": 4}
    assert fake.requests[-1].path == "/v1/messages/count_tokens"  # the client's query never travels
    assert fake.requests[-1].headers["anthropic-beta"] == "claude-code-20250219,interleaved-thinking-2025-05-14"


# models.retrieve and the doubled /v1 ------------------------------------------------------------


def test_models_retrieve_answers_for_a_served_claude_model(claude) -> None:
    served, _ = claude
    model = native(served).models.retrieve(HAIKU)

    assert model.id == HAIKU and model.type == "model"
    assert door(served).models.retrieve(HAIKU).id == HAIKU  # the OpenAI-format door shares it


def test_models_retrieve_of_an_unserved_claude_model_is_404_in_anthropic_shape(claude) -> None:
    served, _ = claude
    with pytest.raises(anthropic.NotFoundError) as missing:
        native(served).models.retrieve("claude-imaginary-9")

    assert missing.value.body["error"]["type"] == "not_found_error"
    assert "claude-imaginary-9" in missing.value.body["error"]["message"]


def test_a_base_url_pasted_with_v1_into_the_anthropic_sdk_still_works(claude) -> None:
    served, fake = claude
    client = native(served, base=f"{served.url}/proxy/anthropic/v1")  # the SDK adds /v1/messages

    message = client.messages.create(model=HAIKU, max_tokens=20, messages=HELLO)

    assert message.content[0].text == "Hello from fake claude"
    assert fake.requests[-1].path == "/v1/messages"


def test_a_doubled_v1_on_the_openai_side_names_the_right_base_url(claude) -> None:
    served, _ = claude
    reply = httpx.post(f"{served.url}/proxy/openai/v1/v1/chat/completions", json={}, headers={"x-api-key": PROXY_KEY})

    assert reply.status_code == 404
    assert "use /proxy/openai/v1 as the base URL" in reply.json()["error"]["message"]


# Native thinking ---------------------------------------------------------------------------------


def test_native_thinking_with_the_anthropic_sdk_streams_thinking_and_signature(claude) -> None:
    served, fake = claude
    with native(served).messages.stream(
        model=SONNET, max_tokens=4000, thinking={"type": "enabled", "budget_tokens": 2000}, messages=HELLO
    ) as stream:
        message = stream.get_final_message()

    thinking, text = message.content
    assert thinking.type == "thinking" and thinking.thinking.strip() == FakeAnthropic.THINKING
    assert thinking.signature == FakeAnthropic.SIGNATURE
    assert text.text.startswith("tok0")
    assert message.usage.output_tokens_details.thinking_tokens == FakeAnthropic.THINKING_TOKENS
    event = last_event(served)
    assert event["reasoning_out"] == FakeAnthropic.THINKING_TOKENS
    assert event["tokens_out"] == 5 + FakeAnthropic.THINKING_TOKENS


# The OpenAI-format door: reasoning ---------------------------------------------------------------


def test_reasoning_effort_becomes_a_thinking_budget_and_comes_back_as_reasoning_content(claude) -> None:
    served, fake = claude
    reply = door(served).chat.completions.create(model=SONNET, messages=HELLO, reasoning_effort="low",
                                                 temperature=0.2, max_tokens=500)  # fmt: skip

    body = sent(fake)
    assert body["thinking"] == {"type": "enabled", "budget_tokens": 2048}
    assert body["max_tokens"] == 500 + 2048  # max_tokens is the visible answer's allowance
    assert "temperature" not in body  # Claude refuses it while thinking
    message = reply.choices[0].message
    assert message.content == "Hello from fake claude"
    assert message.reasoning_content == FakeAnthropic.THINKING
    assert reply.usage.completion_tokens_details.reasoning_tokens == FakeAnthropic.THINKING_TOKENS


def test_max_completion_tokens_counts_thinking_as_on_openai(claude) -> None:
    served, fake = claude
    door(served).chat.completions.create(model=SONNET, messages=HELLO, reasoning_effort="high",
                                         max_completion_tokens=6000)  # fmt: skip

    assert sent(fake)["max_tokens"] == 6000
    assert sent(fake)["thinking"] == {"type": "enabled", "budget_tokens": 5999}


def test_too_small_a_max_completion_tokens_for_thinking_is_a_clear_400(claude) -> None:
    served, fake = claude
    with pytest.raises(openai.BadRequestError) as refused:
        door(served).chat.completions.create(model=SONNET, messages=HELLO, reasoning_effort="low",
                                             max_completion_tokens=500)  # fmt: skip

    assert "1024" in refused.value.body["message"]
    assert fake.requests == []


def test_models_that_take_adaptive_thinking_get_it_with_an_effort(claude) -> None:
    served, fake = claude
    reply = door(served).chat.completions.create(model=OPUS_46, messages=HELLO, reasoning_effort="medium")

    assert sent(fake)["thinking"] == {"type": "adaptive"}
    assert sent(fake)["output_config"] == {"effort": "medium"}
    assert reply.choices[0].message.reasoning_content == FakeAnthropic.THINKING


def test_the_thinking_form_is_learned_from_claudes_400_for_a_new_model(claude_pool) -> None:
    class FutureAnthropic(FakeAnthropic):
        DEFAULT_MODELS = [*FakeAnthropic.DEFAULT_MODELS, "claude-nova"]
        ADAPTIVE = FakeAnthropic.ADAPTIVE | {"claude-nova"}
        ADAPTIVE_ONLY = FakeAnthropic.ADAPTIVE_ONLY | {"claude-nova"}

    served, fake = claude_pool({PAID: KeyBehaviour()}, fake_class=FutureAnthropic)
    for _ in range(2):
        reply = door(served).chat.completions.create(model="claude-nova", messages=HELLO, reasoning_effort="high")
        assert reply.choices[0].message.reasoning_content == FakeAnthropic.THINKING

    forms = [r.json["thinking"]["type"] for r in fake.requests]
    assert forms == ["enabled", "adaptive", "adaptive"]  # one refusal, then remembered
    assert fake.requests[1].json["output_config"] == {"effort": "high"}
    assert {r.key for r in fake.requests} == {PAID}


def test_thinking_streams_as_delta_reasoning_content_then_the_signed_block(claude) -> None:
    served, _ = claude
    chunks = list(door(served).chat.completions.create(
        model=SONNET, messages=HELLO, reasoning_effort="low", stream=True, stream_options={"include_usage": True}
    ))  # fmt: skip

    deltas = [c.choices[0].delta for c in chunks if c.choices]
    reasoning = "".join(getattr(d, "reasoning_content", None) or "" for d in deltas)
    assert reasoning.strip() == FakeAnthropic.THINKING
    blocks = [b for d in deltas for b in (getattr(d, "thinking_blocks", None) or [])]
    assert blocks == [{"type": "thinking", "thinking": FakeAnthropic.THINKING + " ",
                       "signature": FakeAnthropic.SIGNATURE}]  # fmt: skip
    assert "".join(d.content or "" for d in deltas).startswith("tok0")
    assert chunks[-1].usage.completion_tokens_details.reasoning_tokens == FakeAnthropic.THINKING_TOKENS


def test_thinking_and_redacted_thinking_survive_a_multi_turn_conversation(claude) -> None:
    served, fake = claude
    history: list[dict[str, Any]] = [{"role": "user", "content": "please redact your thoughts"}]
    first = door(served).chat.completions.create(model=SONNET, messages=history, reasoning_effort="low")
    message = first.choices[0].message.model_dump(exclude_none=True)
    assert [b["type"] for b in message["thinking_blocks"]] == ["thinking", "redacted_thinking"]

    history += [message, {"role": "user", "content": "and now?"}]
    second = door(served).chat.completions.create(model=SONNET, messages=history, reasoning_effort="low")

    assert second.choices[0].message.content == "Hello from fake claude"  # the fake checks the signatures
    assert sent(fake)["messages"][1]["content"] == [
        {"type": "thinking", "thinking": FakeAnthropic.THINKING, "signature": FakeAnthropic.SIGNATURE},
        {"type": "redacted_thinking", "data": FakeAnthropic.REDACTED},
        {"type": "text", "text": "Hello from fake claude"},
    ]


def test_a_malformed_thinking_block_in_history_is_a_clear_400(claude) -> None:
    served, fake = claude
    history = [*HELLO, {"role": "assistant", "content": "hi", "thinking_blocks": [{"type": "thinking"}]}, *HELLO]
    with pytest.raises(openai.BadRequestError) as refused:
        door(served).chat.completions.create(model=SONNET, messages=history)

    assert "thinking_blocks[0]" in refused.value.body["message"]
    assert fake.requests == []


# The OpenAI-format door: response_format, cache_control ----------------------------------------

SCHEMA = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}


@pytest.mark.parametrize(
    "response_format",
    [{"type": "json_object"}, {"type": "json_schema", "json_schema": {"name": "place", "schema": SCHEMA}}],
    ids=["json_object", "json_schema"],
)
def test_response_format_is_a_forced_tool_whose_input_is_the_content(claude, response_format: dict) -> None:
    served, fake = claude
    reply = door(served).chat.completions.create(model=HAIKU, messages=HELLO, response_format=response_format)

    assert json.loads(reply.choices[0].message.content) == {"city": "Paris"}
    assert reply.choices[0].finish_reason == "stop" and not reply.choices[0].message.tool_calls
    body = sent(fake)
    assert body["tool_choice"] == {"type": "tool", "name": "openai_json_response"}
    expected = SCHEMA if response_format["type"] == "json_schema" else {"type": "object"}
    assert body["tools"][0]["input_schema"] == expected


def test_response_format_streams_its_json_as_content(claude) -> None:
    served, _ = claude
    chunks = list(door(served).chat.completions.create(
        model=HAIKU, messages=HELLO, stream=True, response_format={"type": "json_object"}
    ))  # fmt: skip

    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert json.loads(text) == {"city": "Paris"}
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert not any(c.choices[0].delta.tool_calls for c in chunks if c.choices)


def test_response_format_with_thinking_uses_claudes_output_format(claude) -> None:
    served, fake = claude
    reply = door(served).chat.completions.create(
        model=SONNET, messages=HELLO, reasoning_effort="low",
        response_format={"type": "json_schema", "json_schema": {"name": "place", "schema": SCHEMA}},
    )  # fmt: skip

    assert sent(fake)["output_config"] == {"format": {"type": "json_schema", "schema": SCHEMA}}
    assert "tool_choice" not in sent(fake)
    assert json.loads(reply.choices[0].message.content) == {"city": "Paris"}


def test_cache_control_on_system_parts_and_tools_is_kept(claude) -> None:
    served, fake = claude
    ephemeral = {"type": "ephemeral"}
    door(served).chat.completions.create(
        model=HAIKU,
        messages=[
            {"role": "system", "content": [{"type": "text", "text": "a long stable prompt", "cache_control": ephemeral},
                                           {"type": "text", "text": "today's note"}]},
            *HELLO,
        ],
        tools=[{"type": "function", "function": {"name": "get_weather", "parameters": SCHEMA},
                "cache_control": ephemeral}],
    )  # fmt: skip

    body = sent(fake)
    assert body["system"] == [
        {"type": "text", "text": "a long stable prompt", "cache_control": ephemeral},
        {"type": "text", "text": "today's note"},
    ]
    assert body["tools"][0]["cache_control"] == ephemeral


# Claude Code's own request shape ----------------------------------------------------------------


def test_a_claude_code_shaped_streamed_request_with_thinking_is_relayed_whole(claude) -> None:
    served, fake = claude
    body = {
        "model": SONNET,
        "max_tokens": 32000,
        "stream": True,
        "thinking": {"type": "enabled", "budget_tokens": 4000},
        "system": [{"type": "text", "text": "You are Claude Code.", "cache_control": {"type": "ephemeral"}}],
        "messages": [{"role": "user", "content": [{"type": "text", "text": "fix the bug",
                                                   "cache_control": {"type": "ephemeral"}}]}],
        "tools": [{"name": "Bash", "description": "run", "input_schema": {"type": "object", "properties": {}}}],
        "metadata": {"user_id": "user_abc_account__session_1"},
    }  # fmt: skip
    headers = {"x-api-key": PROXY_KEY, "anthropic-version": "2023-06-01", "x-app": "cli",
               "anthropic-beta": "claude-code-20250219,interleaved-thinking-2025-05-14",
               "user-agent": "claude-cli/2.0.0 (external, cli)"}  # fmt: skip
    with httpx.stream("POST", f"{served.url}/proxy/anthropic/v1/messages?beta=true", json=body, headers=headers,
                      timeout=10) as reply:  # fmt: skip
        assert reply.status_code == 200
        text = reply.read().decode()

    assert "signature_delta" in text and FakeAnthropic.SIGNATURE in text and "event: message_stop" in text
    assert fake.requests[-1].json == body
    assert "x-app" not in fake.requests[-1].headers


@pytest.mark.parametrize(
    ("model", "adaptive"),
    [("claude-opus-4-6", True), ("claude-sonnet-4-6-20260101", True), ("claude-mythos-5", True),
     ("claude-opus-4-5-20251101", False), ("claude-sonnet-4-20250514", False),
     ("claude-3-7-sonnet-20250219", False), ("claude-haiku-4-5-20251001", False), ("claude-nova", False)],
)  # fmt: skip
def test_claude_4_6_and_later_take_adaptive_thinking_by_their_version(model: str, adaptive: bool) -> None:
    assert takes_adaptive(model) is adaptive


def test_an_unknown_reasoning_effort_is_refused_naming_the_accepted_values(claude) -> None:
    served, fake = claude
    with pytest.raises(openai.BadRequestError) as refused:
        door(served).chat.completions.create(model=SONNET, messages=HELLO, reasoning_effort="extreme")
    door(served).chat.completions.create(model=SONNET, messages=HELLO, reasoning_effort="auto")

    assert "minimal" in refused.value.body["message"] and "xhigh" in refused.value.body["message"]
    assert len(fake.requests) == 1 and "thinking" not in sent(fake)


def test_streamed_thinking_blocks_sent_back_keep_a_multi_turn_conversation_valid(claude) -> None:
    served, fake = claude
    history: list[dict[str, Any]] = [{"role": "user", "content": "please redact your thoughts"}]
    chunks = list(door(served).chat.completions.create(model=SONNET, messages=history, reasoning_effort="low",
                                                       stream=True))  # fmt: skip
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    blocks = [b for d in deltas for b in (getattr(d, "thinking_blocks", None) or [])]
    assert [b["type"] for b in blocks] == ["thinking", "redacted_thinking"]
    assert blocks[1]["data"] == FakeAnthropic.REDACTED

    content = "".join(d.content or "" for d in deltas)
    history += [
        {"role": "assistant", "content": content, "thinking_blocks": blocks},
        {"role": "user", "content": "go on"},
    ]
    reply = door(served).chat.completions.create(model=SONNET, messages=history, reasoning_effort="low")

    assert reply.choices[0].message.content == "Hello from fake claude"  # signatures and data intact
    assert [b["type"] for b in sent(fake)["messages"][1]["content"]] == ["thinking", "redacted_thinking", "text"]


def test_a_model_that_refuses_adaptive_thinking_is_switched_to_a_budget_and_remembered(claude_pool) -> None:
    class OddAnthropic(FakeAnthropic):
        DEFAULT_MODELS = [*FakeAnthropic.DEFAULT_MODELS, "claude-sonnet-4-9"]  # adaptive by its version, yet not

    served, fake = claude_pool({PAID: KeyBehaviour()}, fake_class=OddAnthropic)
    for _ in range(2):
        reply = door(served).chat.completions.create(
            model="claude-sonnet-4-9", messages=HELLO, reasoning_effort="medium"
        )
        assert reply.choices[0].message.reasoning_content == FakeAnthropic.THINKING

    assert [r.json["thinking"] for r in fake.requests] == [
        {"type": "adaptive"},
        {"type": "enabled", "budget_tokens": 8192},
        {"type": "enabled", "budget_tokens": 8192},
    ]
    assert "output_config" not in fake.requests[1].json


def test_response_format_beside_client_tools_asks_for_a_tool_call_or_the_json_answer() -> None:
    from proxy.providers.anthropic.translate import openai_to_anthropic_request

    weather = {"type": "function", "function": {"name": "get_weather", "parameters": SCHEMA}}
    out = openai_to_anthropic_request(
        {"model": HAIKU, "messages": HELLO, "tools": [weather], "response_format": {"type": "json_object"}}
    )

    assert [t["name"] for t in out["tools"]] == ["get_weather", "openai_json_response"]
    assert out["tool_choice"] == {"type": "any"}


def test_a_tool_loop_from_a_client_that_drops_thinking_blocks_still_gets_an_answer(claude) -> None:
    served, fake = claude
    weather = {"type": "function", "function": {"name": "get_weather", "parameters": SCHEMA}}
    history = [
        {"role": "user", "content": "weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "toolu_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
        ]},
        {"role": "tool", "tool_call_id": "toolu_1", "content": "sunny"},
    ]  # fmt: skip
    reply = door(served).chat.completions.create(model=SONNET, messages=history, tools=[weather],
                                                 reasoning_effort="low")  # fmt: skip

    assert reply.choices[0].message.content == "Hello from fake claude"
    assert "thinking" not in sent(fake)  # this turn goes without thinking rather than failing


# Opaque thinking blobs are never taken for keys ----------------------------------------------------

# Base64 as Claude signs thinking: a "/AIza" or "+hf_"-free run of 30+ key characters after a
# non-alphanumeric one reads like a Google API key to the key-shaped redaction.
SHAPED_SIGNATURE = "EqQBCkgIARABGAIiQL/AIzaSyD3x0Qb7LmN2pK9vR4tW8cY1eZ5hJ6gF0aS3dq+xYz/Lw=="
SHAPED_REDACTED = "EmwKAhgBEgy3va3pzix/AIzaSyB4Qq9k2Lm7Xw0pT5rVn8cJ1dH6gF3eZ2a/LafPsn4aDFIT2Xlxh0L5L8rLV"


class KeyShapedSignatures(FakeAnthropic):
    SIGNATURE = SHAPED_SIGNATURE
    REDACTED = SHAPED_REDACTED


@pytest.fixture
def shaped(claude_pool) -> tuple[Served, FakeAnthropic]:
    return claude_pool({PAID: KeyBehaviour()}, KeyShapedSignatures)


def test_signatures_shaped_like_keys_reach_the_native_client_intact_and_verify_next_turn(shaped) -> None:
    served, fake = shaped
    thinking = {"type": "enabled", "budget_tokens": 2000}
    first = native(served).messages.create(
        model=SONNET, max_tokens=4000, thinking=thinking,
        messages=[{"role": "user", "content": "please redact your thoughts"}],
    )  # fmt: skip
    blocks = [b.model_dump(exclude_none=True) for b in first.content]
    assert blocks[0]["signature"] == SHAPED_SIGNATURE and blocks[1]["data"] == SHAPED_REDACTED

    with native(served).messages.stream(model=SONNET, max_tokens=4000, thinking=thinking,
                                        messages=[{"role": "user", "content": "please redact your thoughts"}]) as s:
        streamed = s.get_final_message()  # fmt: skip
    assert streamed.content[0].signature == SHAPED_SIGNATURE and streamed.content[1].data == SHAPED_REDACTED

    history = [{"role": "user", "content": "please redact your thoughts"},
               {"role": "assistant", "content": blocks}, {"role": "user", "content": "and now?"}]  # fmt: skip
    second = native(served).messages.create(model=SONNET, max_tokens=4000, thinking=thinking, messages=history)
    assert second.content[-1].text == "Hello from fake claude"  # the fake checks signature and data


def test_signatures_shaped_like_keys_survive_the_openai_door_streamed_and_not(shaped) -> None:
    served, _ = shaped
    history: list[dict[str, Any]] = [{"role": "user", "content": "please redact your thoughts"}]
    first = door(served).chat.completions.create(model=SONNET, messages=history, reasoning_effort="low")
    message = first.choices[0].message.model_dump(exclude_none=True)
    assert [b.get("signature") or b.get("data") for b in message["thinking_blocks"]] == [
        SHAPED_SIGNATURE, SHAPED_REDACTED,
    ]  # fmt: skip
    chunks = list(door(served).chat.completions.create(model=SONNET, messages=history, reasoning_effort="low",
                                                       stream=True))  # fmt: skip
    blocks = [b for c in chunks if c.choices for b in (getattr(c.choices[0].delta, "thinking_blocks", None) or [])]
    assert [b.get("signature") or b.get("data") for b in blocks] == [SHAPED_SIGNATURE, SHAPED_REDACTED]

    history += [message, {"role": "user", "content": "and now?"}]
    second = door(served).chat.completions.create(model=SONNET, messages=history, reasoning_effort="low")
    assert second.choices[0].message.content == "Hello from fake claude"


def test_a_configured_key_inside_a_signature_is_still_redacted(claude_pool) -> None:
    class EchoingSignatures(FakeAnthropic):
        SIGNATURE = "EqQBCkgIARABGAIiQL" + PAID + "xYz=="

    served, _ = claude_pool({PAID: KeyBehaviour()}, EchoingSignatures)
    reply = httpx.post(
        f"{served.url}/proxy/anthropic/v1/messages",
        json={"model": SONNET, "max_tokens": 4000, "thinking": {"type": "enabled", "budget_tokens": 2000},
              "messages": HELLO},
        headers={"x-api-key": PROXY_KEY}, timeout=10,
    )  # fmt: skip
    assert reply.status_code == 200 and PAID not in reply.text
    assert reply.json()["content"][0]["signature"] == "EqQBCkgIARABGAIiQL[redacted]xYz=="
