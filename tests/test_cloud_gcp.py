"""Google Vertex AI (Claude) through the proxy: the anthropic SDK on the native route and the openai SDK on
the door, streamed and not, against a fake Vertex whose fake OAuth endpoint verifies the JWT each
service account signs (a throwaway RSA key per test module). Tokens are minted once and cached,
credentials given as a path, inline JSON or base64, and the key check."""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Iterator

import anthropic
import httpx
import openai
import pytest

from proxy.config import load_settings
from proxy.providers.gcp.dialect import vertex_id
from proxy.server import create_app
from tests.conftest import PROXY_KEY, Served, make_settings, serve
from tests.fakes import KeyBehaviour, messages_tokens
from tests.fakes_cloud import FakeVertex, GcpAccount, service_account

ROOT = "/proxy/gcp/claude"
HELLO = [{"role": "user", "content": "say hello to me"}]
PROMPT = messages_tokens(HELLO)
EMAIL = "proxy@my-project.iam.gserviceaccount.com"


@pytest.fixture(scope="module")
def account() -> tuple[dict, str]:
    return service_account(EMAIL, "my-project")


@pytest.fixture(scope="module")
def gcp(tmp_path_factory: pytest.TempPathFactory, account: tuple[dict, str]) -> Iterator[tuple[FakeVertex, Served]]:
    info, public = account
    with FakeVertex({EMAIL: GcpAccount(public, "my-project")}) as fake:
        env = {
            "GCP_CREDENTIALS": json.dumps(info),
            "GCP_VERTEX_BASE_URL": fake.url,
            "GCP_TOKEN_URL": fake.token_url,
            "PROXY_KEY": PROXY_KEY,
        }
        settings = make_settings(env, tmp_path_factory.mktemp("gcp"))
        with serve(create_app(settings), settings) as served:
            yield fake, served


@pytest.fixture
def fake(gcp: tuple[FakeVertex, Served]) -> FakeVertex:
    gcp[0].reset()
    gcp[0].chunks = 5
    return gcp[0]


@pytest.fixture
def served(gcp: tuple[FakeVertex, Served], fake: FakeVertex) -> Served:
    return gcp[1]


def claude(served: Served) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=served.url + ROOT, api_key=PROXY_KEY, max_retries=0, timeout=10)


def door(served: Served) -> openai.OpenAI:
    return openai.OpenAI(base_url=served.url + ROOT + "/v1", api_key=PROXY_KEY, max_retries=0, timeout=10,
                         http_client=httpx.Client(trust_env=False))  # fmt: skip


def test_anthropic_sdk_gets_a_message_through_raw_predict_with_a_minted_token(served: Served, fake: FakeVertex):
    message = claude(served).messages.create(model="claude-sonnet-4-5-20250929", max_tokens=100, messages=HELLO)
    assert message.content[0].text == "Hello from fake claude"
    assert (message.usage.input_tokens, message.usage.output_tokens) == (PROMPT, 5)
    sent = fake.requests[-1]
    assert sent.path == (
        "/v1/projects/my-project/locations/us-east5/publishers/anthropic/models/claude-sonnet-4-5@20250929:rawPredict"
    )
    assert sent.headers["authorization"].startswith("Bearer ya29.fake-token-")
    assert sent.json["anthropic_version"] == "vertex-2023-10-16" and "model" not in sent.json
    assert PROXY_KEY not in json.dumps(sent.headers)


def test_the_token_is_minted_once_and_reused_until_near_expiry(served: Served, fake: FakeVertex) -> None:
    before = fake.minted
    for _ in range(3):
        claude(served).messages.create(model="claude-3-5-haiku-latest", max_tokens=10, messages=HELLO)
    assert fake.minted - before <= 1  # at most the first of these mints (an earlier test may have)
    assert {r.headers["authorization"] for r in fake.requests if "Predict" in r.path}.__len__() == 1


def test_anthropic_sdk_streams_through_stream_raw_predict(served: Served, fake: FakeVertex) -> None:
    with claude(served).messages.stream(model="claude-sonnet-4-5", max_tokens=100, messages=HELLO) as s:
        text = "".join(s.text_stream)
        final = s.get_final_message()
    assert text == "tok0 tok1 tok2 tok3 tok4 "
    assert (final.usage.input_tokens, final.usage.output_tokens) == (PROMPT, 5)
    assert fake.requests[-1].path.endswith("claude-sonnet-4-5@20250929:streamRawPredict")
    assert fake.requests[-1].json["stream"] is True
    usage = served.runtime.ledger.recent(1)[0]
    assert (usage["tokens_in"], usage["tokens_out"], usage["service"]) == (PROMPT, 5, "gcp")


def test_openai_sdk_on_the_door_chats_and_streams_with_exact_usage(served: Served) -> None:
    reply = door(served).chat.completions.create(model="claude-3-5-haiku-20241022", messages=HELLO, max_tokens=64)
    assert reply.choices[0].message.content == "Hello from fake claude"
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (PROMPT, 5)
    chunks = list(door(served).chat.completions.create(
        model="claude-3-5-haiku-20241022", messages=HELLO, max_tokens=64, stream=True,
        stream_options={"include_usage": True},
    ))  # fmt: skip
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "tok0 tok1 tok2 tok3 tok4 "
    assert (chunks[-1].usage.prompt_tokens, chunks[-1].usage.completion_tokens) == (PROMPT, 5)


def test_a_model_not_enabled_for_the_project_is_a_clear_404(served: Served) -> None:
    with pytest.raises(anthropic.NotFoundError):
        claude(served).messages.create(model="claude-opus-4-1", max_tokens=10, messages=HELLO)
    with pytest.raises(openai.NotFoundError):
        door(served).chat.completions.create(model="claude-opus-4-1", messages=HELLO)


@pytest.mark.parametrize(
    ("method", "path"),
    [("POST", "/v1/complete"), ("POST", "/v1/messages/count_tokens"), ("GET", "/v1/files"), ("POST", "/v1/embeddings")],
)
def test_paths_off_the_list_are_404_and_reach_nothing(served: Served, fake: FakeVertex, method: str, path: str):
    with httpx.Client(trust_env=False, timeout=10) as client:
        reply = client.request(method, served.url + ROOT + path, headers={"x-api-key": PROXY_KEY}, json={})
    assert reply.status_code == 404
    assert fake.requests == []


def test_the_private_key_never_reaches_a_client_or_the_status(served: Served, account: tuple[dict, str]) -> None:
    status = httpx.get(served.url + "/status", timeout=10).text
    info = account[0]
    assert info["private_key_id"] not in status and "PRIVATE KEY" not in status
    leaked = json.dumps({"echo": info["private_key"], "id": info["private_key_id"]})
    scrubbed = served.runtime.redactor(leaked)
    assert info["private_key_id"] not in scrubbed
    assert all(line not in scrubbed for line in info["private_key"].splitlines()[1:-1])


def test_a_refused_service_account_is_revoked_and_its_error_never_names_a_secret(tmp_path) -> None:
    info, public = service_account("gone@my-project.iam.gserviceaccount.com", "my-project")
    accounts = {info["client_email"]: GcpAccount(public, "my-project", KeyBehaviour("revoked"))}
    with FakeVertex(accounts) as fake:
        env = {"GCP_CREDENTIALS": json.dumps(info), "GCP_VERTEX_BASE_URL": fake.url, "GCP_TOKEN_URL": fake.token_url,
               "PROXY_KEY": PROXY_KEY, "CHECK_KEYS": "true"}  # fmt: skip
        settings = make_settings(env, tmp_path)
        with serve(create_app(settings), settings) as served:
            pool = served.runtime.services["gcp"].pool
            deadline = time.monotonic() + 10
            while pool.keys[0].last_checked is None and time.monotonic() < deadline:
                time.sleep(0.05)
            assert pool.keys[0].state.value == "revoked"
            with pytest.raises(anthropic.APIStatusError) as caught:
                claude(served).messages.create(model="claude-sonnet-4-5", max_tokens=10, messages=HELLO)
    assert info["private_key_id"] not in str(caught.value.body)


def test_key_check_mints_a_token_and_finds_the_enabled_models(tmp_path) -> None:
    info, public = service_account("check@other.iam.gserviceaccount.com", "other", region="europe-west1")
    enabled = ("claude-3-5-haiku-20241022", "claude-opus-4-6")
    accounts = {info["client_email"]: GcpAccount(public, "other", enabled=enabled, regions=("europe-west1",))}
    with FakeVertex(accounts) as fake:
        encoded = base64.b64encode(json.dumps(info).encode()).decode()
        env = {"GCP_CREDENTIALS": encoded, "GCP_VERTEX_BASE_URL": fake.url, "GCP_TOKEN_URL": fake.token_url,
               "CHECK_KEYS": "true"}  # fmt: skip
        settings = make_settings(env, tmp_path)
        with serve(create_app(settings), settings) as served:
            key = served.runtime.services["gcp"].pool.keys[0]
            deadline = time.monotonic() + 10
            while key.last_checked is None and time.monotonic() < deadline:
                time.sleep(0.05)
            assert key.state.value == "active"
            assert key.models == set(enabled)
            assert fake.minted == 1  # one token served the check's calls
            assert all("/locations/europe-west1/" in r.path for r in fake.requests if "Predict" in r.path)


def test_credentials_are_read_from_a_path_inline_json_or_base64(tmp_path, account: tuple[dict, str]) -> None:
    info = account[0]
    path = tmp_path / "sa.json"
    path.write_text(json.dumps(info))
    encoded = base64.b64encode(json.dumps(info).encode()).decode()
    for value in (str(path), json.dumps(info), encoded):
        settings = load_settings({"GCP_CREDENTIALS": value}, env_file=None)
        body = info["private_key"].splitlines()[1]
        assert body in settings.secrets and info["private_key_id"] in settings.secrets
        assert "my-project" not in settings.secrets and info["client_email"] not in settings.secrets
    with pytest.raises(Exception, match="GCP_CREDENTIALS") as caught:
        load_settings({"GCP_CREDENTIALS": json.dumps({"project_id": "p", "private_key": "x"})}, env_file=None)
    assert "client_email" in str(caught.value)


def test_vertex_model_ids() -> None:
    assert vertex_id("claude-sonnet-4-5-20250929") == "claude-sonnet-4-5@20250929"
    assert vertex_id("claude-3-5-haiku-latest") == "claude-3-5-haiku@20241022"
    assert vertex_id("claude-opus-4-6") == "claude-opus-4-6"
    assert vertex_id("claude-haiku-4-5@20251001") == "claude-haiku-4-5@20251001"


def test_a_token_is_minted_again_only_when_it_nears_expiry(account: tuple[dict, str]) -> None:
    import asyncio

    from proxy.providers.cloud_credentials import parse_gcp
    from proxy.providers.gcp.token import TokenCache, TokenRefused

    info, public = account
    now = [1000.0]
    with FakeVertex({EMAIL: GcpAccount(public, "my-project")}) as fake:
        cache = TokenCache(fake.token_url, clock=lambda: now[0])
        entry = parse_gcp(json.dumps(info))[0]

        async def scenario() -> list[str]:
            first = await asyncio.gather(*(cache.token(entry) for _ in range(5)))  # a burst: one mint
            now[0] += 3600 - 301
            second = await cache.token(entry)  # still five minutes and a second left
            now[0] += 2
            third = await cache.token(entry)  # inside the last five minutes: minted again
            return [*first, second, third]

        tokens = asyncio.run(scenario())
        assert len(set(tokens[:6])) == 1 and tokens[6] != tokens[0]
        assert fake.minted == 2
        other, _ = service_account("stranger@my-project.iam.gserviceaccount.com", "my-project")
        with pytest.raises(TokenRefused) as caught:
            asyncio.run(cache.token(parse_gcp(json.dumps(other))[0]))
        assert caught.value.status == 400 and other["private_key_id"] not in str(caught.value)


def test_model_lists_name_the_publishers_claude_models(served: Served) -> None:
    listed = {m.id for m in claude(served).models.list()}
    assert listed == {"claude-3-5-haiku-20241022", "claude-sonnet-4-5-20250929"}
    assert {m.id for m in door(served).models.list()} == listed


def test_the_global_region_uses_vertexs_global_host_and_others_their_own() -> None:
    from proxy.providers.gcp.dialect import DEFAULT_BASE, Vertex

    vertex = Vertex(DEFAULT_BASE, "https://oauth2.googleapis.com/token", "us-east5")
    assert vertex.host("global") == "https://aiplatform.googleapis.com"
    assert vertex.host("europe-west1") == "https://europe-west1-aiplatform.googleapis.com"
    assert Vertex("http://127.0.0.1:9", "http://127.0.0.1:9/token", "global").host("global") == "http://127.0.0.1:9"


def test_a_minted_access_token_an_upstream_quotes_back_never_reaches_the_client(
    served: Served, fake: FakeVertex, caplog: pytest.LogCaptureFixture
) -> None:
    fake.echo_token = True
    try:
        reply = httpx.post(
            served.url + ROOT + "/v1/messages",
            json={"model": "claude-sonnet-4-5", "max_tokens": 10, "messages": HELLO},
            headers={"x-api-key": PROXY_KEY, "anthropic-version": "2023-06-01"},
            timeout=10,
        )
    finally:
        fake.echo_token = False
    token = fake.requests[-1].headers["authorization"].removeprefix("Bearer ")
    assert token.startswith("ya29.") and len(token) > 25
    assert reply.status_code == 400 and "credential" in reply.text
    assert token not in reply.text and token[:20] not in reply.text and "[redacted]" in reply.text
    assert all(token not in record.getMessage() for record in caplog.records)
