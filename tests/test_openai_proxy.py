"""The OpenAI routes as a client sees them: the allowed endpoints, access, keys, errors, the SDK."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import openai
import pytest
from aiohttp import web

from tests.conftest import PAID, PROXY_KEY, Served
from tests.fakes import FakeOpenAI, KeyBehaviour, openai_error

CHAT = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hello there"}]}
COMPLETION = {"model": "gpt-4o", "prompt": "Say hello"}
EMBEDDING = {"model": "text-embedding-3-small", "input": "hello there"}
AUTH = {"authorization": f"Bearer {PROXY_KEY}"}

ProxyApp = Callable[..., Served]


def http(served: Served, **headers: str) -> httpx.Client:
    """A plain HTTP client for the served proxy, ignoring any proxy settings of the environment."""
    return httpx.Client(base_url=served.url, headers=headers, timeout=10, trust_env=False)


def sdk(served: Served, api_key: str = PROXY_KEY) -> openai.OpenAI:
    """The official SDK pointed at the proxy, as a friend would configure it."""
    return openai.OpenAI(
        base_url=served.proxy(),
        api_key=api_key,
        max_retries=0,
        timeout=10,
        http_client=httpx.Client(trust_env=False),
    )


def assert_openai_error(response: httpx.Response, status: int) -> dict[str, Any]:
    """The reply has `status` and OpenAI's error shape; returns the error object."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    return error


def closed_port() -> int:
    """A loopback port nothing listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]




@pytest.fixture
def served(shared: tuple[FakeOpenAI, Served], fake: FakeOpenAI) -> Served:
    return shared[1]


@pytest.fixture
def client(served: Served) -> Iterator[httpx.Client]:
    with http(served, **AUTH) as c:
        yield c


# Routes -------------------------------------------------------------------------------------


def test_health_answers_ok_without_any_credential(served: Served) -> None:
    with http(served) as anonymous:
        response = anonymous.get("/health")
    assert response.status_code == 200
    assert response.json() == {"status": "ok", "database": "ok"}


@pytest.mark.parametrize(
    "path",
    [
        "/proxy/openai/v1/models",
        "/proxy/openai/models",
        "/proxy/openai/v1//models",
        "/proxy/openai//v1/models",
        "/proxy/openai/v1/models/",
    ],
)
def test_the_model_list_is_served_at_every_spelling_of_its_path(client: httpx.Client, path: str) -> None:
    response = client.get(path)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["object"] == "list"
    ids = {model["id"] for model in body["data"]}
    assert {"gpt-4o", "gpt-4o-mini", "text-embedding-3-small"} <= ids


@pytest.mark.parametrize(
    ("path", "payload", "upstream_path"),
    [
        ("/proxy/openai/v1/chat/completions", CHAT, "/v1/chat/completions"),
        ("/proxy/openai/chat/completions", CHAT, "/v1/chat/completions"),
        ("/proxy/openai/v1//chat//completions", CHAT, "/v1/chat/completions"),
        ("/proxy/openai//v1/chat/completions/", CHAT, "/v1/chat/completions"),
        ("/proxy/openai/v1/completions", COMPLETION, "/v1/completions"),
        ("/proxy/openai/completions/", COMPLETION, "/v1/completions"),
        ("/proxy/openai/v1/embeddings", EMBEDDING, "/v1/embeddings"),
        ("/proxy/openai//embeddings", EMBEDDING, "/v1/embeddings"),
    ],
)
def test_generation_routes_reach_the_matching_upstream_endpoint(
    client: httpx.Client, fake: FakeOpenAI, path: str, payload: dict, upstream_path: str
) -> None:
    response = client.post(path, json=payload)
    assert response.status_code == 200, response.text
    assert response.json()["model"] == payload["model"]
    assert [(r.method, r.path) for r in fake.requests] == [("POST", upstream_path)]
    assert fake.requests[0].json == payload


def test_a_successful_reply_keeps_the_upstream_body_and_request_id(client: httpx.Client, fake: FakeOpenAI) -> None:
    response = client.post("/proxy/openai/v1/chat/completions", json=CHAT)
    assert response.status_code == 200
    body = response.json()
    assert body["object"] == "chat.completion"
    assert body["choices"][0]["message"]["content"] == "Hello from fake gpt-4o"
    assert body["usage"] == {"prompt_tokens": 5, "completion_tokens": 5, "total_tokens": 10}
    assert response.headers["x-request-id"].startswith("req_fake")


# Access -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path", "payload"),
    [
        ("GET", "/proxy/openai/v1/models", None),
        ("POST", "/proxy/openai/v1/chat/completions", CHAT),
        ("POST", "/proxy/openai/v1/completions", COMPLETION),
        ("POST", "/proxy/openai/v1/embeddings", EMBEDDING),
    ],
)
@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"authorization": "Bearer pk-wrong-key"},
        {"authorization": PROXY_KEY},
        {"authorization": f"Basic {PROXY_KEY}"},
        {"x-api-key": "pk-wrong-key"},
        {"authorization": "Bearer"},
    ],
    ids=["none", "wrong-bearer", "no-scheme", "basic", "wrong-x-api-key", "bare-scheme"],
)
def test_without_the_proxy_key_every_route_answers_401_and_nothing_reaches_the_upstream(
    served: Served, fake: FakeOpenAI, method: str, path: str, payload: dict | None, headers: dict
) -> None:
    with http(served, **headers) as c:
        response = c.request(method, path, json=payload)
    error = assert_openai_error(response, 401)
    assert error["code"] == "invalid_api_key"
    assert PROXY_KEY not in response.text
    assert fake.requests == []


@pytest.mark.parametrize(
    "headers",
    [{"authorization": f"Bearer {PROXY_KEY}"}, {"authorization": f"bearer {PROXY_KEY}"}, {"x-api-key": PROXY_KEY}],
    ids=["bearer", "lowercase-bearer", "x-api-key"],
)
def test_the_proxy_key_is_accepted_as_a_bearer_token_or_as_x_api_key(served: Served, headers: dict) -> None:
    with http(served, **headers) as c:
        assert c.get("/proxy/openai/v1/models").status_code == 200
        assert c.post("/proxy/openai/v1/chat/completions", json=CHAT).status_code == 200


def test_the_sdk_raises_authentication_error_on_a_wrong_proxy_key(served: Served, fake: FakeOpenAI) -> None:
    client = sdk(served, api_key="pk-not-the-right-one")
    with pytest.raises(openai.AuthenticationError):
        client.models.list()
    with pytest.raises(openai.AuthenticationError):
        client.chat.completions.create(**CHAT)
    assert fake.requests == []


def test_without_a_proxy_key_configured_anyone_may_use_the_proxy(proxy_app: ProxyApp, fake_openai: FakeOpenAI) -> None:
    served = proxy_app(OPENAI_KEY=PAID, OPENAI_BASE_URL=fake_openai.base_url)
    with http(served) as anonymous:
        assert anonymous.post("/proxy/openai/v1/chat/completions", json=CHAT).status_code == 200


# Keys ---------------------------------------------------------------------------------------


def test_several_keys_are_used_in_turn(proxy_app: ProxyApp) -> None:
    first, second = "sk-turn-first-0123456789", "sk-turn-second-0123456789"
    with FakeOpenAI({first: KeyBehaviour(), second: KeyBehaviour()}) as fake:
        served = proxy_app(OPENAI_KEY=f"{first}, {second}", OPENAI_BASE_URL=fake.base_url)
        with http(served) as c:
            for _ in range(4):
                assert c.post("/proxy/openai/v1/chat/completions", json=CHAT).status_code == 200
        assert fake.calls_by_key == {first: 2, second: 2}


@pytest.mark.parametrize(
    ("method", "path", "payload"),
    [
        ("GET", "/proxy/openai/v1/models", None),
        ("POST", "/proxy/openai/v1/chat/completions", CHAT),
        ("POST", "/proxy/openai/v1/completions", COMPLETION),
        ("POST", "/proxy/openai/v1/embeddings", EMBEDDING),
    ],
)
def test_with_no_key_configured_the_proxy_starts_and_answers_503_naming_openai_key(
    proxy_app: ProxyApp, fake_openai: FakeOpenAI, method: str, path: str, payload: dict | None
) -> None:
    served = proxy_app(OPENAI_BASE_URL=fake_openai.base_url)
    with http(served) as c:
        assert c.get("/health").status_code == 200
        response = c.request(method, path, json=payload)
    error = assert_openai_error(response, 503)
    assert "OPENAI_KEY" in error["message"]
    assert fake_openai.requests == []


# Errors -------------------------------------------------------------------------------------


def test_an_upstream_error_keeps_its_status_and_openai_shape(client: httpx.Client, fake: FakeOpenAI) -> None:
    upstream = openai_error("Invalid value for 'temperature': 7", "invalid_request_error", None, "temperature")
    fake.next_status.append((400, upstream))
    response = client.post("/proxy/openai/v1/chat/completions", json={**CHAT, "temperature": 7})
    error = assert_openai_error(response, 400)
    assert error == upstream["error"]


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        (b'{"model": "gpt-4o", "messages": [', "not valid JSON"),
        (b"\xff\xfe not even text", "not valid JSON"),
        (b'[{"model": "gpt-4o"}]', "must be a JSON object"),
        (b'"gpt-4o"', "must be a JSON object"),
        (b"", "empty"),
    ],
    ids=["truncated", "binary", "array", "string", "empty"],
)
def test_a_body_that_is_not_a_json_object_is_refused_with_400_before_any_upstream(
    client: httpx.Client, fake: FakeOpenAI, body: bytes, needle: str
) -> None:
    response = client.post(
        "/proxy/openai/v1/chat/completions", content=body, headers={"content-type": "application/json"}
    )
    error = assert_openai_error(response, 400)
    assert needle in error["message"]
    assert fake.requests == []


def test_a_request_without_a_model_is_refused_with_400(client: httpx.Client, fake: FakeOpenAI) -> None:
    response = client.post("/proxy/openai/v1/chat/completions", json={"messages": CHAT["messages"]})
    assert "model" in assert_openai_error(response, 400)["message"]
    assert fake.requests == []


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_a_body_over_max_body_bytes_is_refused_with_413_before_any_upstream(
    proxy_app: ProxyApp, fake_openai: FakeOpenAI, chunked: bool
) -> None:
    served = proxy_app(OPENAI_KEY=PAID, OPENAI_BASE_URL=fake_openai.base_url, MAX_BODY_BYTES="1000")
    big = b'{"model": "gpt-4o", "messages": [{"role": "user", "content": "' + b"x" * 2000 + b'"}]}'
    content: Any = iter([big[:500], big[500:]]) if chunked else big
    with http(served) as c:
        response = c.post(
            "/proxy/openai/v1/chat/completions", content=content, headers={"content-type": "application/json"}
        )
        error = assert_openai_error(response, 413)
        assert "1000 bytes" in error["message"]
        assert fake_openai.requests == []
        small = c.post("/proxy/openai/v1/chat/completions", json=CHAT)
    assert small.status_code == 200


@pytest.mark.parametrize(
    ("method", "path", "payload"),
    [("GET", "/proxy/openai/v1/models", None), ("POST", "/proxy/openai/v1/chat/completions", CHAT)],
)
def test_an_unreachable_upstream_answers_502_with_a_clear_message(
    proxy_app: ProxyApp, method: str, path: str, payload: dict | None
) -> None:
    served = proxy_app(OPENAI_KEY=PAID, OPENAI_BASE_URL=f"http://127.0.0.1:{closed_port()}/v1")
    with http(served) as c:
        response = c.request(method, path, json=payload)
    error = assert_openai_error(response, 502)
    assert "could not reach the openai upstream" in error["message"].lower()


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
def test_an_upstream_that_does_not_answer_in_time_gives_504(
    proxy_app: ProxyApp, fake_openai: FakeOpenAI, stream: bool
) -> None:
    served = proxy_app(OPENAI_KEY=PAID, OPENAI_BASE_URL=fake_openai.base_url, UPSTREAM_READ_TIMEOUT="0.3")
    fake_openai.hang_first_byte = 3.0
    started = time.monotonic()
    with http(served) as c:
        response = c.post("/proxy/openai/v1/chat/completions", json={**CHAT, "stream": stream})
    assert time.monotonic() - started < 2.0
    error = assert_openai_error(response, 504)
    assert "did not answer in time" in error["message"]


# The official SDK ---------------------------------------------------------------------------


def test_the_sdk_lists_models(served: Served) -> None:
    ids = {model.id for model in sdk(served).models.list()}
    assert {"gpt-4o", "gpt-4o-mini", "text-embedding-3-small"} <= ids


def test_the_sdk_gets_a_chat_completion(served: Served) -> None:
    reply = sdk(served).chat.completions.create(**CHAT)
    assert reply.choices[0].message.content == "Hello from fake gpt-4o"
    assert reply.usage is not None and reply.usage.total_tokens == 10


def test_the_sdk_streams_a_chat_completion(served: Served) -> None:
    stream = sdk(served).chat.completions.create(**CHAT, stream=True)
    chunks = list(stream)
    # Every chunk has a choice: the usage-only chunk the proxy asked for is not shown to this client.
    assert all(chunk.choices for chunk in chunks)
    text = "".join(chunk.choices[0].delta.content or "" for chunk in chunks)
    assert text == "tok0 tok1 tok2 tok3 tok4 "
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_the_sdk_streams_a_chat_completion_with_usage_when_it_asks(served: Served) -> None:
    stream = sdk(served).chat.completions.create(**CHAT, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 5


def test_the_sdk_gets_a_text_completion(served: Served) -> None:
    reply = sdk(served).completions.create(**COMPLETION)
    assert reply.choices[0].text == "Hello from fake gpt-4o"


def test_the_sdk_gets_embeddings(served: Served) -> None:
    reply = sdk(served).embeddings.create(model="text-embedding-3-small", input=["one two", "three"])
    assert [item.embedding for item in reply.data] == [[0.1, 0.2, 0.3], [0.1, 0.2, 0.3]]
    assert reply.usage.prompt_tokens == 3


# Hardening -------------------------------------------------------------------------------------


class SlowOpenAI(FakeOpenAI):
    """Takes three seconds to answer, and notes when the proxy gave up on it."""

    cancelled = 0

    async def _dispatch(self, request: web.Request) -> web.StreamResponse:
        try:
            await asyncio.sleep(3)
        except asyncio.CancelledError:
            type(self).cancelled += 1
            raise
        return await super()._dispatch(request)


def test_a_client_that_hangs_up_on_a_non_streamed_request_cancels_the_upstream_request(proxy_app) -> None:
    with SlowOpenAI({PAID: KeyBehaviour()}) as slow:
        served = proxy_app(OPENAI_KEY=PAID, OPENAI_BASE_URL=slow.base_url)
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{served.proxy()}/chat/completions", json=CHAT, timeout=0.5)
        assert slow.wait_for(lambda: SlowOpenAI.cancelled == 1, timeout=2)
    assert served.runtime.ledger.snapshot()["requests"] == 0  # nothing was served, nothing counted


@pytest.mark.parametrize("stream", ["yes", 1, [], {}])
def test_a_stream_flag_that_is_not_a_boolean_is_refused(fake: FakeOpenAI, shared, stream) -> None:
    served = shared[1]
    reply = httpx.post(
        f"{served.proxy()}/chat/completions",
        json={**CHAT, "stream": stream},
        headers={"authorization": f"Bearer {PROXY_KEY}"},
    )
    assert reply.status_code == 400
    assert "stream" in reply.json()["error"]["message"]
    assert fake.requests == []


def test_a_body_nested_too_deeply_is_a_clear_400(fake: FakeOpenAI, shared) -> None:
    served = shared[1]
    deep = '{"model": "gpt-4o", "messages": [], "x": ' + "[" * 100_000 + "]" * 100_000 + "}"
    reply = httpx.post(
        f"{served.proxy()}/chat/completions",
        content=deep,
        headers={"authorization": f"Bearer {PROXY_KEY}", "content-type": "application/json"},
    )
    assert reply.status_code == 400
    assert "error" in reply.json()
    assert fake.requests == []
