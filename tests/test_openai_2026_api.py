"""The OpenAI surface 2026 clients use: the Responses API, models.retrieve, reasoning models.

Clients: the official openai SDK (`responses.create`, `models.retrieve`) and raw requests shaped
like Codex CLI's; the upstream is the fake api.openai.com on a loopback port.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import httpx
import openai
import pytest

from tests.conftest import PAID, PROXY_KEY, Served
from tests.fakes import FakeOpenAI, KeyBehaviour

ADMIN = "admin-key-for-tests-0001"
AUTH = {"authorization": f"Bearer {PROXY_KEY}"}

ProxyApp = Callable[..., Served]


@pytest.fixture
def served(proxy_app: ProxyApp, fake_openai: FakeOpenAI) -> Served:
    return proxy_app(OPENAI_KEY=PAID, OPENAI_BASE_URL=fake_openai.base_url, PROXY_KEY=PROXY_KEY)


def sdk(served: Served, api_key: str = PROXY_KEY) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=served.proxy(), api_key=api_key, max_retries=0, timeout=10, http_client=httpx.Client(trust_env=False)
    )


def upstream_calls(fake: FakeOpenAI, path: str) -> list:
    return [r for r in fake.requests if r.path == f"/v1{path}"]


def last_event(served: Served) -> dict:
    deadline = time.monotonic() + 3
    while not served.runtime.ledger.recent(1) and time.monotonic() < deadline:
        time.sleep(0.02)
    return served.runtime.ledger.recent(1)[0]


# The Responses API ------------------------------------------------------------------------------


def test_responses_create_answers_through_the_sdk_with_usage_and_details(served: Served, fake_openai) -> None:
    reply = sdk(served).responses.create(model="gpt-5", input="Say hello to my friends")

    assert reply.output_text == "tok0 tok1 tok2 tok3 tok4 "
    assert reply.usage.input_tokens == 5 and reply.usage.output_tokens == 8
    assert reply.usage.output_tokens_details.reasoning_tokens == 3
    event = last_event(served)
    assert (event["tokens_in"], event["tokens_out"]) == (5, 8)
    assert (event["cached_in"], event["reasoning_out"]) == (2, 3)
    assert event["family"] == "gpt-5" and event["streamed"] is False


def test_a_streamed_response_relays_every_event_and_reads_usage_from_response_completed(
    served: Served, fake_openai: FakeOpenAI
) -> None:
    events = list(sdk(served).responses.create(model="gpt-4o", input="hello there", stream=True))

    kinds = [e.type for e in events]
    assert kinds[0] == "response.created" and kinds[-1] == "response.completed"
    assert kinds.count("response.output_text.delta") == 5
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert events[-1].response.usage.input_tokens == 2
    event = last_event(served)
    assert (event["tokens_in"], event["tokens_out"], event["cached_in"]) == (2, 5, 2)
    assert event["status"] == 200 and event["streamed"] is True


def test_a_response_cut_by_max_output_tokens_ends_with_response_incomplete_and_is_counted(
    served: Served,
) -> None:
    events = list(sdk(served).responses.create(model="gpt-4o", input="hi", max_output_tokens=2, stream=True))

    assert events[-1].type == "response.incomplete"
    assert events[-1].response.incomplete_details.reason == "max_output_tokens"
    event = last_event(served)
    assert (event["tokens_out"], event["status"]) == (2, 200)


def test_an_aborted_response_stream_is_estimated_and_the_upstream_is_cancelled(
    served: Served, fake_openai: FakeOpenAI
) -> None:
    fake_openai.stream_delay, fake_openai.chunks = 0.2, 30
    body = {"model": "gpt-4o", "input": "a long story please", "stream": True}
    with httpx.stream("POST", f"{served.proxy()}/responses", json=body, headers=AUTH, timeout=10) as reply:
        lines = reply.iter_lines()
        seen = [next(lines) for _ in range(21)]  # 4 opening events, then deltas
    assert any("response.output_text.delta" in line for line in seen)
    assert fake_openai.wait_for(lambda: fake_openai.closed_early == 1, timeout=3)
    event = last_event(served)
    assert event["status"] == 499
    assert 0 < event["tokens_out"] < 30  # estimated from what was streamed, not the full reply


def test_a_response_stream_cut_by_the_upstream_ends_with_an_error_event_the_sdk_reads(
    served: Served, fake_openai: FakeOpenAI
) -> None:
    fake_openai.drop_mid_stream = True
    events = list(sdk(served).responses.create(model="gpt-4o", input="hi", stream=True))

    assert events[-1].type == "error"
    assert "broke off" in events[-1].message or "before it was complete" in events[-1].message
    assert last_event(served)["status"] == 502


def test_store_is_forced_off_on_a_shared_key(served: Served, fake_openai: FakeOpenAI) -> None:
    sdk(served).responses.create(model="gpt-4o", input="remember this", store=True)
    sdk(served).responses.create(model="gpt-4o", input="and this")

    assert [r.json["store"] for r in upstream_calls(fake_openai, "/responses")] == [False, False]


@pytest.mark.parametrize(
    ("field", "value"),
    [("previous_response_id", "resp_someone_elses"), ("conversation", "conv_123"), ("background", True)],
)
def test_stateful_fields_are_refused_with_a_message_that_says_why_and_what_to_do(
    served: Served, fake_openai: FakeOpenAI, field: str, value: object
) -> None:
    with pytest.raises(openai.BadRequestError) as refused:
        sdk(served).responses.create(model="gpt-4o", input="continue", extra_body={field: value})

    message = refused.value.body["message"]
    assert field in message and "store is forced to false" in message and "'input'" in message
    assert upstream_calls(fake_openai, "/responses") == []


def test_the_owner_may_allow_stored_responses(proxy_app: ProxyApp, fake_openai: FakeOpenAI) -> None:
    served = proxy_app(
        OPENAI_KEY=PAID, OPENAI_BASE_URL=fake_openai.base_url, PROXY_KEY=PROXY_KEY, OPENAI_RESPONSES_STORE="true"
    )
    sdk(served).responses.create(model="gpt-4o", input="keep it", store=True)
    with pytest.raises(openai.BadRequestError) as unknown:  # forwarded: the upstream decides
        sdk(served).responses.create(model="gpt-4o", input="next", previous_response_id="resp_x")

    sent = upstream_calls(fake_openai, "/responses")
    assert sent[0].json["store"] is True and sent[1].json["previous_response_id"] == "resp_x"
    assert unknown.value.code == "previous_response_not_found"


def test_reading_or_deleting_a_stored_response_is_refused_with_404(served: Served, fake_openai) -> None:
    client = sdk(served)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve("resp_abc")
    with pytest.raises(openai.NotFoundError):
        client.responses.delete("resp_abc")
    with pytest.raises(openai.NotFoundError):
        client.responses.input_items.list("resp_abc")
    assert fake_openai.requests == []


def test_a_codex_cli_shaped_request_streams_and_only_allowed_headers_travel(
    served: Served, fake_openai: FakeOpenAI
) -> None:
    body = {
        "model": "gpt-5",
        "instructions": "You are a coding agent.",
        "input": [
            {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "list the files"}]},
            {"type": "reasoning", "id": "rs_1", "summary": [], "encrypted_content": "gAAAAprevious"},
        ],
        "tools": [{"type": "function", "name": "shell", "parameters": {"type": "object", "properties": {}},
                   "strict": False}],
        "tool_choice": "auto",
        "parallel_tool_calls": False,
        "reasoning": {"effort": "medium", "summary": "auto"},
        "store": False,
        "stream": True,
        "include": ["reasoning.encrypted_content"],
        "prompt_cache_key": "0199-session",
    }  # fmt: skip
    headers = {**AUTH, "accept": "text/event-stream", "originator": "codex_cli_rs", "session_id": "0199-session",
               "openai-beta": "responses=experimental", "version": "0.50.0"}  # fmt: skip
    with httpx.stream("POST", f"{served.proxy()}/responses", json=body, headers=headers, timeout=10) as reply:
        assert reply.status_code == 200
        assert reply.headers["content-type"].startswith("text/event-stream")
        text = reply.read().decode()

    assert "event: response.completed" in text and "event: response.output_item.done" in text
    (call,) = upstream_calls(fake_openai, "/responses")
    assert call.json == {**body, "store": False}
    assert not {"originator", "session_id", "openai-beta", "version"} & set(call.headers)
    assert call.headers["authorization"] == f"Bearer {PAID}"


def test_response_quotas_count_by_model_family(proxy_app: ProxyApp, fake_openai: FakeOpenAI) -> None:
    served = proxy_app(
        OPENAI_KEY=PAID, OPENAI_BASE_URL=fake_openai.base_url, GATEKEEPER="user_token", ADMIN_KEY=ADMIN
    )
    admin = httpx.Client(base_url=f"{served.url}/admin/api", headers={"authorization": f"Bearer {ADMIN}"})
    user = admin.post("/users", json={"nickname": "bob", "token_limits": {"gpt-5": 2000}}).json()
    client = sdk(served, user["token"])

    reply = client.responses.create(model="gpt-5", input="hello", max_output_tokens=100)
    spent = reply.usage.input_tokens + reply.usage.output_tokens
    # More than is left: admitted while quota is left, its max_output_tokens capped to fit (issue 9).
    capped = client.responses.create(model="gpt-5", input="hello", max_output_tokens=5000)
    assert upstream_calls(fake_openai, "/responses")[-1].json["max_output_tokens"] < 2000 - spent

    counts = admin.get(f"/users/{user['token']}").json()["token_counts"]
    assert counts == {"gpt-5": spent + capped.usage.input_tokens + capped.usage.output_tokens}
    admin.patch(f"/users/{user['token']}", json={"token_counts": {"gpt-5": 2000}})
    with pytest.raises(openai.APIStatusError) as refused:
        client.responses.create(model="gpt-5", input="hello", max_output_tokens=5)
    assert refused.value.status_code == 402
    assert "quota" in str(refused.value).lower() and "gpt-5" in str(refused.value)
    assert len(upstream_calls(fake_openai, "/responses")) == 2


# models.retrieve --------------------------------------------------------------------------------


def test_models_retrieve_answers_for_a_served_model_in_openai_shape(served: Served, fake_openai) -> None:
    model = sdk(served).models.retrieve("ft:gpt-4o-mini:org::abc123")

    assert model.id == "ft:gpt-4o-mini:org::abc123" and model.object == "model"


@pytest.mark.parametrize("model", ["gpt-9-imaginary", "dall-e-3"], ids=["unknown", "not-a-served-family"])
def test_models_retrieve_of_a_model_no_live_key_serves_is_404_model_not_found(served: Served, model: str) -> None:
    with pytest.raises(openai.NotFoundError) as missing:
        sdk(served).models.retrieve(model)

    assert missing.value.code == "model_not_found"
    assert model in missing.value.body["message"]


def test_models_retrieve_follows_what_the_checked_keys_serve(proxy_app: ProxyApp) -> None:
    with FakeOpenAI({PAID: KeyBehaviour(models=["gpt-4o-mini"])}) as fake:
        served = proxy_app(OPENAI_KEY=PAID, OPENAI_BASE_URL=fake.base_url, PROXY_KEY=PROXY_KEY)
        assert sdk(served).models.retrieve("gpt-4o-mini").id == "gpt-4o-mini"
        with pytest.raises(openai.NotFoundError):
            sdk(served).models.retrieve("gpt-4o")


# Reasoning models -------------------------------------------------------------------------------

OLD_PRESET = {"messages": [{"role": "user", "content": "think hard"}], "max_tokens": 3, "temperature": 0.7}


def chat_calls(fake: FakeOpenAI) -> list[dict]:
    return [r.json for r in upstream_calls(fake, "/chat/completions")]


@pytest.mark.parametrize("model", ["gpt-5", "o3-mini"])
def test_max_tokens_reaches_reasoning_families_as_max_completion_tokens(
    served: Served, fake_openai: FakeOpenAI, model: str
) -> None:
    reply = sdk(served).chat.completions.create(model=model, messages=OLD_PRESET["messages"], max_tokens=3)

    assert reply.choices[0].finish_reason == "length"
    (sent,) = chat_calls(fake_openai)
    assert "max_tokens" not in sent and sent["max_completion_tokens"] == 3


def test_a_non_reasoning_model_keeps_max_tokens_and_temperature(served: Served, fake_openai: FakeOpenAI) -> None:
    sdk(served).chat.completions.create(model="gpt-4o", **OLD_PRESET)

    (sent,) = chat_calls(fake_openai)
    assert sent["max_tokens"] == 3 and sent["temperature"] == 0.7


def test_a_refused_temperature_is_dropped_after_the_upstreams_400_once_and_then_remembered(
    served: Served, fake_openai: FakeOpenAI
) -> None:
    first = sdk(served).chat.completions.create(model="gpt-5", **OLD_PRESET)
    second = sdk(served).chat.completions.create(model="gpt-5", **OLD_PRESET)

    assert first.choices[0].message.content and second.choices[0].message.content
    calls = chat_calls(fake_openai)
    assert [c.get("temperature") for c in calls] == [0.7, None, None]  # one refusal, learned for good
    assert [r.key for r in fake_openai.requests] == [PAID] * 3  # the retry used the same key


def test_a_new_reasoning_family_needs_no_code_change(proxy_app: ProxyApp) -> None:
    class FutureOpenAI(FakeOpenAI):
        reasoning_models = frozenset({"zeta-reasoner-1"})

    with FutureOpenAI({PAID: KeyBehaviour(models=["zeta-reasoner-1"])}) as fake:
        served = proxy_app(OPENAI_KEY=PAID, OPENAI_BASE_URL=fake.base_url, PROXY_KEY=PROXY_KEY)
        first = sdk(served).chat.completions.create(model="zeta-reasoner-1", **OLD_PRESET)
        sdk(served).chat.completions.create(model="zeta-reasoner-1", **OLD_PRESET)

        assert first.choices[0].finish_reason == "length"
        calls = chat_calls(fake)
        # max_tokens refused, then temperature: each learned from its 400; the next request goes right.
        assert [sorted(set(c) & {"max_tokens", "max_completion_tokens", "temperature"}) for c in calls] == [
            ["max_tokens", "temperature"],
            ["max_completion_tokens", "temperature"],
            ["max_completion_tokens"],
            ["max_completion_tokens"],
        ]


def test_a_400_about_something_else_is_passed_on_without_a_retry(served: Served, fake_openai: FakeOpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as refused:
        sdk(served).chat.completions.create(model="gpt-5", messages=OLD_PRESET["messages"], max_completion_tokens=0)

    assert refused.value.code == "integer_below_min_value"
    assert len(chat_calls(fake_openai)) == 1


def test_a_streamed_request_is_retried_too_and_streams(served: Served, fake_openai: FakeOpenAI) -> None:
    chunks = list(sdk(served).chat.completions.create(model="o3-mini", stream=True, top_p=0.5, **OLD_PRESET))

    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "tok0 tok1 tok2 "
    calls = chat_calls(fake_openai)
    assert [(c.get("temperature"), c.get("top_p")) for c in calls] == [(0.7, 0.5), (None, 0.5), (None, None)]


def test_a_400_that_only_mentions_a_parameter_in_its_message_teaches_nothing(
    served: Served, fake_openai: FakeOpenAI
) -> None:
    echoed = {"error": {"message": "Unsupported parameter: 'temperature' is what you wrote in your prompt",
                        "type": "invalid_request_error", "param": None, "code": None}}  # fmt: skip
    fake_openai.next_status.append((400, echoed))
    with pytest.raises(openai.BadRequestError):
        sdk(served).chat.completions.create(model="gpt-4o", **OLD_PRESET)
    sdk(served).chat.completions.create(model="gpt-4o", **OLD_PRESET)

    assert [c.get("temperature") for c in chat_calls(fake_openai)] == [0.7, 0.7]


def test_the_responses_meter_reads_events_named_only_in_their_data() -> None:
    from proxy.providers.openai.responses import ResponsesStreamMeter
    from proxy.sse import SSEParser

    stream = (
        b'data: {"type":"response.output_text.delta","sequence_number":3,"delta":"hello"}\n\n'
        b'data: {"type":"response.completed","sequence_number":4,"response":{"usage":{"input_tokens":7,'
        b'"input_tokens_details":{"cached_tokens":4},"output_tokens":9,"output_tokens_details":'
        b'{"reasoning_tokens":6},"total_tokens":16}}}\n\n'
    )
    meter = ResponsesStreamMeter()
    assert all(meter.accept(event) for event in SSEParser().feed(stream))

    assert meter.finished and meter.seen_usage and meter.text_chars == 5
    assert (meter.usage.tokens_in, meter.usage.tokens_out, meter.usage.cached, meter.usage.reasoning) == (7, 9, 4, 6)
    assert b'"sequence_number":4' in meter.stream_error("cut")


def test_encrypted_reasoning_shaped_like_a_key_reaches_the_client_byte_for_byte(
    proxy_app: ProxyApp,
) -> None:
    """Codex CLI sends `encrypted_content` back on the next turn: URL-safe base64 whose random runs
    may read "-sk-..." (a key's shape) must not be redacted, or the next turn is refused."""

    class KeyShapedReasoning(FakeOpenAI):
        ENCRYPTED_CONTENT = "gAAAAABn3x_Q-sk-9fK2mZ0pL4vR8tW1yC6hJ3gF5aS7dQ2xB_" + "Yz0-Lw" * 8

    with KeyShapedReasoning({PAID: KeyBehaviour()}) as fake:
        served = proxy_app(OPENAI_KEY=PAID, OPENAI_BASE_URL=fake.base_url, PROXY_KEY=PROXY_KEY)
        ask = {"model": "gpt-5", "input": "hi", "include": ["reasoning.encrypted_content"]}
        reply = sdk(served).responses.create(**ask)
        assert reply.output[0].encrypted_content == KeyShapedReasoning.ENCRYPTED_CONTENT
        streamed = [e for e in sdk(served).responses.create(**ask, stream=True) if e.type == "response.completed"]
        assert streamed[0].response.output[0].encrypted_content == KeyShapedReasoning.ENCRYPTED_CONTENT
