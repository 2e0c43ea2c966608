"""A pool of keys that behave differently, through the proxy served for real: clients only see
successes while some key can serve them, /v1/models lists what the live keys serve, /status
tells the truth, and clients learn why when no key can serve them."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import httpx
import pytest
from aiohttp import web

from proxy.keys.checker import KeyChecker
from proxy.keys.pool import Key, KeyState
from proxy.server import build_runtime, create_app
from tests.conftest import Served, make_settings, serve
from tests.fakes import FakeAnthropic, FakeOpenAI, KeyBehaviour

TEXT_DEFAULTS = {m for m in FakeOpenAI.DEFAULT_MODELS if m not in ("dall-e-3", "whisper-1", "tts-1")}
OPENAI_POOL = {
    "sk-paid-000000000000": KeyBehaviour("paid"),
    "sk-trial-00000000000": KeyBehaviour("trial"),
    "sk-revoked-000000000": KeyBehaviour("revoked", models=["gpt-4.5-preview"]),
    "sk-overquota-0000000": KeyBehaviour("over_quota", models=["o1-pro", "gpt-4o"]),
    "sk-ratelimited-00000": KeyBehaviour("rate_limited", reset_s=30),
    "sk-slowlimited-00000": KeyBehaviour("slow_rate_limited"),
    "sk-flaky-00000000000": KeyBehaviour("flaky"),
    "sk-servererror-00000": KeyBehaviour("server_error"),
    "sk-lacking-000000000": KeyBehaviour("paid", models=["gpt-4o-mini", "text-embedding-3-small"]),
}
ANTHROPIC_POOL = {
    "sk-ant-paid-0000000000": KeyBehaviour("paid"),
    "sk-ant-revoked-0000000": KeyBehaviour("revoked"),
    "sk-ant-overquota-00000": KeyBehaviour("over_quota"),
    "sk-ant-ratelimited-000": KeyBehaviour("rate_limited", reset_s=30),
    "sk-ant-flaky-000000000": KeyBehaviour("flaky"),
    "sk-ant-lacking-0000000": KeyBehaviour("trial", models=["claude-3-5-haiku-20241022"]),
}
CHAT = {"messages": [{"role": "user", "content": "Say hello"}], "max_tokens": 20}
CLAUDE = {"messages": [{"role": "user", "content": "Say hello"}], "max_tokens": 20}


def oid(secret: str, prefix: str = "oai-") -> str:
    return prefix + hashlib.sha256(secret.encode()).hexdigest()[:8]


@contextlib.contextmanager
def proxy(tmp_path: Any, *, check: bool, wait: bool = True, **env: str) -> Iterator[Served]:
    """The proxy served on loopback. With `check`, a key checker runs on the server's loop: the
    one the server starts itself if it has one, else one started here the way the server should."""
    settings = make_settings({**env, "CHECK_KEYS": "true" if check else "false"}, tmp_path)
    runtime = build_runtime(settings)
    app = create_app(settings, runtime)
    inner = app.router.lifespan_context

    @contextlib.asynccontextmanager
    async def lifespan(app_: Any) -> AsyncIterator[None]:
        async with inner(app_):
            app.state.loop = asyncio.get_running_loop()
            own = None
            if check and getattr(runtime, "checker", None) is None:
                own = KeyChecker(runtime.services, runtime.get_session, settings)
                await own.start()
            app.state.key_checker = getattr(runtime, "checker", None) or own
            try:
                yield
            finally:
                if own is not None:
                    await own.stop()

    app.router.lifespan_context = lifespan
    with serve(app, settings) as served:
        if check and wait:
            wait_for(lambda: not any(s["checking"] for s in status(served)["keys"].values()))
        yield served


def status(served: Served) -> dict:
    return httpx.get(f"{served.url}/status", timeout=10).json()


def wait_for(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.02)


@pytest.fixture
def openai_fake() -> Iterator[FakeOpenAI]:
    with FakeOpenAI(OPENAI_POOL) as fake:
        yield fake


@pytest.fixture
def anthropic_fake() -> Iterator[FakeAnthropic]:
    with FakeAnthropic(ANTHROPIC_POOL) as fake:
        yield fake


def openai_env(fake: FakeOpenAI, keys: Any = OPENAI_POOL, **extra: str) -> dict[str, str]:
    return {"OPENAI_KEY": ",".join(keys), "OPENAI_BASE_URL": fake.base_url, **extra}


def chat(served: Served, model: str, **extra: Any) -> httpx.Response:
    return httpx.post(f"{served.proxy()}/chat/completions", json={"model": model, **CHAT, **extra}, timeout=30)


# Clients only see successes ----------------------------------------------------------------
@pytest.mark.parametrize("check", [True, False], ids=["checked", "unchecked"])
def test_with_a_mixed_pool_clients_only_get_successful_replies(
    tmp_path: Any, openai_fake: FakeOpenAI, check: bool
) -> None:
    with proxy(tmp_path, check=check, **openai_env(openai_fake)) as served:
        for i in range(12):
            model = ["gpt-4o", "gpt-4o-mini", "gpt-4.1"][i % 3]
            reply = chat(served, model)
            assert reply.status_code == 200, reply.text
            assert reply.json()["choices"][0]["message"]["content"] == f"Hello from fake {model}"
        streamed = chat(served, "gpt-4o", stream=True)
        assert streamed.status_code == 200 and streamed.text.rstrip().endswith("data: [DONE]")
        embedded = httpx.post(
            f"{served.proxy()}/embeddings", json={"model": "text-embedding-3-small", "input": "hi"}, timeout=30
        )
        assert embedded.status_code == 200
    generation = [r for r in openai_fake.requests if r.method == "POST" and r.json.get("max_tokens") != 0]
    dead_or_resting = ["sk-revoked-000000000", "sk-overquota-0000000", "sk-ratelimited-00000", "sk-slowlimited-00000"]
    if check:  # the checker found them out: no client request ever reached them
        assert not {r.key for r in generation} & set(dead_or_resting)
        lacking = {r.json["model"] for r in generation if r.key == "sk-lacking-000000000"}
        assert lacking <= {"gpt-4o-mini", "text-embedding-3-small"}
    else:  # learnt from the first reply of each, then never asked again
        assert [sum(r.key == s for r in generation) for s in dead_or_resting] == [1, 1, 1, 1]


def test_each_key_is_tried_at_most_once_per_request(tmp_path: Any, openai_fake: FakeOpenAI) -> None:
    with proxy(tmp_path, check=False, **openai_env(openai_fake)) as served:
        reply = chat(served, "gpt-4.1")
    assert reply.status_code == 200
    assert max(openai_fake.calls_by_key.values()) == 1


def test_with_a_mixed_claude_pool_clients_only_get_successful_replies(
    tmp_path: Any, anthropic_fake: FakeAnthropic
) -> None:
    env = {"ANTHROPIC_KEY": ",".join(ANTHROPIC_POOL), "ANTHROPIC_BASE_URL": anthropic_fake.base_url}
    with proxy(tmp_path, check=True, **env) as served:
        for model in ["claude-sonnet-4-20250514", "claude-3-5-haiku-20241022", "claude-3-haiku-20240307"] * 3:
            reply = httpx.post(f"{served.proxy('anthropic')}/messages", json={"model": model, **CLAUDE}, timeout=30)
            assert reply.status_code == 200, reply.text
        door = f"{served.proxy('anthropic')}/chat/completions"
        translated = httpx.post(door, json={"model": "claude-opus-4-20250514", **CHAT}, timeout=30)
        assert translated.status_code == 200, translated.text
        keys = status(served)["keys"]["anthropic"]
    assert (keys["revoked"], keys["over_quota"], keys["trial"]) == (1, 1, 1)
    assert keys["families"] == ["claude-haiku", "claude-opus", "claude-sonnet"]


# What /v1/models lists ---------------------------------------------------------------------
def test_the_model_list_is_exactly_what_the_live_keys_can_serve(tmp_path: Any, openai_fake: FakeOpenAI) -> None:
    with proxy(tmp_path, check=True, **openai_env(openai_fake)) as served:
        openai_fake.reset()
        listed = httpx.get(f"{served.proxy()}/models", timeout=10).json()
        again = httpx.get(f"{served.proxy()}/models", timeout=10).json()
    ids = {m["id"] for m in listed["data"]}
    assert ids == TEXT_DEFAULTS  # not the revoked key's gpt-4.5, nor the over-quota key's o1-pro
    assert again == listed
    assert openai_fake.requests == []  # answered from the checks, not asked upstream


def test_the_model_list_honours_allowed_model_families(tmp_path: Any, openai_fake: FakeOpenAI) -> None:
    env = openai_env(openai_fake, ALLOWED_MODEL_FAMILIES="gpt-4o-mini,embeddings")
    with proxy(tmp_path, check=True, **env) as served:
        ids = {m["id"] for m in httpx.get(f"{served.proxy()}/models", timeout=10).json()["data"]}
        families = status(served)["keys"]["openai"]["families"]
    assert ids == {"gpt-4o-mini", "text-embedding-3-small"}
    assert set(families) >= {"gpt-4o-mini", "embeddings"}


def test_without_checks_the_model_list_is_asked_upstream_once_and_kept(tmp_path: Any, openai_fake: FakeOpenAI) -> None:
    keys = ["sk-lacking-000000000", "sk-paid-000000000000"]
    with proxy(tmp_path, check=False, **openai_env(openai_fake, keys)) as served:
        first = httpx.get(f"{served.proxy()}/models", timeout=10)
        second = httpx.get(f"{served.proxy()}/models", timeout=10)
    assert first.status_code == second.status_code == 200
    assert first.json() == second.json() and first.json()["data"]
    assert [r.path for r in openai_fake.requests] == ["/v1/models"]


class SlowProbeOpenAI(FakeOpenAI):
    """FakeOpenAI whose answer to the checker's probe (max_tokens 0) takes `probe_delay` seconds."""

    probe_delay = 1.0

    async def _dispatch(self, request: web.Request) -> web.StreamResponse:
        if request.method == "POST" and (await request.json()).get("max_tokens") == 0:
            await asyncio.sleep(self.probe_delay)
        return await super()._dispatch(request)


def test_before_the_first_check_ends_the_model_list_is_asked_upstream_once(tmp_path: Any) -> None:
    keys = {"sk-paid-000000000000": KeyBehaviour("paid"), "sk-paid-111111111111": KeyBehaviour("paid")}
    with SlowProbeOpenAI(keys) as fake, proxy(tmp_path, check=True, wait=False, **openai_env(fake, keys)) as served:
        assert status(served)["keys"]["openai"]["checking"] is True
        during = [httpx.get(f"{served.proxy()}/models", timeout=10).json() for _ in range(3)]
        assert status(served)["keys"]["openai"]["checking"] is True
        listings = sum(r.path == "/v1/models" for r in fake.requests)
        wait_for(lambda: not status(served)["keys"]["openai"]["checking"])
        fake.reset()
        after = httpx.get(f"{served.proxy()}/models", timeout=10).json()
    assert during[0] == during[1] == during[2] == after
    assert {m["id"] for m in after["data"]} == TEXT_DEFAULTS
    assert listings == len(keys) + 1  # one listing per key by the checker, one for the clients
    assert fake.requests == []


# What /status says -------------------------------------------------------------------------
def test_the_status_tells_the_truth_about_every_kind_of_key(tmp_path: Any, openai_fake: FakeOpenAI) -> None:
    with proxy(tmp_path, check=True, **openai_env(openai_fake)) as served:
        response = httpx.get(f"{served.url}/status", timeout=10)
    body = response.json()["keys"]["openai"]
    for secret in OPENAI_POOL:
        assert secret not in response.text
    counts = {name: body[name] for name in ("total", "active", "revoked", "over_quota", "rate_limited", "unchecked")}
    assert counts == {"total": 9, "active": 6, "revoked": 1, "over_quota": 1, "rate_limited": 2, "unchecked": 1}
    assert body["trial"] == 1 and body["checking"] is False
    rows = {row["id"]: row for row in body["keys"]}
    expect = {
        "sk-paid-000000000000": ("active", "paid"),
        "sk-trial-00000000000": ("active", "trial"),
        "sk-revoked-000000000": ("revoked", "unknown"),
        "sk-overquota-0000000": ("over_quota", "paid"),
        "sk-ratelimited-00000": ("rate_limited", "paid"),
        "sk-slowlimited-00000": ("rate_limited", "paid"),
        "sk-flaky-00000000000": ("active", "paid"),
        "sk-servererror-00000": ("unchecked", "paid"),
        "sk-lacking-000000000": ("active", "paid"),
    }
    assert {oid(s): (rows[oid(s)]["status"], rows[oid(s)]["tier"]) for s in OPENAI_POOL} == {
        oid(s): value for s, value in expect.items()
    }
    assert rows[oid("sk-trial-00000000000")]["limits"] == {"requests": 3, "tokens": 40_000}
    assert rows[oid("sk-lacking-000000000")]["families"] == ["embeddings", "gpt-4o-mini"]
    assert rows[oid("sk-ratelimited-00000")]["locked_until"] > time.time() + 20
    assert "dall-e" not in body["families"] and "gpt-4o" in body["families"]


# When no key can serve ---------------------------------------------------------------------
def test_when_every_suitable_key_is_rate_limited_the_client_gets_429_with_retry_after(
    tmp_path: Any, openai_fake: FakeOpenAI
) -> None:
    keys = ["sk-ratelimited-00000", "sk-revoked-000000000"]
    with proxy(tmp_path, check=False, QUEUE_TIMEOUT="0", **openai_env(openai_fake, keys)) as served:
        first = chat(served, "gpt-4o")
        second = chat(served, "gpt-4o")
    for reply in (first, second):
        assert reply.status_code == 429
        assert 1 <= int(reply.headers["retry-after"]) <= 30
        assert "gpt-4o" in reply.json()["error"]["message"]
    assert openai_fake.calls_by_key["sk-ratelimited-00000"] == 1  # resting: not asked again


def test_when_every_key_is_dead_the_client_gets_503_naming_the_model(tmp_path: Any, openai_fake: FakeOpenAI) -> None:
    keys = ["sk-revoked-000000000", "sk-overquota-0000000"]
    with proxy(tmp_path, check=True, **openai_env(openai_fake, keys)) as served:
        openai_fake.reset()
        reply = chat(served, "gpt-4o")
    assert reply.status_code == 503
    message = reply.json()["error"]["message"]
    assert "gpt-4o" in message and "revoked or out of quota" in message
    assert openai_fake.requests == []


def test_a_model_no_key_has_is_refused_without_asking_upstream(tmp_path: Any, openai_fake: FakeOpenAI) -> None:
    with proxy(tmp_path, check=True, **openai_env(openai_fake)) as served:
        openai_fake.reset()
        reply = chat(served, "gpt-4.5-preview")
    assert reply.status_code == 404
    assert "gpt-4.5-preview" in reply.json()["error"]["message"]
    assert openai_fake.requests == []


def test_a_key_that_lacks_a_model_loses_only_that_model(tmp_path: Any, openai_fake: FakeOpenAI) -> None:
    keys = ["sk-lacking-000000000", "sk-paid-000000000000"]
    with proxy(tmp_path, check=False, **openai_env(openai_fake, keys)) as served:
        replies = [chat(served, "gpt-4o").status_code for _ in range(4)]
        assert chat(served, "gpt-4o-mini").status_code == 200
        rows = {row["id"]: row for row in status(served)["keys"]["openai"]["keys"]}
    assert replies == [200] * 4
    lacking = [r.json["model"] for r in openai_fake.requests if r.key == "sk-lacking-000000000"]
    assert lacking.count("gpt-4o") == 1  # learnt once, then never asked again for it
    assert rows[oid("sk-lacking-000000000")]["status"] == "active"


# Concurrency -------------------------------------------------------------------------------
async def test_under_many_simultaneous_requests_no_dead_key_is_chosen_once_marked(
    tmp_path: Any, openai_fake: FakeOpenAI
) -> None:
    bad = [f"sk-revoked-{i:09d}" for i in range(4)] + [f"sk-overquota-{i:07d}" for i in range(4)]
    for secret in bad:
        openai_fake.keys[secret] = KeyBehaviour("revoked" if "revoked" in secret else "over_quota")
    keys = [*bad, "sk-paid-000000000000", "sk-trial-00000000000"]
    with proxy(tmp_path, check=False, **openai_env(openai_fake, keys)) as served:
        pool = served.runtime.services["openai"].pool
        chosen_dead: list[str] = []
        select = pool.select

        def spy(*args: Any, **kwargs: Any) -> Key | None:
            key = select(*args, **kwargs)
            if key is not None and key.state in (KeyState.REVOKED, KeyState.OVER_QUOTA):
                chosen_dead.append(key.id)
            return key

        pool.select = spy
        async with httpx.AsyncClient(timeout=30) as client:

            async def burst() -> list[int]:
                replies = await asyncio.gather(
                    *(
                        client.post(f"{served.proxy()}/chat/completions", json={"model": "gpt-4o", **CHAT})
                        for _ in range(60)
                    )
                )
                return [r.status_code for r in replies]

            assert await burst() == [200] * 60
            assert all(openai_fake.calls_by_key.get(s, 0) <= 60 for s in bad)
            openai_fake.reset()
            assert await burst() == [200] * 60
        snap = status(served)["keys"]["openai"]
    assert chosen_dead == []
    assert not set(openai_fake.calls_by_key) & set(bad)  # once marked, never asked again
    assert (snap["revoked"], snap["over_quota"], snap["active"]) == (4, 4, 2)


# Known pipeline limits ---------------------------------------------------------------------
def test_one_good_key_among_many_failing_ones_still_serves(tmp_path: Any, openai_fake: FakeOpenAI) -> None:
    failing = [f"sk-servererror-{i:05d}" for i in range(4)]
    for secret in failing:
        openai_fake.keys[secret] = KeyBehaviour("server_error")
    with proxy(tmp_path, check=False, **openai_env(openai_fake, [*failing, "sk-paid-000000000000"])) as served:
        reply = chat(served, "gpt-4o")
    assert reply.status_code == 200, reply.text


def test_a_rate_limited_key_never_shows_the_client_the_upstream_organization(
    tmp_path: Any, openai_fake: FakeOpenAI
) -> None:
    keys = ["sk-servererror-00000", "sk-ratelimited-00000"]  # tried in this order
    with proxy(tmp_path, check=False, QUEUE_TIMEOUT="0", **openai_env(openai_fake, keys)) as served:
        reply = chat(served, "gpt-4o")
    assert "org-secret" not in reply.text
    assert reply.status_code != 429 or "retry-after" in reply.headers


async def test_simultaneous_first_model_lists_ask_upstream_once(tmp_path: Any, openai_fake: FakeOpenAI) -> None:
    with proxy(tmp_path, check=False, **openai_env(openai_fake, ["sk-paid-000000000000"])) as served:
        async with httpx.AsyncClient(timeout=30) as client:
            replies = await asyncio.gather(*(client.get(f"{served.proxy()}/models") for _ in range(10)))
    assert [r.status_code for r in replies] == [200] * 10
    assert [r.path for r in openai_fake.requests] == ["/v1/models"]
