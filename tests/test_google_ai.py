"""Google AI (Gemini) through the proxy: native routes as the google-genai SDK and SillyTavern send
them, the OpenAI-format door, key errors, usage, and the allow-list."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import httpx
import openai
import pytest

from proxy.server import create_app
from tests.conftest import PROXY_KEY, Served, make_settings, serve
from tests.fakes import KeyBehaviour
from tests.fakes_gemini import FakeGemini, gemini_body, sse_payloads

GOOD = "AIzaSyGood0123456789abcdefghijklmnopqrs"
SECOND = "AIzaSySecond123456789abcdefghijklmnopq"
ROOT = "/proxy/google-ai"
# Headers the google-genai SDK (1.x, Python) sends besides its key.
GENAI_HEADERS = {
    "user-agent": "google-genai-sdk/1.20.0 gl-python/3.11.9",
    "x-goog-api-client": "google-genai-sdk/1.20.0 gl-python/3.11.9",
    "content-type": "application/json",
}


@pytest.fixture(scope="module")
def gemini(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[FakeGemini, Served]]:
    with FakeGemini({GOOD: KeyBehaviour("paid"), SECOND: KeyBehaviour("paid")}) as fake:
        env = {"GOOGLE_AI_KEY": f"{GOOD},{SECOND}", "GOOGLE_AI_BASE_URL": fake.url, "PROXY_KEY": PROXY_KEY}
        settings = make_settings(env, tmp_path_factory.mktemp("gemini"))
        with serve(create_app(settings), settings) as served:
            yield fake, served


@pytest.fixture
def fake(gemini: tuple[FakeGemini, Served]) -> FakeGemini:
    upstream = gemini[0]
    upstream.reset()
    upstream.chunks, upstream.drop_mid_stream, upstream.door_sends_done = 5, False, True
    upstream.next_status.clear()
    return upstream


@pytest.fixture
def served(gemini: tuple[FakeGemini, Served], fake: FakeGemini) -> Served:
    return gemini[1]


def http(served: Served, **headers: str) -> httpx.Client:
    return httpx.Client(base_url=served.url, headers=headers, timeout=10, trust_env=False)


def door_sdk(served: Served) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=served.proxy("google-ai"), api_key=PROXY_KEY, max_retries=0, timeout=10,
        http_client=httpx.Client(trust_env=False),
    )  # fmt: skip


# Native routes, as google-genai sends them ----------------------------------------------------


def test_generate_content_with_the_key_in_x_goog_api_key(served: Served, fake: FakeGemini) -> None:
    with http(served, **GENAI_HEADERS, **{"x-goog-api-key": PROXY_KEY}) as client:
        reply = client.post(f"{ROOT}/v1beta/models/gemini-2.5-flash:generateContent", json=gemini_body())
    assert reply.status_code == 200, reply.text
    assert reply.json()["candidates"][0]["content"]["parts"][0]["text"] == "Hello from fake gemini-2.5-flash"
    sent = fake.requests[-1]
    assert sent.path == "/v1beta/models/gemini-2.5-flash:generateContent"  # no query: no client key
    assert sent.headers["x-goog-api-key"] in (GOOD, SECOND)
    assert "authorization" not in sent.headers and "x-goog-api-client" not in sent.headers


def test_stream_generate_content_with_the_key_in_the_query(served: Served, fake: FakeGemini) -> None:
    path = f"{ROOT}/v1beta/models/gemini-2.0-flash-lite:streamGenerateContent?alt=sse&key={PROXY_KEY}"
    with http(served, **GENAI_HEADERS) as client, client.stream("POST", path, json=gemini_body()) as reply:
        assert reply.status_code == 200
        assert reply.headers["content-type"].startswith("text/event-stream")
        raw = b"".join(reply.iter_raw())
    chunks = sse_payloads(raw)
    assert "".join(c["candidates"][0]["content"]["parts"][0]["text"] for c in chunks) == "tok0 tok1 tok2 tok3 tok4 "
    assert chunks[-1]["candidates"][0]["finishReason"] == "STOP"
    sent = fake.requests[-1]
    assert sent.path == "/v1beta/models/gemini-2.0-flash-lite:streamGenerateContent?alt=sse"
    assert PROXY_KEY not in sent.path


def test_stream_is_sse_even_when_the_client_forgot_alt_sse(served: Served, fake: FakeGemini) -> None:
    with http(served, **{"x-goog-api-key": PROXY_KEY}) as client:
        reply = client.post(f"{ROOT}/v1beta/models/gemini-2.5-flash:streamGenerateContent", json=gemini_body())
    assert reply.status_code == 200
    assert len(sse_payloads(reply.content)) == 5
    assert fake.requests[-1].path.endswith(":streamGenerateContent?alt=sse")


def test_bearer_works_on_native_routes_too(served: Served, fake: FakeGemini) -> None:
    with http(served, authorization=f"Bearer {PROXY_KEY}") as client:
        reply = client.post(f"{ROOT}/v1/models/gemini-2.5-pro:generateContent", json=gemini_body())
    assert reply.status_code == 200
    assert fake.requests[-1].path == "/v1/models/gemini-2.5-pro:generateContent"  # the client's API version


def test_count_tokens_is_served(served: Served, fake: FakeGemini) -> None:
    with http(served, **{"x-goog-api-key": PROXY_KEY}) as client:
        reply = client.post(f"{ROOT}/v1beta/models/gemini-2.5-flash:countTokens", json=gemini_body("one two three"))
    assert reply.json() == {"totalTokens": 3}


def test_usage_counts_prompt_candidates_and_thoughts_streamed_or_not(served: Served, fake: FakeGemini) -> None:
    ledger = served.runtime.ledger
    with http(served, **{"x-goog-api-key": PROXY_KEY}) as client:
        client.post(f"{ROOT}/v1beta/models/gemini-2.5-flash:generateContent", json=gemini_body("a b c d"))
        event = ledger.recent(1)[0]
        # "Hello from fake <model>": 4 words, plus the thoughts
        assert (event["tokens_in"], event["tokens_out"]) == (4, 4 + FakeGemini.THOUGHTS)
        assert event["reasoning_out"] == FakeGemini.THOUGHTS
        assert event["family"] == "gemini-flash"
        path = f"{ROOT}/v1beta/models/gemini-2.5-pro:streamGenerateContent?alt=sse"
        client.post(path, json=gemini_body("a b c"))
    event = ledger.recent(1)[0]
    assert (event["tokens_in"], event["tokens_out"], event["streamed"]) == (3, 5 + FakeGemini.THOUGHTS, True)
    assert event["family"] == "gemini-pro"


def test_model_lists_serve_gemini_clients_and_openai_clients(served: Served, fake: FakeGemini) -> None:
    with http(served) as client:
        native = client.get(f"{ROOT}/v1beta/models?key={PROXY_KEY}").json()
    names = {m["name"] for m in native["models"]}
    assert names == {f"models/{m}" for m in FakeGemini.DEFAULT_MODELS}  # embedding-only models left out
    assert all("generateContent" in m["supportedGenerationMethods"] for m in native["models"])
    ids = {m.id for m in door_sdk(served).models.list()}
    assert ids == set(FakeGemini.DEFAULT_MODELS)
    assert door_sdk(served).models.retrieve("gemini-2.5-pro").id == "gemini-2.5-pro"  # openai SDK
    with http(served, **{"x-goog-api-key": PROXY_KEY}) as client:
        card = client.get(f"{ROOT}/v1beta/models/gemini-2.5-pro").json()  # google-genai's models.get
        missing = client.get(f"{ROOT}/v1beta/models/gemini-9")
    assert card["name"] == "models/gemini-2.5-pro" and "generateContent" in card["supportedGenerationMethods"]
    assert missing.status_code == 404 and missing.json()["error"]["status"] == "NOT_FOUND"


def test_a_drop_mid_stream_ends_with_an_error_event(served: Served, fake: FakeGemini) -> None:
    fake.drop_mid_stream = True
    path = f"{ROOT}/v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=sse"
    with http(served, **{"x-goog-api-key": PROXY_KEY}) as client:
        raw = client.post(path, json=gemini_body()).content
    last = sse_payloads(raw)[-1]
    assert last["error"]["status"] == "UNAVAILABLE" and last["error"]["message"]


# Access ---------------------------------------------------------------------------------------


def test_a_wrong_key_is_refused_in_googles_shape_and_reaches_nothing(served: Served, fake: FakeGemini) -> None:
    with http(served, **{"x-goog-api-key": "wrong-key"}) as client:
        reply = client.post(f"{ROOT}/v1beta/models/gemini-2.5-flash:generateContent", json=gemini_body())
    assert reply.status_code == 401
    error = reply.json()["error"]
    assert error["code"] == 401 and error["status"] == "UNAUTHENTICATED" and error["message"]
    assert fake.requests == []


def test_a_key_in_the_query_never_reaches_a_log_line(
    served: Served, fake: FakeGemini, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("INFO")
    with http(served) as client:
        path = f"{ROOT}/v1beta/models/gemini-2.5-flash:generateContent?key={PROXY_KEY}"
        assert client.post(path, json=gemini_body()).status_code == 200
        assert client.post(path.replace(PROXY_KEY, "guess-" + PROXY_KEY), json=gemini_body()).status_code == 401
    lines = [r.getMessage() for r in caplog.records if r.name.startswith(("proxy", "uvicorn"))]  # not the client's
    assert any("generateContent" in line for line in lines)  # the request was logged...
    assert not any(PROXY_KEY in line for line in lines)  # ...without its query


def test_browsers_may_send_googles_key_header(served: Served) -> None:
    with http(served) as client:
        reply = client.options(f"{ROOT}/v1beta/models/gemini-2.5-flash:generateContent")
    assert "x-goog-api-key" in reply.headers["access-control-allow-headers"]


def test_no_key_at_all_is_refused(served: Served, fake: FakeGemini) -> None:
    with http(served) as client:
        reply = client.post(f"{ROOT}/v1beta/models/gemini-2.5-flash:generateContent?key=", json=gemini_body())
    assert reply.status_code == 401
    assert fake.requests == []


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("POST", "/v1beta/models/gemini-2.5-flash:embedContent"),
        ("POST", "/v1beta/models/gemini-2.5-flash:batchGenerateContent"),
        ("GET", "/v1beta/models/gemini-2.5-flash/operations"),
        ("DELETE", "/v1beta/models/gemini-2.5-flash"),
        ("GET", "/v1beta/files"),
        ("POST", "/v1beta/cachedContents"),
        ("POST", "/v1beta/tunedModels/mine:generateContent"),
        ("POST", "/v1beta/openai/chat/completions"),
        ("POST", "/v1beta/models/..%2Fcorpora:generateContent"),
        ("POST", "/v1beta/models/gemini%2D2.5-flash:generateContent"),
        ("POST", "/v1beta/models/a:b:generateContent"),
        ("POST", "/v1beta/models/:generateContent"),
        ("POST", "/v2/models/gemini-2.5-flash:generateContent"),
        ("POST", "/v1beta/models/gemini-2.5-flash:generateContent/extra"),
    ],
)
def test_paths_off_the_list_are_404_and_reach_nothing(served: Served, fake: FakeGemini, method: str, path: str) -> None:
    with http(served, **{"x-goog-api-key": PROXY_KEY}) as client:
        reply = client.request(method, ROOT + path, content=json.dumps(gemini_body()))
    assert reply.status_code == 404
    assert reply.json()["error"]["message"]
    assert fake.requests == []


# The OpenAI-format door -------------------------------------------------------------------------


def test_openai_sdk_chats_through_the_door(served: Served, fake: FakeGemini) -> None:
    reply = door_sdk(served).chat.completions.create(
        model="gemini-2.5-flash", messages=[{"role": "user", "content": "hi there"}]
    )
    assert reply.choices[0].message.content == "Hello from fake gemini-2.5-flash"
    assert reply.usage is not None and reply.usage.prompt_tokens == 5
    sent = fake.requests[-1]
    assert sent.path == "/v1beta/openai/chat/completions"
    assert sent.headers["authorization"] in (f"Bearer {GOOD}", f"Bearer {SECOND}")
    assert "x-goog-api-key" not in sent.headers


def test_openai_sdk_streams_through_the_door_with_usage_counted(served: Served, fake: FakeGemini) -> None:
    stream = door_sdk(served).chat.completions.create(
        model="gemini-2.0-flash-lite", messages=[{"role": "user", "content": "hi there"}], stream=True
    )
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "tok0 tok1 tok2 tok3 tok4 "
    assert all(c.usage is None for c in chunks)  # usage was asked by the proxy, not the client
    assert fake.requests[-1].json["stream_options"] == {"include_usage": True}
    event = served.runtime.ledger.recent(1)[0]
    assert (event["tokens_in"], event["tokens_out"]) == (5, 5)


def test_geminis_errors_reach_the_door_in_openai_shape(served: Served, fake: FakeGemini) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        door_sdk(served).chat.completions.create(model="gemini-9", messages=[{"role": "user", "content": "hi"}])
    body = caught.value.body
    assert isinstance(body, dict) and set(body) == {"message", "type", "param", "code"}
    assert "gemini-9 is not found" in body["message"]


def test_the_door_refuses_a_wrong_key_in_openai_shape(served: Served, fake: FakeGemini) -> None:
    client = openai.OpenAI(
        base_url=served.proxy("google-ai"), api_key="nope", max_retries=0, http_client=httpx.Client(trust_env=False)
    )
    with pytest.raises(openai.AuthenticationError):
        client.chat.completions.create(model="gemini-2.5-flash", messages=[{"role": "user", "content": "hi"}])
    assert fake.requests == []


# SillyTavern's "Google AI Studio" source with a reverse proxy ---------------------------------------


def st_makersuite_body(stream: bool) -> dict:
    """What SillyTavern's server sends (src/endpoints/backends/chat-completions.js, sendMakerSuiteRequest:
    `${reverse_proxy}/v1beta/models/${model}:${responseType}?key=${proxy_password}[&alt=sse]`, JSON body,
    Content-Type its only header)."""
    return {
        "contents": [
            {"role": "user", "parts": [{"text": "Hello there"}]},
            {"role": "model", "parts": [{"text": "Hi! How can I help?"}]},
            {"role": "user", "parts": [{"text": "Tell me a story"}]},
        ],
        "safetySettings": [
            {"category": "HARM_CATEGORY_HARASSMENT", "threshold": "BLOCK_NONE"},
            {"category": "HARM_CATEGORY_HATE_SPEECH", "threshold": "BLOCK_NONE"},
        ],
        "generationConfig": {"candidateCount": 1, "maxOutputTokens": 300, "temperature": 1, "topP": 0.95, "topK": 64},
        "systemInstruction": {"parts": [{"text": "You are a storyteller."}]},
    }


@pytest.mark.parametrize("stream", [False, True])
def test_sillytavern_google_ai_studio_source_chats_through_the_proxy(
    served: Served, fake: FakeGemini, stream: bool
) -> None:
    proxy_url = served.url + ROOT  # "Reverse Proxy" field; the password goes in ?key=
    with httpx.Client(trust_env=False, timeout=10) as st:
        models = st.get(f"{proxy_url}/v1beta/models?key={PROXY_KEY}")  # the list Gemini clients ask first
        assert models.status_code == 200 and models.json()["models"]
        action = "streamGenerateContent" if stream else "generateContent"
        url = f"{proxy_url}/v1beta/models/gemini-2.5-flash:{action}?key={PROXY_KEY}" + ("&alt=sse" if stream else "")
        reply = st.post(url, json=st_makersuite_body(stream), headers={"Content-Type": "application/json"})
    assert reply.status_code == 200
    if stream:
        text = "".join(c["candidates"][0]["content"]["parts"][0]["text"] for c in sse_payloads(reply.content))
        assert text == "tok0 tok1 tok2 tok3 tok4 "
    else:
        assert reply.json()["candidates"][0]["content"]["parts"][0]["text"]
    sent = fake.requests[-1]
    assert sent.json == st_makersuite_body(stream)  # relayed as sent
    assert PROXY_KEY not in sent.path


# Key errors -----------------------------------------------------------------------------------


def test_revoked_rate_limited_and_unbilled_keys_are_told_apart(proxy_app) -> None:
    keys = {
        "AIzaSyRevoked123456789abcdefghijklmnop": KeyBehaviour("revoked"),
        "AIzaSyLimited123456789abcdefghijklmnop": KeyBehaviour("rate_limited", reset_s=42),
        "AIzaSyNoBill0123456789abcdefghijklmnop": KeyBehaviour("over_quota"),
        GOOD: KeyBehaviour("paid"),
    }
    with FakeGemini(keys) as fake:
        served = proxy_app(GOOGLE_AI_KEY=",".join(keys), GOOGLE_AI_BASE_URL=fake.url, PROXY_KEY=PROXY_KEY)
        with http(served, **{"x-goog-api-key": PROXY_KEY}) as client:
            for _ in range(4):
                reply = client.post(f"{ROOT}/v1beta/models/gemini-2.5-flash:generateContent", json=gemini_body())
                assert reply.status_code == 200, reply.text
        rows = {row["id"]: row for row in served.runtime.status()["keys"]["google-ai"]["keys"]}
        pool = served.runtime.services["google-ai"].pool
        by_secret = {k.secret: rows[k.id] for k in pool.keys}
        assert by_secret["AIzaSyRevoked123456789abcdefghijklmnop"]["status"] == "revoked"
        assert by_secret["AIzaSyNoBill0123456789abcdefghijklmnop"]["status"] == "over_quota"
        limited = by_secret["AIzaSyLimited123456789abcdefghijklmnop"]
        assert limited["status"] == "rate_limited"
        assert 30 < limited["locked_until"] - time.time() <= 42  # Gemini's RetryInfo: "42s"
        assert by_secret[GOOD]["status"] == "active"


def test_every_key_rate_limited_is_a_429_in_googles_shape(proxy_app) -> None:
    with FakeGemini({GOOD: KeyBehaviour("rate_limited", reset_s=20)}) as fake:
        served = proxy_app(GOOGLE_AI_KEY=GOOD, GOOGLE_AI_BASE_URL=fake.url, PROXY_KEY=PROXY_KEY, QUEUE_TIMEOUT="0")
        with http(served, **{"x-goog-api-key": PROXY_KEY}) as client:
            reply = client.post(f"{ROOT}/v1beta/models/gemini-2.5-flash:generateContent", json=gemini_body())
    assert reply.status_code == 429
    assert reply.json()["error"]["status"] == "RESOURCE_EXHAUSTED"
    assert 15 <= int(reply.headers["retry-after"]) <= 20


def test_the_door_relays_tools_images_and_formats_as_sent(served: Served, fake: FakeGemini) -> None:
    """The door relays to Gemini's own OpenAI-compatible endpoint: what the client wrote arrives as is."""
    body = {
        "model": "gemini-2.5-flash",
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": [
                {"type": "text", "text": "What is in this image?"},
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}},
            ]},
        ],
        "tools": [{"type": "function", "function": {
            "name": "lookup", "parameters": {"type": "object", "properties": {"q": {"type": "string"}},
                                             "additionalProperties": False}}}],
        "tool_choice": "auto",
        "response_format": {"type": "json_object"},
        "reasoning_effort": "low",
    }  # fmt: skip
    with http(served, authorization=f"Bearer {PROXY_KEY}") as client:
        reply = client.post(f"{ROOT}/v1/chat/completions", json=body)
    assert reply.status_code == 200
    assert fake.requests[-1].json == body


def test_the_doors_key_errors_are_read_from_geminis_error_lists(proxy_app) -> None:
    limited, revoked = "AIzaSyLimited123456789abcdefghijklmnop", "AIzaSyRevoked123456789abcdefghijklmnop"
    keys = {limited: KeyBehaviour("rate_limited", reset_s=30), revoked: KeyBehaviour("revoked"), GOOD: KeyBehaviour()}
    with FakeGemini(keys) as fake:
        served = proxy_app(GOOGLE_AI_KEY=",".join(keys), GOOGLE_AI_BASE_URL=fake.url, PROXY_KEY=PROXY_KEY)
        for _ in range(3):
            reply = door_sdk(served).chat.completions.create(
                model="gemini-2.5-flash", messages=[{"role": "user", "content": "hi"}]
            )
            assert reply.choices[0].message.content
        assert all(isinstance(r.json, dict) for r in fake.requests)
        pool = served.runtime.services["google-ai"].pool
        states = {k.secret: k.status(time.time()) for k in pool.keys}
    assert states == {limited: "rate_limited", revoked: "revoked", GOOD: "active"}


@pytest.mark.parametrize("include_usage", [False, True])
def test_a_door_stream_without_done_is_still_complete(served: Served, fake: FakeGemini, include_usage: bool) -> None:
    fake.door_sends_done = False
    body = {"model": "gemini-2.5-flash", "messages": [{"role": "user", "content": "hi"}], "stream": True}
    if include_usage:
        body["stream_options"] = {"include_usage": True}
    with http(served, authorization=f"Bearer {PROXY_KEY}") as client:
        raw = client.post(f"{ROOT}/v1/chat/completions", json=body).content
    chunks = sse_payloads(raw)
    assert not any("error" in c for c in chunks)  # no "ended before it was complete"
    assert chunks[-1]["usage"]["completion_tokens"] == 5 if include_usage else chunks[-1]["choices"]
    event = served.runtime.ledger.recent(1)[0]
    assert (event["status"], event["tokens_out"]) == (200, 5)


def test_a_door_stream_cut_before_its_finish_is_reported(served: Served, fake: FakeGemini) -> None:
    fake.drop_mid_stream = True
    body = {"model": "gemini-2.5-flash", "messages": [{"role": "user", "content": "hi"}], "stream": True}
    with http(served, authorization=f"Bearer {PROXY_KEY}") as client:
        raw = client.post(f"{ROOT}/v1/chat/completions", json=body).content
    assert sse_payloads(raw)[-1]["error"]["message"]


# The google-genai SDK itself --------------------------------------------------------------------


def genai_client(served: Served):
    from google import genai
    from google.genai import types

    options = types.HttpOptions(base_url=served.url + ROOT, timeout=10_000)
    return genai.Client(api_key=PROXY_KEY, http_options=options)


def test_google_genai_sdk_generates_streams_counts_and_lists(served: Served, fake: FakeGemini) -> None:
    client = genai_client(served)
    reply = client.models.generate_content(model="gemini-2.5-flash", contents="Hello there")
    assert reply.text == "Hello from fake gemini-2.5-flash"
    assert reply.usage_metadata is not None and reply.usage_metadata.thoughts_token_count == FakeGemini.THOUGHTS
    chunks = client.models.generate_content_stream(model="gemini-2.5-pro", contents="hi")
    streamed = "".join(c.text or "" for c in chunks)
    assert streamed == "tok0 tok1 tok2 tok3 tok4 "
    assert client.models.count_tokens(model="gemini-2.5-flash", contents="one two").total_tokens == 2
    assert {m.name for m in client.models.list()} == {f"models/{m}" for m in FakeGemini.DEFAULT_MODELS}
    paths = [r.path for r in fake.requests]
    assert "/v1/models/gemini-2.5-pro:streamGenerateContent?alt=sse" in paths  # the SDK's API version, kept
    assert all(r.headers.get("x-goog-api-key") in (GOOD, SECOND) for r in fake.requests)


def test_google_genai_sdk_reads_the_proxys_refusal(served: Served, fake: FakeGemini) -> None:
    from google import genai
    from google.genai import errors, types

    client = genai.Client(api_key="wrong", http_options=types.HttpOptions(base_url=served.url + ROOT))
    with pytest.raises(errors.ClientError) as caught:
        client.models.generate_content(model="gemini-2.5-flash", contents="hi")
    assert caught.value.code == 401 and caught.value.status == "UNAUTHENTICATED"
    assert fake.requests == []


def test_the_proxy_key_never_reaches_gemini(served: Served, fake: FakeGemini) -> None:
    native = f"{ROOT}/v1beta/models/gemini-2.5-flash"
    with http(served, **{"x-goog-api-key": PROXY_KEY}) as client:
        client.get(f"{ROOT}/v1beta/models")
        client.post(f"{native}:generateContent?key={PROXY_KEY}&alt=json", json=gemini_body())
        client.post(f"{native}:streamGenerateContent?alt=sse&key={PROXY_KEY}", json=gemini_body())
        client.post(f"{native}:countTokens", json=gemini_body())
    list(door_sdk(served).chat.completions.create(
        model="gemini-2.5-flash", messages=[{"role": "user", "content": "hi"}], stream=True))  # fmt: skip
    assert len(fake.requests) >= 4
    for sent in fake.requests:
        assert PROXY_KEY not in sent.path and PROXY_KEY not in json.dumps(sent.headers)
        assert PROXY_KEY not in sent.body.decode()


def test_a_query_string_full_of_fields_is_refused_not_a_crash(served: Served, fake: FakeGemini) -> None:
    query = "&".join(f"f{i}=x" for i in range(50)) + f"&key={PROXY_KEY}"
    with http(served) as client:
        reply = client.post(f"{ROOT}/v1beta/models/gemini-2.5-flash:generateContent?{query}", json=gemini_body())
    assert reply.status_code == 401
    assert fake.requests == []


# Bounded work: Gemini's own lists have the same limits as every other conversation ------------------


def test_gemini_contents_and_parts_over_the_limits_are_a_clear_400_before_the_upstream(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    with FakeGemini({GOOD: KeyBehaviour("paid")}) as fake:
        env = {"GOOGLE_AI_KEY": GOOD, "GOOGLE_AI_BASE_URL": fake.url, "PROXY_KEY": PROXY_KEY,
               "MAX_MESSAGES": "4", "MAX_CONTENT_PARTS": "3"}  # fmt: skip
        settings = make_settings(env, tmp_path_factory.mktemp("gemini-limits"))
        turn = {"parts": [{"text": "hi"}]}  # a role is optional in Gemini's contents
        too_many_turns = {"contents": [turn] * 5}
        too_many_parts = {"contents": [{"role": "user", "parts": [{"text": "a"}] * 4}]}
        too_long_system = {"contents": [turn], "systemInstruction": {"parts": [{"text": "s"}] * 4}}
        with serve(create_app(settings), settings) as served, http(served, **{"x-goog-api-key": PROXY_KEY}) as client:
            for verb in ("generateContent", "countTokens"):
                for body, setting in ((too_many_turns, "MAX_MESSAGES"), (too_many_parts, "MAX_CONTENT_PARTS"),
                                      (too_long_system, "MAX_CONTENT_PARTS")):  # fmt: skip
                    reply = client.post(f"{ROOT}/v1beta/models/gemini-2.5-flash:{verb}", json=body)
                    assert reply.status_code == 400, (verb, setting, reply.text)
                    assert setting in reply.json()["error"]["message"]
            assert client.post(f"{ROOT}/v1beta/models/gemini-2.5-flash:generateContent",
                               json={"contents": [turn] * 4}).status_code == 200  # fmt: skip
        assert [r.path for r in fake.requests if ":" in r.path] == ["/v1beta/models/gemini-2.5-flash:generateContent"]


def test_a_malformed_usage_metadata_never_cuts_a_gemini_stream(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Issue 9 item 14 on the new provider: usage that is not a number reads as none, and every
    chunk the upstream sent reaches the client, as for OpenAI's and Claude's usage."""

    class OddUsage(FakeGemini):
        def _usage(self, model: str, prompt: int, candidates: int) -> dict:
            return {"promptTokenCount": "about ten", "candidatesTokenCount": candidates, "thoughtsTokenCount": None}

    with OddUsage({GOOD: KeyBehaviour("paid")}) as fake:
        env = {"GOOGLE_AI_KEY": GOOD, "GOOGLE_AI_BASE_URL": fake.url, "PROXY_KEY": PROXY_KEY}
        settings = make_settings(env, tmp_path_factory.mktemp("gemini-odd-usage"))
        with serve(create_app(settings), settings) as served, http(served, **{"x-goog-api-key": PROXY_KEY}) as client:
            path = f"{ROOT}/v1beta/models/gemini-2.0-flash-lite:streamGenerateContent?alt=sse"
            with client.stream("POST", path, json=gemini_body()) as reply:
                raw = b"".join(reply.iter_bytes())
            texts = [p["candidates"][0]["content"]["parts"][0]["text"] for p in sse_payloads(raw) if "candidates" in p]
            assert texts == [f"tok{i} " for i in range(5)] and b'"error"' not in raw
            whole = client.post(f"{ROOT}/v1beta/models/gemini-2.0-flash-lite:generateContent", json=gemini_body())
            assert whole.status_code == 200


def test_a_slow_gemini_stream_reaches_the_google_genai_sdk_without_sse_comments(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """The queue's heartbeats are SSE comments (`: waiting for the upstream`), which the openai and
    anthropic SDKs skip; google-genai (3.6) reads every non-`data:` line as JSON and raises
    UnknownApiResponseError. A native stream (asked by its path, not a `stream` field) must never
    get them, however long a thinking model stays silent."""
    with FakeGemini({GOOD: KeyBehaviour("paid")}) as fake:
        env = {"GOOGLE_AI_KEY": GOOD, "GOOGLE_AI_BASE_URL": fake.url, "PROXY_KEY": PROXY_KEY,
               "HEARTBEAT_INTERVAL": "0.2"}  # fmt: skip
        settings = make_settings(env, tmp_path_factory.mktemp("gemini-heartbeat"))
        with serve(create_app(settings), settings) as served:
            fake.hang_first_byte = 1.0  # five heartbeats' worth of silence
            client = genai_client(served)
            chunks = list(client.models.generate_content_stream(model="gemini-2.5-flash", contents="Hello there"))
    assert "".join(c.text or "" for c in chunks) == "".join(f"tok{i} " for i in range(5))
