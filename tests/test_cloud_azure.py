"""Azure OpenAI through the proxy: the openai SDK names a model and the proxy picks a deployment that
serves it (learned by the key check), calling the deployment URL with `api-key` and the configured
api-version; streams and usage exact; embeddings on an embeddings deployment; content-filter
refusals readable; keys never echoed; the allow-list."""

from __future__ import annotations

import time
from collections.abc import Iterator

import httpx
import openai
import pytest

from proxy.config import load_settings
from proxy.server import create_app
from tests.conftest import PROXY_KEY, Served, make_settings, serve
from tests.fakes import KeyBehaviour, messages_tokens
from tests.fakes_cloud import FakeAzure

KEY_A = "a1b2c3d4e5f6a7b8c9d0e1f2a3b4c5d6"
KEY_B = "f6e5d4c3b2a1f6e5d4c3b2a1f6e5d4c3"
ROOT = "/proxy/azure/openai/v1"
HELLO = [{"role": "user", "content": "say hello to me"}]
PROMPT = messages_tokens(HELLO)
DEPLOYMENTS = {
    ("res-east", "chat4o"): "gpt-4o-2024-11-20",
    ("res-west", "mini"): "gpt-4o-mini-2024-07-18",
    ("res-west", "embed"): "text-embedding-3-small",
}


@pytest.fixture(scope="module")
def azure(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[FakeAzure, Served]]:
    keys = {"res-east": {KEY_A: KeyBehaviour()}, "res-west": {KEY_B: KeyBehaviour()}}
    with FakeAzure(DEPLOYMENTS, keys) as fake:
        env = {
            "AZURE_CREDENTIALS": f"res-east:chat4o:{KEY_A}, res-west:mini:{KEY_B}, res-west:embed:{KEY_B}",
            "AZURE_ENDPOINT_TEMPLATE": fake.url + "/{resource}",
            "PROXY_KEY": PROXY_KEY,
            "CHECK_KEYS": "true",
        }
        settings = make_settings(env, tmp_path_factory.mktemp("azure"))
        with serve(create_app(settings), settings) as served:
            pool = served.runtime.services["azure"].pool
            deadline = time.monotonic() + 10
            while any(k.last_checked is None for k in pool.keys) and time.monotonic() < deadline:
                time.sleep(0.05)
            yield fake, served


@pytest.fixture
def fake(azure: tuple[FakeAzure, Served]) -> FakeAzure:
    azure[0].reset()
    azure[0].chunks = 5
    return azure[0]


@pytest.fixture
def served(azure: tuple[FakeAzure, Served], fake: FakeAzure) -> Served:
    return azure[1]


def sdk(served: Served) -> openai.OpenAI:
    return openai.OpenAI(base_url=served.url + ROOT, api_key=PROXY_KEY, max_retries=0, timeout=10,
                         http_client=httpx.Client(trust_env=False))  # fmt: skip


def test_the_check_learns_which_model_each_deployment_serves(served: Served) -> None:
    keys = served.runtime.services["azure"].pool.keys
    assert [k.state.value for k in keys] == ["active"] * 3
    assert [set(k.models or ()) for k in keys] == [
        {"chat4o", "gpt-4o-2024-11-20"}, {"mini", "gpt-4o-mini-2024-07-18"}, {"embed", "text-embedding-3-small"},
    ]  # fmt: skip


def test_a_model_goes_to_the_deployment_that_serves_it_with_its_api_key(served: Served, fake: FakeAzure) -> None:
    reply = sdk(served).chat.completions.create(model="gpt-4o-mini", messages=HELLO)
    assert reply.choices[0].message.content == "Hello from fake gpt-4o-mini-2024-07-18"
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (PROMPT, 5)
    sent = fake.requests[-1]
    assert sent.path == "/res-west/openai/deployments/mini/chat/completions?api-version=2024-10-21"
    assert sent.headers["api-key"] == KEY_B and "authorization" not in sent.headers
    reply = sdk(served).chat.completions.create(model="gpt-4o", messages=HELLO)
    assert fake.requests[-1].path.startswith("/res-east/openai/deployments/chat4o/")


def test_streams_relay_chunk_by_chunk_with_exact_usage(served: Served) -> None:
    chunks = list(sdk(served).chat.completions.create(
        model="gpt-4o", messages=HELLO, stream=True, stream_options={"include_usage": True}
    ))  # fmt: skip
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "tok0 tok1 tok2 tok3 tok4 "
    assert (chunks[-1].usage.prompt_tokens, chunks[-1].usage.completion_tokens) == (PROMPT, 5)
    usage = served.runtime.ledger.recent(1)[0]
    assert (usage["service"], usage["tokens_in"], usage["tokens_out"]) == ("azure", PROMPT, 5)


def test_embeddings_go_to_the_embeddings_deployment(served: Served, fake: FakeAzure) -> None:
    reply = sdk(served).embeddings.create(model="text-embedding-3-small", input="one two three")
    assert len(reply.data) == 1 and reply.usage.prompt_tokens == 3
    assert fake.requests[-1].path.startswith("/res-west/openai/deployments/embed/embeddings?")


def test_models_lists_what_the_deployments_serve(served: Served) -> None:
    listed = {m.id for m in sdk(served).models.list()}
    assert {"gpt-4o-2024-11-20", "gpt-4o-mini-2024-07-18", "text-embedding-3-small"} <= listed


def test_a_model_no_deployment_serves_is_a_404_that_reaches_nothing(served: Served, fake: FakeAzure) -> None:
    with pytest.raises(openai.NotFoundError):
        sdk(served).chat.completions.create(model="gpt-5", messages=HELLO)
    assert fake.requests == []


def test_a_content_filter_refusal_says_what_was_flagged(served: Served) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        sdk(served).chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "forbidden-topic"}])
    error = caught.value.body
    assert error["code"] == "content_filter"
    assert "content filter" in error["message"] and "violence (medium)" in error["message"]
    assert served.runtime.services["azure"].pool.keys[0].state.value == "active"  # not the key's fault


@pytest.mark.parametrize(
    ("method", "path"),
    [("POST", "/completions"), ("POST", "/responses"), ("POST", "/images/generations"), ("GET", "/files"),
     ("POST", "/audio/speech"), ("POST", "/../deployments/chat4o/chat/completions")],
)  # fmt: skip
def test_paths_off_the_list_are_404_and_reach_nothing(served: Served, fake: FakeAzure, method: str, path: str):
    with httpx.Client(trust_env=False, timeout=10) as client:
        reply = client.request(method, served.url + ROOT + path, headers={"authorization": f"Bearer {PROXY_KEY}"})
    assert reply.status_code == 404 and "error" in reply.json()
    assert fake.requests == []


def test_a_revoked_key_is_never_echoed_and_never_used_again(tmp_path) -> None:
    keys = {"res-east": {KEY_A: KeyBehaviour("revoked")}}
    with FakeAzure(DEPLOYMENTS, keys) as fake:
        env = {"AZURE_CREDENTIALS": f"res-east:chat4o:{KEY_A}", "AZURE_ENDPOINT_TEMPLATE": fake.url + "/{resource}",
               "PROXY_KEY": PROXY_KEY}  # fmt: skip
        settings = make_settings(env, tmp_path)
        with serve(create_app(settings), settings) as served:
            with pytest.raises(openai.APIStatusError) as caught:
                sdk(served).chat.completions.create(model="gpt-4o", messages=HELLO)
            with pytest.raises(openai.APIStatusError):
                sdk(served).chat.completions.create(model="gpt-4o", messages=HELLO)
            status = httpx.get(served.url + "/status", timeout=10).text
    assert KEY_A in fake.requests[0].headers["api-key"]
    assert len(fake.requests) == 1  # revoked after the first 401
    assert KEY_A not in str(caught.value.body) and KEY_A not in status


def test_credentials_parse_and_only_the_key_part_is_a_secret() -> None:
    settings = load_settings({"AZURE_CREDENTIALS": f"res-east:chat4o:{KEY_A}"}, env_file=None)
    assert KEY_A in settings.secrets
    assert not any("res-east" in s or "chat4o" in s for s in settings.secrets)
    with pytest.raises(Exception, match="AZURE_CREDENTIALS: .*entry 1") as caught:
        load_settings({"AZURE_CREDENTIALS": f"res-east/{KEY_A}"}, env_file=None)
    assert KEY_A not in str(caught.value)


@pytest.mark.parametrize(
    ("name", "value"),
    [("AZURE_API_VERSION", "latest"), ("AZURE_ENDPOINT_TEMPLATE", "ftp://{resource}.example"),
     ("AWS_ENDPOINT_URL", "bedrock.local"), ("GCP_REGION", "us east"), ("GCP_TOKEN_URL", "oauth")],
)  # fmt: skip
def test_a_bad_cloud_setting_stops_the_start_naming_the_variable(name: str, value: str) -> None:
    with pytest.raises(Exception, match=name):
        load_settings({name: value}, env_file=None)
