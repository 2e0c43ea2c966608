"""OpenAI-compatible services side by side: a built-in (DeepSeek), a keyless custom upstream (a local
vLLM) and OpenAI itself, each on its own route with its own keys, usage, status rows and checks."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import ClassVar

import httpx
import openai
import pytest

from proxy.config import ConfigError, load_settings
from proxy.server import create_app
from tests.conftest import PAID, PROXY_KEY, Served, make_settings, serve
from tests.fakes import FakeOpenAI, KeyBehaviour, _bearer

DEEPSEEK = "sk-deepseek-0123456789abcdef"
AUTH = {"authorization": f"Bearer {PROXY_KEY}"}


class FakeDeepSeek(FakeOpenAI):
    DEFAULT_MODELS: ClassVar[list[str]] = ["deepseek-chat", "deepseek-reasoner"]


class FakeLocal(FakeOpenAI):
    """A local server (vLLM, llama.cpp) that needs no key."""

    DEFAULT_MODELS: ClassVar[list[str]] = ["qwen2.5-7b-instruct"]

    def _key_of(self, headers: dict[str, str]) -> str | None:
        return _bearer(headers) or "none"


@pytest.fixture(scope="module")
def side_by_side(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[dict[str, FakeOpenAI], Served]]:
    with (
        FakeDeepSeek({DEEPSEEK: KeyBehaviour()}) as deepseek,
        FakeLocal({"none": KeyBehaviour()}) as lab,
        FakeOpenAI({PAID: KeyBehaviour()}) as real_openai,
    ):
        env = {
            "PROXY_KEY": PROXY_KEY,
            "OPENAI_KEY": PAID,
            "OPENAI_BASE_URL": real_openai.base_url,
            "DEEPSEEK_KEY": DEEPSEEK,
            "DEEPSEEK_BASE_URL": deepseek.base_url,
            "CUSTOM_UPSTREAMS": f"lab={lab.base_url}",
        }
        settings = make_settings(env, tmp_path_factory.mktemp("compatible"))
        with serve(create_app(settings), settings) as served:
            yield {"deepseek": deepseek, "lab": lab, "openai": real_openai}, served


@pytest.fixture
def fakes(side_by_side: tuple[dict[str, FakeOpenAI], Served]) -> dict[str, FakeOpenAI]:
    for fake in side_by_side[0].values():
        fake.reset()
        fake.next_status.clear()
    return side_by_side[0]


@pytest.fixture
def served(side_by_side: tuple[dict[str, FakeOpenAI], Served], fakes: dict[str, FakeOpenAI]) -> Served:
    return side_by_side[1]


def sdk(served: Served, service: str) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=served.proxy(service), api_key=PROXY_KEY, max_retries=0, timeout=10,
        http_client=httpx.Client(trust_env=False),
    )  # fmt: skip


MODELS = {"deepseek": "deepseek-chat", "lab": "qwen2.5-7b-instruct", "openai": "gpt-4o"}


@pytest.mark.parametrize("service", ["deepseek", "lab", "openai"])
def test_openai_sdk_chats_with_each_service_on_its_own_route(
    served: Served, fakes: dict[str, FakeOpenAI], service: str
) -> None:
    client = sdk(served, service)
    reply = client.chat.completions.create(model=MODELS[service], messages=[{"role": "user", "content": "hi"}])
    assert reply.choices[0].message.content == f"Hello from fake {MODELS[service]}"
    stream = client.chat.completions.create(
        model=MODELS[service], messages=[{"role": "user", "content": "hi"}], stream=True
    )
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == "tok0 tok1 tok2 tok3 tok4 "
    for name, fake in fakes.items():
        assert len(fake.requests) == (2 if name == service else 0), name  # nothing went elsewhere


def test_each_service_gets_its_own_key_and_a_keyless_one_none(served: Served, fakes: dict[str, FakeOpenAI]) -> None:
    for service in MODELS:
        sdk(served, service).chat.completions.create(model=MODELS[service], messages=[{"role": "user", "content": "x"}])
    assert fakes["deepseek"].requests[-1].headers["authorization"] == f"Bearer {DEEPSEEK}"
    assert fakes["openai"].requests[-1].headers["authorization"] == f"Bearer {PAID}"
    assert "authorization" not in fakes["lab"].requests[-1].headers


def test_models_usage_and_status_rows_are_per_service(served: Served, fakes: dict[str, FakeOpenAI]) -> None:
    assert {m.id for m in sdk(served, "lab").models.list()} == {"qwen2.5-7b-instruct"}
    assert {m.id for m in sdk(served, "deepseek").models.list()} == {"deepseek-chat", "deepseek-reasoner"}
    assert sdk(served, "deepseek").models.retrieve("deepseek-reasoner").owned_by == "deepseek"
    sdk(served, "lab").chat.completions.create(model="qwen2.5-7b-instruct", messages=[{"role": "user", "content": "x"}])
    event = served.runtime.ledger.recent(1)[0]
    assert (event["service"], event["family"], event["tokens_in"], event["tokens_out"]) == ("lab", "lab", 4, 5)
    status = httpx.get(served.url + "/status", trust_env=False).json()
    assert {"openai", "deepseek", "lab"} <= set(status["keys"])
    assert status["endpoints"]["deepseek"].endswith("/proxy/deepseek/v1")
    assert status["keys"]["deepseek"]["keys"][0]["id"].startswith("deepseek-")
    assert DEEPSEEK not in json.dumps(status)


def test_what_a_service_does_not_serve_answers_its_own_error(served: Served, fakes: dict[str, FakeOpenAI]) -> None:
    fakes["deepseek"].next_status.append((404, {"error": {"message": "Not Found", "type": "invalid_request_error"}}))
    with pytest.raises(openai.NotFoundError) as caught:
        sdk(served, "deepseek").embeddings.create(model="deepseek-chat", input="hello")
    assert caught.value.body["message"] == "Not Found"
    key = served.runtime.services["deepseek"].pool.keys[0]
    assert key.status(0) in ("active", "unchecked")  # the key is not blamed


def test_deepseeks_insufficient_balance_puts_the_key_out_of_quota(tmp_path) -> None:
    with FakeDeepSeek({DEEPSEEK: KeyBehaviour()}) as fake:
        settings = make_settings(
            {"DEEPSEEK_KEY": DEEPSEEK, "DEEPSEEK_BASE_URL": fake.base_url, "PROXY_KEY": PROXY_KEY}, tmp_path
        )
        with serve(create_app(settings), settings) as served:
            fake.next_status.append((402, {"error": {"message": "Insufficient Balance", "type": "unknown_error"}}))
            with httpx.Client(base_url=served.url, headers=AUTH, trust_env=False) as client:
                body = {"model": "deepseek-chat", "messages": [{"role": "user", "content": "hi"}]}
                first = client.post("/proxy/deepseek/v1/chat/completions", json=body)
                second = client.post("/proxy/deepseek/v1/chat/completions", json=body)
            assert served.runtime.status()["keys"]["deepseek"]["over_quota"] == 1
    assert first.status_code == 503 and second.status_code == 503
    assert "out of quota" in second.json()["error"]["message"]
    assert len(fake.requests) == 1  # the second request did not spend a call on a dead key


@pytest.mark.parametrize("service", ["deepseek", "lab"])
@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("POST", "/v1/audio/speech"),
        ("GET", "/v1/files"),
        ("POST", "/v1/fine_tuning/jobs"),
        ("POST", "/v1/responses"),
        ("GET", "/v1/models/deepseek-chat/versions"),
        ("DELETE", "/v1/models/deepseek-chat"),
        ("POST", "/v1/chat/completions/../../admin"),
        ("POST", "/v1/chat%2Fcompletions"),
        ("POST", "/v2/chat/completions"),
    ],
)
def test_paths_off_the_list_are_404_and_reach_nothing(
    served: Served, fakes: dict[str, FakeOpenAI], service: str, method: str, path: str
) -> None:
    with httpx.Client(base_url=served.url, headers=AUTH, trust_env=False) as client:
        reply = client.request(method, f"/proxy/{service}{path}", content=b'{"model": "deepseek-chat"}')
    assert reply.status_code == 404
    assert reply.json()["error"]["message"]
    assert all(fake.requests == [] for fake in fakes.values())


def test_the_proxy_key_never_reaches_any_upstream(served: Served, fakes: dict[str, FakeOpenAI]) -> None:
    for service in MODELS:
        client = sdk(served, service)
        client.models.list()
        client.chat.completions.create(model=MODELS[service], messages=[{"role": "user", "content": PROXY_KEY}])
        list(client.chat.completions.create(model=MODELS[service], messages=[{"role": "user", "content": "x"}],
                                            stream=True))  # fmt: skip
    for fake in fakes.values():
        assert fake.requests
        for sent in fake.requests:
            assert PROXY_KEY not in sent.path and PROXY_KEY not in json.dumps(sent.headers)
            # The prompt is the client's own text: it travels, but never as a credential.
            assert sent.headers.get("authorization", "") != f"Bearer {PROXY_KEY}"


# SillyTavern's "Custom (OpenAI-compatible)" source ---------------------------------------------------


@pytest.mark.parametrize("stream", [False, True])
def test_sillytavern_custom_source_chats_through_the_proxy(
    served: Served, fakes: dict[str, FakeOpenAI], stream: bool
) -> None:
    """The requests its server sends (chat-completions.js, CUSTOM: custom_url + '/models', '/chat/completions')."""
    custom_url = served.proxy("deepseek")
    headers = {"Authorization": f"Bearer {PROXY_KEY}", "Content-Type": "application/json"}
    body = {
        "messages": [{"role": "system", "content": "You are Seraphina."}, {"role": "user", "content": "Hello"}],
        "model": "deepseek-chat", "temperature": 1, "max_tokens": 300, "stream": stream, "presence_penalty": 0,
        "frequency_penalty": 0, "top_p": 1, "top_k": 0, "stop": [], "logit_bias": {},
    }  # fmt: skip
    with httpx.Client(trust_env=False, timeout=10) as st:
        status = st.get(f"{custom_url}/models", headers={"Authorization": f"Bearer {PROXY_KEY}"})
        assert status.status_code == 200 and status.json()["data"]
        reply = st.post(f"{custom_url}/chat/completions", headers=headers, content=json.dumps(body))
    assert reply.status_code == 200
    if stream:
        assert b"tok4" in reply.content and reply.content.rstrip().endswith(b"data: [DONE]")
    else:
        assert reply.json()["choices"][0]["message"]["content"] == "Hello from fake deepseek-chat"
    sent = fakes["deepseek"].requests[-1].json
    assert {k: v for k, v in sent.items() if k != "stream_options"} == body


# Settings ------------------------------------------------------------------------------------------


def test_custom_upstreams_take_their_keys_from_name_key() -> None:
    upstreams = "lab=http://10.0.0.5:8000/v1, my-vllm=http://127.0.0.1:8001/v1"
    settings = load_settings({"CUSTOM_UPSTREAMS": upstreams, "MY_VLLM_KEY": "k-123456"}, env_file=None)
    assert settings.custom_upstream_list == [("lab", "http://10.0.0.5:8000/v1"), ("my-vllm", "http://127.0.0.1:8001/v1")]
    assert settings.custom_keys == {"my-vllm": "k-123456"}
    assert "k-123456" in settings.secrets  # redacted like every other key


@pytest.mark.parametrize(
    "value", ["lab", "lab=ftp://x", "openai=http://x", "google-ai=http://x", "a=http://x,a=http://y", "Bad Name=http://x"]
)
def test_a_bad_custom_upstream_stops_the_start_naming_the_variable(value: str) -> None:
    with pytest.raises(ConfigError, match="CUSTOM_UPSTREAMS"):
        load_settings({"CUSTOM_UPSTREAMS": value}, env_file=None)


def test_built_in_services_have_public_defaults_and_overrides() -> None:
    settings = load_settings({"XAI_KEY": "xai-1", "GROQ_BASE_URL": "http://127.0.0.1:9/v1"}, env_file=None)
    assert settings.xai_base_url == "https://api.x.ai/v1"
    assert settings.groq_base_url == "http://127.0.0.1:9/v1"
    from proxy.providers.registry import services_from

    assert [s.name for s in services_from(settings)] == ["openai", "xai"]  # groq: no key, no route


BUILT_INS = {
    "deepseek": "DEEPSEEK", "xai": "XAI", "mistral-ai": "MISTRAL_AI", "openrouter": "OPENROUTER", "groq": "GROQ"
}  # fmt: skip


def test_every_built_in_service_is_served_on_its_route_with_its_own_key(tmp_path) -> None:
    keys = {name: f"sk-{name}-0123456789abcdef" for name in BUILT_INS}
    with FakeOpenAI({k: KeyBehaviour() for k in keys.values()}) as fake:
        env = {"PROXY_KEY": PROXY_KEY}
        for name, prefix in BUILT_INS.items():
            env[f"{prefix}_KEY"], env[f"{prefix}_BASE_URL"] = keys[name], fake.base_url
        settings = make_settings(env, tmp_path)
        with serve(create_app(settings), settings) as served, httpx.Client(headers=AUTH, trust_env=False) as client:
            for name in BUILT_INS:
                body = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}], "stream": True}
                reply = client.post(f"{served.proxy(name)}/chat/completions", json=body)
                assert reply.status_code == 200 and b"tok4" in reply.content
                sent = fake.requests[-1]
                assert sent.headers["authorization"] == f"Bearer {keys[name]}"
                # Mistral refuses fields it does not know: the proxy adds none there.
                assert ("stream_options" in sent.json) is (name != "mistral-ai")
                forbidden = client.post(f"{served.proxy(name)}/batches", json=body)
                assert forbidden.status_code == 404
                assert fake.requests[-1] is sent  # the refused path reached nothing
            status = served.runtime.status()
    assert set(BUILT_INS) <= set(status["keys"])


@pytest.mark.parametrize("name", ["admin", "proxy"])
def test_a_custom_upstream_never_takes_another_settings_secret_as_its_key(name: str) -> None:
    """`admin` would read ADMIN_KEY and `proxy` PROXY_KEY as its key, and send it to that upstream."""
    env = {"CUSTOM_UPSTREAMS": f"{name}=http://10.0.0.5:8000/v1", "ADMIN_KEY": "admin-secret-1", "PROXY_KEY": "pk-1"}
    with pytest.raises(ConfigError, match=f"CUSTOM_UPSTREAMS.*{name.upper()}_KEY"):
        load_settings(env, env_file=None)
