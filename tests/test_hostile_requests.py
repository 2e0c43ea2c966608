"""Issue 9, request path: no single request body may freeze, bloat or be altered in transit.

Real sockets: the proxy under uvicorn on loopback, fake upstreams from tests/fakes.py.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from proxy import families
from proxy.keys import pool as pool_module
from proxy.keys.pool import CheckResult, KeyPool, Outcome, Verdict
from tests.conftest import PROXY_KEY, Served
from tests.fakes import FakeAnthropic, FakeOpenAI, KeyBehaviour

ANT = "sk-ant-paid-0123456789"
SONNET = "claude-sonnet-4-20250514"
ADMIN = "admin-key-for-tests-0001"
AUTH = {"authorization": f"Bearer {PROXY_KEY}"}


def one_word_messages(n: int) -> list[dict]:
    return [{"role": "user", "content": "word"} for _ in range(n)]


def door_post(served: Any, payload: Any, *, token: str = PROXY_KEY, timeout: float = 60) -> httpx.Response:
    """POST to the OpenAI-format door to Claude."""
    content = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    return httpx.post(
        f"{served.proxy('anthropic')}/chat/completions",
        content=content,
        headers={"authorization": f"Bearer {token}", "content-type": "application/json"},
        timeout=timeout,
    )


def translations(served: Served) -> list[int]:
    """Counts every translation the door runs from now on (one list entry per call)."""
    pipeline = served.app.proxy_handler.__self__
    door = pipeline.door
    original = door.request
    calls: list[int] = []

    def counting(payload: dict) -> dict:
        calls.append(1)
        return original(payload)

    door.request = counting
    return calls


ROOT = Path(__file__).resolve().parent.parent
# The proxy alone (no page) in a process of its own, so that no test-side thread (client, fake
# upstream) shares its interpreter lock and blurs what /health measures.
SERVE_PROXY = """
import sys, uvicorn
from proxy.config import load_settings
from proxy.server import create_app
uvicorn.run(create_app(load_settings(env_file=None)), host="127.0.0.1", port=int(sys.argv[1]), log_level="warning")
"""
POLL_HEALTH = """
import sys, time, httpx
with httpx.Client(timeout=10) as client:
    print("ready", flush=True)
    while True:
        started = time.perf_counter()
        assert client.get(sys.argv[1]).status_code == 200
        print(time.perf_counter() - started, flush=True)
        time.sleep(0.002)
"""


@dataclass
class ProxyProcess:
    url: str

    def proxy(self, service: str = "openai") -> str:
        return f"{self.url}/proxy/{service}/v1"


@pytest.fixture
def proxy_process(tmp_path: Path) -> Iterator[Callable[..., ProxyProcess]]:
    """A factory: proxy_process(ENV=...) runs the proxy in a subprocess with those settings."""
    processes: list[subprocess.Popen] = []

    def start(**env: str) -> ProxyProcess:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        full = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI", "ANTHROPIC", "PROXY", "ADMIN"))}
        full.update(CHECK_KEYS="false", LOG_LEVEL="warning", DATA_DIR=str(tmp_path / f"data{port}"), **env)
        process = subprocess.Popen([sys.executable, "-c", SERVE_PROXY, str(port)], cwd=ROOT, env=full)
        processes.append(process)
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            assert process.poll() is None, "the proxy exited"
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    return ProxyProcess(url)
            except httpx.HTTPError:
                time.sleep(0.1)
        raise RuntimeError("the proxy did not start")

    yield start
    for process in processes:
        process.kill()
        process.wait(10)


@contextmanager
def health_watch(url: str) -> Iterator[list[float]]:
    """Polls /health from another process for as long as the block runs; then holds the
    latencies (s) seen while the block ran."""
    poller = subprocess.Popen(
        [sys.executable, "-c", POLL_HEALTH, f"{url}/health"], stdout=subprocess.PIPE, text=True, cwd=ROOT
    )
    latencies: list[float] = []
    try:
        assert poller.stdout is not None and poller.stdout.readline().strip() == "ready"
        time.sleep(0.2)
        yield latencies
        time.sleep(0.1)
    finally:
        poller.kill()
        out, _ = poller.communicate(timeout=10)
    latencies.extend(float(line) for line in out.split())


@pytest.fixture
def door(claude_pool: Callable[..., tuple[Served, FakeAnthropic]]) -> tuple[Served, FakeAnthropic]:
    return claude_pool({ANT: KeyBehaviour()}, MAX_MESSAGES="40000")


# 1. Linear work, cheap checks first, limits that name themselves ---------------------------------


def test_200000_one_word_messages_are_refused_at_once_naming_the_limit(
    fake_anthropic: FakeAnthropic, proxy_process: Callable[..., ProxyProcess]
) -> None:
    served = proxy_process(ANTHROPIC_KEY=ANT, ANTHROPIC_BASE_URL=fake_anthropic.base_url, PROXY_KEY=PROXY_KEY)
    payload = json.dumps({"model": SONNET, "messages": one_word_messages(200_000)}).encode()
    for _attempt in range(3):  # the machine is shared: a busy moment elsewhere gets another try
        with health_watch(served.url) as latencies:
            started = time.perf_counter()
            reply = door_post(served, payload)
            elapsed = time.perf_counter() - started
        if max(latencies) < 0.05 and elapsed < 1.0:
            break
    assert reply.status_code == 400
    error = reply.json()["error"]  # the OpenAI shape: this is the OpenAI-format door
    assert error["type"] == "invalid_request_error"
    assert "10000" in error["message"] and "MAX_MESSAGES" in error["message"]
    assert elapsed < 1.0, f"refused after {elapsed:.2f} s"
    assert fake_anthropic.requests == []
    assert max(latencies) < 0.05, f"/health took up to {max(latencies) * 1000:.0f} ms"


def test_a_long_run_of_same_role_messages_is_translated_in_linear_time(
    fake_anthropic: FakeAnthropic, proxy_process: Callable[..., ProxyProcess]
) -> None:
    """The largest request the default limits let through: 10,000 messages of one role."""
    served = proxy_process(ANTHROPIC_KEY=ANT, ANTHROPIC_BASE_URL=fake_anthropic.base_url, PROXY_KEY=PROXY_KEY)
    payload = json.dumps({"model": SONNET, "messages": one_word_messages(10_000)}).encode()
    for _attempt in range(3):  # the machine is shared: a busy moment elsewhere gets another try
        with health_watch(served.url) as latencies:
            started = time.perf_counter()
            reply = door_post(served, payload)
            elapsed = time.perf_counter() - started
        if max(latencies) < 0.05 and elapsed < 1.0:
            break
    assert reply.status_code == 200, reply.text
    [turn] = fake_anthropic.requests[-1].json["messages"]  # 10,000 user messages merged into one turn
    assert len(turn["content"]) == 10_000
    assert elapsed < 1.0, f"answered after {elapsed:.2f} s"
    assert max(latencies) < 0.05, f"/health took up to {max(latencies) * 1000:.0f} ms"


def test_translating_a_run_of_100000_same_role_messages_takes_linear_time() -> None:
    from proxy.providers.anthropic.translate import openai_to_anthropic_request

    messages = one_word_messages(50_000) + [{"role": "tool", "tool_call_id": "c", "content": "r"}] * 50_000
    started = time.perf_counter()
    [turn] = openai_to_anthropic_request({"model": SONNET, "messages": messages})["messages"]
    assert time.perf_counter() - started < 1.0
    assert [b["type"] for b in turn["content"][:1]] == ["tool_result"]  # tool results open the turn
    assert len(turn["content"]) == 100_000


def test_a_rate_limited_caller_with_a_huge_body_never_causes_a_translation(
    claude_pool: Callable[..., tuple[Served, FakeAnthropic]],
) -> None:
    served, fake = claude_pool({ANT: KeyBehaviour()}, MAX_MESSAGES="40000", TEXT_MODEL_RATE_LIMIT="1")
    calls = translations(served)
    assert door_post(served, {"model": SONNET, "messages": one_word_messages(1)}).status_code == 200
    reply = door_post(served, {"model": SONNET, "messages": one_word_messages(30_000)})
    assert reply.status_code == 429
    assert calls == [1] and len(fake.requests) == 1


def test_an_over_quota_user_with_a_huge_body_never_causes_a_translation(
    claude_pool: Callable[..., tuple[Served, FakeAnthropic]],
) -> None:
    served, fake = claude_pool(
        {ANT: KeyBehaviour()}, MAX_MESSAGES="40000", GATEKEEPER="user_token", ADMIN_KEY=ADMIN
    )
    admin = {"authorization": f"Bearer {ADMIN}"}
    created = httpx.post(
        f"{served.url}/admin/api/users", json={"nickname": "bob", "token_limits": {"claude-sonnet": 5}}, headers=admin
    )
    assert created.status_code == 201, created.text
    calls = translations(served)
    reply = door_post(served, {"model": SONNET, "messages": one_word_messages(30_000)}, token=created.json()["token"])
    assert 400 < reply.status_code < 500 and "quota" in reply.json()["error"]["message"].lower()
    assert calls == [] and fake.requests == []


@pytest.mark.parametrize("door_kind", ["door", "messages"])
def test_too_many_content_parts_or_tools_get_a_400_naming_the_limit(
    claude_pool: Callable[..., tuple[Served, FakeAnthropic]], door_kind: str
) -> None:
    served, fake = claude_pool({ANT: KeyBehaviour()}, MAX_CONTENT_PARTS="50", MAX_TOOLS="8")
    parts = [{"type": "text", "text": "x"}] * 51
    if door_kind == "door":
        tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
        url, base = f"{served.proxy('anthropic')}/chat/completions", {"model": SONNET}
    else:
        tool = {"name": "f", "input_schema": {"type": "object"}}
        url, base = f"{served.proxy('anthropic')}/messages", {"model": SONNET, "max_tokens": 10}
    too_many_parts = {**base, "messages": [{"role": "user", "content": parts}]}
    too_many_tools = {**base, "messages": one_word_messages(1), "tools": [tool] * 9}
    for payload, setting in ((too_many_parts, "MAX_CONTENT_PARTS"), (too_many_tools, "MAX_TOOLS")):
        reply = httpx.post(url, json=payload, headers=AUTH, timeout=10)
        assert reply.status_code == 400
        body = reply.json()
        message = body["error"]["message"]
        assert setting in message
        assert (body.get("type") == "error") is (door_kind == "messages")  # each door's own error shape
    assert fake.requests == []


def test_messages_spelled_to_dodge_the_byte_count_are_still_counted(
    claude_pool: Callable[..., tuple[Served, FakeAnthropic]],
) -> None:
    served, fake = claude_pool({ANT: KeyBehaviour()}, MAX_MESSAGES="100")
    messages = ",".join(['{"role" : "user", "content": "w"}'] * 101)
    body = f'{{"model": "{SONNET}", "messages": [{messages}]}}'
    reply = door_post(served, body.encode())
    assert reply.status_code == 400 and "MAX_MESSAGES" in reply.json()["error"]["message"]
    assert fake.requests == []


# 2. Model names ----------------------------------------------------------------------------------


def _cache_entries(*modules: Any) -> int:
    return sum(
        getattr(module, name).cache_info().currsize
        for module in modules
        for name in dir(module)
        if hasattr(getattr(module, name), "cache_info")
    )


def test_model_names_over_256_characters_are_refused_before_any_lookup(
    claude_pool: Callable[..., tuple[Served, FakeAnthropic]], fake_openai: FakeOpenAI, proxy_app: Callable[..., Served]
) -> None:
    served, fake = claude_pool({ANT: KeyBehaviour()})
    entries = _cache_entries(families, pool_module)
    for i in range(10):
        name = f"claude-{i}-" + "x" * 1_000_000
        door = door_post(served, {"model": name, "messages": one_word_messages(1)})
        native = httpx.post(
            f"{served.proxy('anthropic')}/messages",
            json={"model": name, "max_tokens": 5, "messages": one_word_messages(1)},
            headers=AUTH,
            timeout=10,
        )
        for reply in (door, native):
            assert reply.status_code == 400
            assert "256" in reply.json()["error"]["message"]
    assert fake.requests == []
    assert _cache_entries(families, pool_module) == entries  # nothing a client named was cached
    assert all(len(m) <= 256 for k in served.runtime.services["anthropic"].pool.keys for m in k.lost_models)


def test_lookups_never_cache_long_client_strings() -> None:
    entries = _cache_entries(families, pool_module)
    for i in range(200):
        families.family_of(f"gpt-4o-{i}-" + "y" * 300)
    pool = KeyPool("anthropic", [ANT], "ant-")
    key = pool.keys[0]
    pool.checked(key, CheckResult(Verdict.OK, models=frozenset({SONNET, "claude-3-haiku-20240307"})))
    for i in range(200):
        key.serves(f"claude-made-up-{i}")
    assert _cache_entries(families, pool_module) <= entries + 1  # at most the key's one model list
    unlisted = KeyPool("anthropic", [ANT], "ant-").keys[0]
    KeyPool("anthropic", [ANT], "ant-").apply(unlisted, Outcome(Verdict.MODEL_MISSING), "claude-" + "z" * 300)
    assert unlisted.lost_models == frozenset()


def _bytes_written() -> int:
    with open("/proc/self/io") as io:
        return next(int(line.split()[1]) for line in io if line.startswith("wchar:"))


def test_each_model_a_key_lacks_is_saved_as_a_small_write_not_the_whole_set_again(
    claude_pool: Callable[..., tuple[Served, FakeAnthropic]],
) -> None:
    served, fake = claude_pool({ANT: KeyBehaviour()})
    names = [f"claude-missing-{i:03d}-" + "m" * 230 for i in range(200)]
    with httpx.Client(headers=AUTH, timeout=10) as client:
        before = _bytes_written()
        for name in names:
            reply = client.post(
                f"{served.proxy('anthropic')}/messages",
                json={"model": name, "max_tokens": 5, "messages": one_word_messages(1)},
            )
            assert reply.status_code == 404
        written = _bytes_written() - before
    key = served.runtime.services["anthropic"].pool.keys[0]
    assert key.lost_models == set(names)
    # A SQLite page (4 KB) or two per name; rewriting the growing set each time writes ~7.4 MB here.
    assert written < len(names) * 10 * 1024, f"{written} bytes written for {len(names)} lost models"
    # ... and what was learnt is known again after a restart.
    states = served.runtime.access.store.load_key_states("anthropic")
    assert set(states[key.id]["lost_models"]) == set(names)


# 15. Client bugs are the client's 400s -----------------------------------------------------------


LONE_SURROGATE = b'{"model": "%s", "max_tokens": 5, "messages": [{"role": "user", "content": "bad \\ud800 text"}]}'


@pytest.fixture
def both(claude_pool: Callable[..., tuple[Served, FakeAnthropic]]) -> Served:
    served, _ = claude_pool({ANT: KeyBehaviour()})
    return served


def _routes(served: Served) -> list[tuple[str, str, str]]:
    """(url, model, error shape) for the native Claude route and the OpenAI-format door."""
    return [
        (f"{served.proxy('anthropic')}/messages", SONNET, "anthropic"),
        (f"{served.proxy('anthropic')}/chat/completions", SONNET, "openai"),
    ]


def _assert_client_error(reply: httpx.Response, shape: str) -> str:
    assert reply.status_code == 400, reply.text
    body = reply.json()
    if shape == "anthropic":
        assert body["type"] == "error" and body["error"]["type"] == "invalid_request_error"
    else:
        assert body["error"]["type"] == "invalid_request_error"
    return body["error"]["message"]


def test_a_lone_surrogate_in_any_body_is_a_400_without_a_traceback(
    both: Served, fake_openai: FakeOpenAI, proxy_app: Callable[..., Served], caplog: pytest.LogCaptureFixture
) -> None:
    openai_proxy = proxy_app(OPENAI_KEY="sk-paid-0123456789abcdef", OPENAI_BASE_URL=fake_openai.base_url)
    routes = [*_routes(both), (f"{openai_proxy.proxy()}/chat/completions", "gpt-4o", "openai")]
    with caplog.at_level("WARNING"):
        for url, model, shape in routes:
            body = LONE_SURROGATE.replace(b"%s", model.encode())
            reply = httpx.post(url, content=body, headers={**AUTH, "content-type": "application/json"}, timeout=10)
            assert "surrogate" in _assert_client_error(reply, shape)
    assert fake_openai.requests == []
    assert not [r for r in caplog.records if r.levelname in ("ERROR", "CRITICAL") or r.exc_info]


def _deep_schema_text(levels: int) -> str:
    """A JSON schema `levels` objects deep, as text (the stdlib encoder would recurse too far)."""
    return '{"type":"object","properties":{"a":' * (levels // 2) + '{"type":"string"}' + "}}" * (levels // 2)


def test_a_json_schema_nested_1000_deep_is_a_400_naming_the_limit(
    both: Served, caplog: pytest.LogCaptureFixture
) -> None:
    schema = _deep_schema_text(1000)
    with caplog.at_level("WARNING"):
        for url, model, shape in _routes(both):
            if shape == "anthropic":
                tools = f'[{{"name":"f","input_schema":{schema}}}]'
                head = f'{{"model":"{model}","max_tokens":5,'
                text = head + f'"messages":[{{"role":"user","content":"w"}}],"tools":{tools}}}'
            else:
                tools = f'[{{"type":"function","function":{{"name":"f","parameters":{schema}}}}}]'
                text = f'{{"model":"{model}","messages":[{{"role":"user","content":"w"}}],"tools":{tools}}}'
            reply = httpx.post(url, content=text, headers={**AUTH, "content-type": "application/json"}, timeout=10)
            assert "MAX_JSON_DEPTH" in _assert_client_error(reply, shape)
    assert not [r for r in caplog.records if r.levelname in ("ERROR", "CRITICAL") or r.exc_info]


@pytest.mark.parametrize(
    "assistant",
    [
        {"role": "assistant", "content": None, "tool_calls": 5},
        {"role": "assistant", "content": None, "tool_calls": [{"id": "c1", "type": "function", "function": "x"}]},
        {"role": "assistant", "content": None, "tool_calls": [{"id": 7, "type": "function", "function": {"name": 1}}]},
    ],
    ids=["tool_calls-5", "function-x", "non-string-ids"],
)
def test_malformed_tool_calls_on_the_claude_door_are_the_clients_400(
    both: Served, assistant: dict, caplog: pytest.LogCaptureFixture
) -> None:
    messages = [{"role": "user", "content": "weather?"}, assistant, {"role": "user", "content": "well?"}]
    with caplog.at_level("WARNING"):
        reply = door_post(both, {"model": SONNET, "messages": messages})
    message = _assert_client_error(reply, "openai")
    assert "tool_calls" in message or "function" in message
    assert not [r for r in caplog.records if r.levelname in ("ERROR", "CRITICAL") or r.exc_info]


def test_a_tool_choice_with_a_string_function_is_the_clients_400(both: Served) -> None:
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    payload = {
        "model": SONNET,
        "messages": one_word_messages(1),
        "tools": tools,
        "tool_choice": {"type": "function", "function": "f"},
    }
    assert "tool_choice" in _assert_client_error(door_post(both, payload), "openai")


# 16. The conversation travels exactly as sent -----------------------------------------------------


SECRETISH = {"base_url": "http://example.test/v1", "api_key": "not-a-key", "api_base": "x", "extra_headers": {"a": 1}}


def test_tool_history_holding_redirect_named_fields_reaches_claude_unchanged(
    claude_pool: Callable[..., tuple[Served, FakeAnthropic]],
) -> None:
    served, fake = claude_pool({ANT: KeyBehaviour()})
    messages = [
        {"role": "user", "content": "configure the client"},
        {
            "role": "assistant",
            "content": [{"type": "tool_use", "id": "toolu_1", "name": "configure", "input": dict(SECRETISH)}],
        },
        {
            "role": "user",
            "content": [
                {"type": "tool_result", "tool_use_id": "toolu_1", "content": [{"type": "text", "text": "done"}]},
                {"type": "text", "text": "and now?"},
            ],
        },
    ]
    payload = {"model": SONNET, "max_tokens": 5, "messages": messages, "base_url": "http://evil.test"}
    reply = httpx.post(f"{served.proxy('anthropic')}/messages", json=payload, headers=AUTH, timeout=10)
    assert reply.status_code == 200, reply.text
    seen = fake.requests[-1].json
    assert seen["messages"] == messages
    assert "base_url" not in seen


def test_tool_call_arguments_through_the_door_reach_claude_unchanged(
    claude_pool: Callable[..., tuple[Served, FakeAnthropic]],
) -> None:
    served, fake = claude_pool({ANT: KeyBehaviour()})
    messages = [
        {"role": "user", "content": "configure the client"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "configure", "arguments": dict(SECRETISH)}},
                {"id": "c2", "type": "function", "function": {"name": "configure", "arguments": json.dumps(SECRETISH)}},
            ],
        },
        {"role": "tool", "tool_call_id": "c1", "content": json.dumps(SECRETISH)},
        {"role": "tool", "tool_call_id": "c2", "content": "ok"},
    ]
    reply = door_post(served, {"model": SONNET, "messages": messages, "api_key": "sk-client-0000000000"})
    assert reply.status_code == 200, reply.text
    sent = fake.requests[-1].json["messages"]
    assert [block["input"] for block in sent[1]["content"]] == [SECRETISH, SECRETISH]
    assert sent[2]["content"][0] == {"type": "tool_result", "tool_use_id": "c1", "content": json.dumps(SECRETISH)}


def test_every_conversation_route_counts_its_turns(
    claude_pool: Callable[..., tuple[Served, FakeAnthropic]], fake_openai: FakeOpenAI, proxy_app: Callable[..., Served]
) -> None:
    claude, claude_fake = claude_pool({ANT: KeyBehaviour()}, MAX_MESSAGES="5")
    gpt = proxy_app(
        OPENAI_KEY="sk-paid-0123456789abcdef",
        OPENAI_BASE_URL=fake_openai.base_url,
        PROXY_KEY=PROXY_KEY,
        MAX_MESSAGES="5",
    )
    six = one_word_messages(6)
    calls = [
        (f"{gpt.proxy()}/chat/completions", {"model": "gpt-4o", "messages": six}),
        (f"{gpt.proxy()}/responses", {"model": "gpt-4o", "input": six}),
        (f"{claude.proxy('anthropic')}/messages/count_tokens", {"model": SONNET, "messages": six}),
    ]
    for url, payload in calls:
        reply = httpx.post(url, json=payload, headers=AUTH, timeout=10)
        assert reply.status_code == 400, url
        assert "MAX_MESSAGES" in reply.json()["error"]["message"]
    assert fake_openai.requests == [] and claude_fake.requests == []
