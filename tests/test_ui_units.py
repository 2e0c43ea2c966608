"""Unit tests for the web UI's pure pieces, its HTTP calls (over httpx.MockTransport) and the
safety of the built page: no secret in /config, no public API endpoint."""

from __future__ import annotations

import json
import time

import gradio as gr
import httpx
import pytest

from ui import CSS, UIContext, build_theme, build_ui
from ui.admin import AdminPanel
from ui.admin_api import mask_token, parse_limits, usage_text, user_body, user_rows
from ui.chat import (
    ERROR_MARK,
    content_text,
    fetch_models,
    make_respond,
    normalise_history,
    pick_model,
    service_for_model,
)
from ui.common import (
    describe_error,
    esc,
    forwarded_headers,
    public_base_url,
    request_base_url,
    space_base_url,
)
from ui.connect import missing_service_note, share_urls, snippets
from ui.keys import key_rows, key_summary
from ui.me import me_summary, quota_rows
from ui.usage import (
    event_rows,
    family_rows,
    label,
    outcome_summary,
    requests_frame,
    series_from_events,
    tokens_frame,
)

OPENAI_SECRET = "sk-live-SECRET-openai-0123456789"
ANTHROPIC_SECRET = "sk-ant-SECRET-anthropic-0123456789"
PROXY_SECRET = "pk-SECRET-proxy-key"
ADMIN_SECRET = "adm-SECRET-admin-key"
USER_TOKEN = "ut-SECRET-user-token-abcdefghijkl"
SECRETS = (OPENAI_SECRET, ANTHROPIC_SECRET, PROXY_SECRET, ADMIN_SECRET, USER_TOKEN)
NOW = 1_764_325_000.0

# Gradio's plot code calls pandas APIs that pandas 3 flags for its next major version.
pytestmark = pytest.mark.filterwarnings("ignore::pandas.errors.Pandas4Warning")


def snapshot() -> dict:
    return {
        "uptime_s": 3725.0,
        "title": "Friends <b>proxy</b>",
        "gatekeeper": "proxy_key",
        "endpoints": {"openai": "http://127.0.0.1:7860/proxy/openai/v1"},
        "keys": {
            "openai": {
                "total": 3,
                "active": 2,
                "revoked": 1,
                "over_quota": 0,
                "rate_limited": 0,
                "trial": 1,
                "checking": False,
                "last_check": NOW - 60,
                "families": ["gpt-4o", "gpt-4o-mini", "<img src=x onerror=alert(1)>"],
                "keys": [
                    {
                        "id": "oai-1a2b3c4d",
                        "status": "active",
                        "tier": "paid",
                        "limits": {"requests": 5000, "tokens": 800000},
                        "families": ["gpt-4o"],
                        "last_checked": NOW - 60,
                        "locked_until": None,
                    },
                    {
                        "id": "oai-9f8e7d6c",
                        "status": "rate_limited",
                        "tier": "tier_3",
                        "limits": {},
                        "families": [],
                        "last_checked": NOW - 5,
                        "locked_until": NOW + 30,
                    },
                ],
            }
        },
        "usage": {
            "requests": 10,
            "tokens_in": 500,
            "tokens_out": 700,
            "by_family": {
                "gpt-4o": {"requests": 7, "tokens_in": 400, "tokens_out": 600},
                "gpt-4o-mini": {"requests": 3, "tokens_in": 100, "tokens_out": 100},
            },
        },
    }


def events() -> list[dict]:
    return [
        {
            "time": NOW - 10,
            "service": "openai",
            "model": "gpt-4o",
            "family": "gpt-4o",
            "streamed": True,
            "tokens_in": 12,
            "tokens_out": 34,
            "latency_ms": 812.4,
            "status": 200,
            "user": "alice",
        },
        {
            "time": NOW - 70,
            "service": "openai",
            "model": "gpt-4o-mini",
            "family": "gpt-4o-mini",
            "streamed": False,
            "tokens_in": 5,
            "tokens_out": 6,
            "latency_ms": 300.0,
            "status": 429,
            "user": None,
            "prompt": "never shown",
        },
    ]


def make_ctx(**overrides) -> UIContext:
    values = dict(
        title="Friends <b>proxy</b>",
        self_url="http://127.0.0.1:7860",
        space_host=None,
        space_id=None,
        services=("openai", "anthropic"),
        auth_mode="proxy_key",
        status=snapshot,
        recent=lambda n: events()[:n],
    )
    values.update(overrides)
    return UIContext(**values)


class FakeRequest:
    def __init__(self, headers: dict[str, str], scheme: str = "http", peer: str = "127.0.0.1") -> None:
        self.headers = headers
        self.url = httpx.URL(f"{scheme}://ignored/")
        self.client = type("Client", (), {"host": peer})()


# ---------------------------------------------------------------- share URLs


@pytest.mark.parametrize(
    ("space_host", "expected"),
    [
        ("me-proxy.hf.space", "https://me-proxy.hf.space"),
        ("me-proxy.hf.space,me-proxy-abc.hf.space", "https://me-proxy.hf.space"),
        (" me-proxy.hf.space , other.hf.space ", "https://me-proxy.hf.space"),
        ("https://me-proxy.hf.space/", "https://me-proxy.hf.space"),
        ("http://localhost:7860,https://x.hf.space", "http://localhost:7860"),
        ("", None),
        (None, None),
        ("javascript://evil", None),
        ("bad host<script>", None),
    ],
)
def test_space_host_gives_https_share_url_from_first_entry(space_host, expected):
    assert space_base_url(space_host) == expected


def test_request_host_and_forwarded_proto_give_share_url():
    assert request_base_url({"host": "proxy.example.com"}) == "http://proxy.example.com"
    assert request_base_url({"host": "proxy.example.com", "x-forwarded-proto": "https"}) == "https://proxy.example.com"
    assert request_base_url({"Host": "10.0.0.5:7860", "X-Forwarded-Proto": "https, http"}) == "https://10.0.0.5:7860"
    assert request_base_url({"host": "[::1]:7860"}, scheme="https") == "https://[::1]:7860"
    assert request_base_url({"host": "evil.com/<script>"}) is None
    assert request_base_url({}) is None


def test_public_url_prefers_space_then_request_then_self_url():
    request = FakeRequest({"host": "192.168.1.9:7860"})
    assert public_base_url(make_ctx(space_host="a.hf.space,b.hf.space"), request) == "https://a.hf.space"
    assert public_base_url(make_ctx(), request) == "http://192.168.1.9:7860"
    assert public_base_url(make_ctx(), FakeRequest({"host": "h:1"}, scheme="https")) == "https://h:1"
    assert public_base_url(make_ctx(), None) == "http://127.0.0.1:7860"
    assert public_base_url(make_ctx(), FakeRequest({"host": "bad host"})) == "http://127.0.0.1:7860"


def test_visitor_identity_comes_from_the_server_and_never_from_the_visitors_own_headers():
    vouch = lambda request: {"x-proxy-client-ip": request.client.host, "x-proxy-internal": "s"}  # noqa: E731
    ctx = make_ctx(client_headers=vouch)
    spoofing = FakeRequest({"x-forwarded-for": "198.51.100.2"}, peer="203.0.113.7")
    assert forwarded_headers(ctx, spoofing) == {"x-proxy-client-ip": "203.0.113.7", "x-proxy-internal": "s"}
    assert forwarded_headers(make_ctx(), spoofing) == {}  # no server hook: nothing is claimed
    assert forwarded_headers(ctx, None) == {}


def test_share_urls_per_service():
    assert share_urls("https://p.hf.space/", ("openai", "anthropic")) == {
        "openai": "https://p.hf.space/proxy/openai/v1",
        "anthropic": "https://p.hf.space/proxy/anthropic/v1",
    }


# ---------------------------------------------------------------- snippets


def test_openai_snippets_use_share_url_and_placeholder_credential(monkeypatch):
    monkeypatch.setenv("PROXY_KEY", PROXY_SECRET)
    items = {s.title: s.code for s in snippets("openai", "https://p.hf.space", "proxy_key")}
    assert set(items) == {"SillyTavern", "OpenAI SDK (Python)", "curl"}
    for code in items.values():
        assert "https://p.hf.space/proxy/openai/v1" in code
        assert PROXY_SECRET not in code
    assert "Chat Completion" in items["SillyTavern"] and "OpenAI" in items["SillyTavern"]
    assert 'api_key="YOUR_PROXY_KEY"' in items["OpenAI SDK (Python)"]
    assert "https://p.hf.space/proxy/openai/v1/chat/completions" in items["curl"]
    assert "Bearer YOUR_PROXY_KEY" in items["curl"]


def test_anthropic_snippets_use_the_right_base_for_each_client():
    items = {s.title: s.code for s in snippets("anthropic", "https://p.hf.space", "user_token")}
    assert "Claude" in items["SillyTavern"]
    assert "https://p.hf.space/proxy/anthropic/v1" in items["SillyTavern"]
    assert 'base_url="https://p.hf.space/proxy/anthropic"' in items["Anthropic SDK"]
    assert 'base_url="https://p.hf.space/proxy/anthropic/v1"' in items["OpenAI SDK (OpenAI format)"]
    assert "https://p.hf.space/proxy/anthropic/v1/messages" in items["curl"]
    assert all("YOUR_USER_TOKEN" in code for title, code in items.items() if title != "SillyTavern")


def test_open_proxy_snippets_need_no_password():
    items = {s.title: s.code for s in snippets("openai", "http://h", "none")}
    assert 'api_key="anything"' in items["OpenAI SDK (Python)"]
    assert "no password" in items["SillyTavern"]


def test_missing_openai_key_explains_how_to_add_it():
    note = missing_service_note("openai")
    assert "OPENAI_KEY" in note and "secret" in note and ".env" in note


# ---------------------------------------------------------------- keys


def test_key_rows_show_ids_status_tier_and_never_secrets():
    rows = key_rows(snapshot()["keys"]["openai"], now=NOW)
    assert [r[0] for r in rows] == ["oai-1a2b3c4d", "oai-9f8e7d6c"]
    assert "active" in rows[0][1] and rows[0][2] == "paid"
    assert "requests: 5,000" in rows[0][4] and "tokens: 800,000" in rows[0][4]
    assert rows[0][5] == "1m 0s ago"
    assert "rate limited" in rows[1][1] and rows[1][2] == "tier_3"
    assert rows[1][6] == "30s left"
    assert not any(secret in json.dumps(rows) for secret in SECRETS)


def test_key_summary_counts_and_escapes_strings():
    text = key_summary("openai", snapshot()["keys"]["openai"], now=NOW)
    assert "3 keys" in text and "active: **2**" in text and "revoked: **1**" in text
    assert "paid: 1" in text and "tier\\_3: 1" in text
    assert "<img" not in text and "&lt;img" in text
    assert key_summary("anthropic", None).endswith("No keys configured.")


# ---------------------------------------------------------------- usage


def test_event_rows_keep_only_safe_fields_with_the_outcome_second():
    rows = event_rows(events())
    assert rows[0][1:] == ["served (200)", "gpt-4o", 12, 34, 812, "yes", "openai", 0]
    assert rows[1][6] == "no" and rows[1][1] == "failed (429)"
    flat = json.dumps(rows)
    assert "alice" not in flat and "never shown" not in flat


def test_family_rows_sorted_with_total():
    rows = family_rows(snapshot()["usage"])
    assert rows == [["gpt-4o", 7, 400, 600], ["gpt-4o-mini", 3, 100, 100], ["Total", 10, 500, 700]]
    assert family_rows(None) == [["Total", 0, 0, 0]]


def test_plot_frames_fill_every_minute_of_the_window_with_zeros_in_24_hour_utc():
    evs = events() + [dict(events()[0], time=NOW - 5)]
    series = series_from_events(evs)
    requests = requests_frame(series, NOW)
    assert list(requests.columns) == ["minute", "outcome", "requests"]
    assert requests["requests"].sum() == 3
    assert requests["minute"].nunique() == 30  # every minute of the window, idle ones at zero
    assert set(requests["outcome"]) == {"served", "failed"}
    assert requests.groupby("outcome")["requests"].sum().to_dict() == {"served": 2, "failed": 1}
    assert requests["minute"].iloc[-1] == label(NOW) == time.strftime("%H:%M", time.gmtime(NOW))
    late = requests_frame(series, 1_764_370_800.0 + 60 * 70)  # 00:10 UTC, the window crosses midnight
    minutes_shown = list(dict.fromkeys(late["minute"]))
    assert [m.strip() for m in minutes_shown][:2] == ["23:41", "23:42"]  # 24-hour labels, no AM/PM
    assert minutes_shown == sorted(minutes_shown)  # sorting the labels as text keeps time order
    tokens = tokens_frame(series, NOW)
    assert set(tokens["direction"]) == {"in", "out"} and tokens["minute"].nunique() == 30
    assert tokens[tokens["direction"] == "in"]["tokens"].sum() == 12 + 5 + 12
    one_minute = tokens_frame(series_from_events(events()[:1]), NOW)
    assert one_minute["tokens"].sum() == 12 + 34  # one minute of data still draws (bars, not a line)
    assert requests_frame([], NOW)["requests"].sum() == 0 and len(requests_frame([], NOW)) == 30


def test_outcome_summary_counts_every_outcome_and_why():
    text = outcome_summary({"served": 5, "refused: wrong key": 2, "refused: model": 1, "failed": 1})
    assert "**5** served" in text
    assert "**3** refused by the proxy (wrong key 2, model 1)" in text
    assert "**1** failed upstream" in text


# ---------------------------------------------------------------- chat history


def test_history_with_strings_parts_and_files_becomes_openai_messages():
    history = [
        {"role": "user", "content": "plain"},
        {"role": "assistant", "content": [{"type": "text", "text": "parts"}]},
        {"role": "user", "content": [{"type": "file", "file": {"path": "/tmp/x/cat.png", "orig_name": "cat.png"}}]},
        {"role": "user", "content": {"path": "/tmp/y/notes.txt"}},
        {"role": "assistant", "content": "thinking", "metadata": {"title": "Thought"}},
        {"role": "assistant", "content": "partial\n\n" + ERROR_MARK + "**Stopped by an error:** x"},
        {"role": "assistant", "content": ERROR_MARK + "**Not authorised**"},
        {"role": "tool", "content": "ignored"},
    ]
    assert normalise_history(history, "next") == [
        {"role": "user", "content": "plain"},
        {"role": "assistant", "content": "parts"},
        {"role": "user", "content": "[attached file: cat.png]\n\n[attached file: notes.txt]"},
        {"role": "assistant", "content": "partial"},
        {"role": "user", "content": "next"},
    ]


def test_content_text_handles_every_shape():
    assert content_text(None) == ""
    assert content_text([{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]) == "a\nb"
    assert content_text({"type": "component", "component": "image"}) == "[image]"


def test_claude_models_take_the_anthropic_door():
    assert service_for_model("claude-3-5-sonnet-latest", ("openai", "anthropic")) == "anthropic"
    assert service_for_model("claude-3-5-sonnet-latest", ("openai",)) == "openai"
    assert service_for_model("gpt-4o", ("openai", "anthropic")) == "openai"


# ---------------------------------------------------------------- chat over HTTP


def sse(*chunks: dict | str) -> bytes:
    lines = [f"data: {c if isinstance(c, str) else json.dumps(c)}\n\n" for c in chunks]
    return "".join(lines).encode()


def delta(text: str) -> dict:
    return {"choices": [{"index": 0, "delta": {"content": text}}]}


async def collect(agen) -> list[str]:
    return [item async for item in agen]


async def test_chat_streams_through_the_proxy_with_the_typed_credential():
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        body = sse(delta("Hel"), delta("lo"), "[DONE]")
        return httpx.Response(200, headers={"content-type": "text/event-stream"}, content=body)

    vouch = lambda request: {"x-proxy-client-ip": request.client.host}  # noqa: E731
    respond = make_respond(make_ctx(transport=httpx.MockTransport(handler), client_headers=vouch))
    visitor = FakeRequest({"x-forwarded-for": "198.51.100.9"}, peer="203.0.113.7")
    out = await collect(
        respond("hi", [{"role": "user", "content": "before"}], "claude-3-5-haiku", "typed-key", visitor)
    )
    assert out == ["Hel", "Hello"]
    request = seen[0]
    assert str(request.url) == "http://127.0.0.1:7860/proxy/anthropic/v1/chat/completions"
    assert request.headers["authorization"] == "Bearer typed-key"
    assert request.headers["x-proxy-client-ip"] == "203.0.113.7"
    assert "x-forwarded-for" not in request.headers
    sent = json.loads(request.content)
    assert sent["stream"] is True and sent["model"] == "claude-3-5-haiku"
    assert sent["messages"] == [{"role": "user", "content": "before\n\nhi"}]


async def test_chat_shows_proxy_errors_readably_and_escaped():
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(401, json={"error": {"message": "bad key <script>alert(1)</script>"}})

    respond = make_respond(make_ctx(transport=httpx.MockTransport(handler)))
    (reply,) = await collect(respond("hi", [], "gpt-4o", "wrong"))
    assert reply.startswith(ERROR_MARK) and "401" in reply
    assert "<script>" not in reply and "&lt;script&gt;" in reply


async def test_chat_reports_mid_stream_errors_after_the_partial_reply():
    def handler(request: httpx.Request) -> httpx.Response:
        body = sse(delta("part"), {"error": {"message": "upstream went away"}})
        return httpx.Response(200, headers={"content-type": "text/event-stream"}, content=body)

    respond = make_respond(make_ctx(transport=httpx.MockTransport(handler)))
    out = await collect(respond("hi", [], "gpt-4o", "k"))
    assert out[0] == "part"
    assert out[-1].startswith("part\n\n" + ERROR_MARK) and "upstream went away" in out[-1]


async def test_chat_needs_a_credential_and_a_model_before_calling():
    def handler(request: httpx.Request) -> httpx.Response:  # pragma: no cover - must not be called
        raise AssertionError("no request expected")

    respond = make_respond(make_ctx(transport=httpx.MockTransport(handler)))
    assert "proxy key" in (await collect(respond("hi", [], "gpt-4o", "")))[0]
    assert "model" in (await collect(respond("hi", [], "", "k")))[0]


async def test_chat_survives_an_unreachable_server():
    def handler(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused")

    respond = make_respond(make_ctx(transport=httpx.MockTransport(handler)))
    (reply,) = await collect(respond("hi", [], "gpt-4o", "k"))
    assert "Could not reach the proxy" in reply


async def test_models_are_listed_with_the_typed_credential():
    seen = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append((request.url.path, request.headers.get("authorization")))
        if "anthropic" in request.url.path:
            return httpx.Response(200, json={"data": [{"id": "claude-3-5-haiku", "type": "model"}]})
        return httpx.Response(200, json={"object": "list", "data": [{"id": "gpt-4o"}, {"id": "gpt-4o-mini"}]})

    models, note = await fetch_models(make_ctx(transport=httpx.MockTransport(handler)), "typed")
    assert models == ["gpt-4o", "gpt-4o-mini", "claude-3-5-haiku"]
    assert seen == [("/proxy/openai/v1/models", "Bearer typed"), ("/proxy/anthropic/v1/models", "Bearer typed")]
    assert "3 models" in note


async def test_a_refused_model_list_offers_nothing_and_says_why():
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(401, json={"error": {"message": "nope"}})

    models, note = await fetch_models(make_ctx(transport=httpx.MockTransport(handler)), "bad")
    assert models == [] and "401" in note


def test_the_preselected_model_is_a_chat_model_the_proxy_lists():
    listed = ["dall-e-3", "ft:gpt-4o-mini:org::abc", "gpt-4", "gpt-4o-mini", "text-embedding-3-small"]
    assert pick_model(listed, None) == "gpt-4o-mini"
    assert pick_model(listed, "gpt-4") == "gpt-4"  # the visitor's own choice stays
    assert pick_model(["text-embedding-3-small", "o3-mini"], "gone-model") == "o3-mini"
    assert pick_model(["text-embedding-3-small"], None) is None


# ---------------------------------------------------------------- admin


def test_user_rows_mask_tokens_and_show_usage():
    user = {
        "token": USER_TOKEN,
        "nickname": "<b>alice</b>",
        "type": "normal",
        "created_at": NOW - 3600,
        "last_used_at": NOW - 120,
        "disabled": True,
        "disabled_reason": "spam",
        "expires_at": None,
        "token_limits": {"gpt-4o": 100000},
        "token_counts": {"gpt-4o": 1234, "claude": 5},
        "prompt_count": 7,
        "ips": ["1.2.3.4", "5.6.7.8"],
    }
    (row,) = user_rows([user], now=NOW)
    assert row[0] == mask_token(USER_TOKEN) == USER_TOKEN[:6] + "…"
    assert USER_TOKEN not in json.dumps(row)
    assert row[1] == "<b>alice</b>"  # shown as plain text by the Dataframe, never as HTML
    assert row[3] == "disabled: spam" and row[4] == 7 and row[6] == 2
    assert usage_text(user) == "claude: 5 / ∞; gpt-4o: 1,234 / 100,000"


def test_parse_limits_accepts_pairs_and_json():
    assert parse_limits("gpt-4o=100000, claude: 5000\nother=1_000") == {"gpt-4o": 100000, "claude": 5000, "other": 1000}
    assert parse_limits('{"gpt-4o": 10}') == {"gpt-4o": 10}
    assert parse_limits("") == {}
    for bad in ("gpt-4o", '{"gpt-4o": -1}', "{nope"):
        with pytest.raises(ValueError):
            parse_limits(bad)


def test_user_body_sends_only_filled_fields():
    assert user_body(nickname=" bob ", user_type="temporary", max_ips=0, expires_hours=2, now=NOW) == {
        "nickname": "bob",
        "type": "temporary",
        "expires_at": NOW + 7200,
    }
    assert user_body(limits_text="gpt-4o=5", max_ips=3) == {"token_limits": {"gpt-4o": 5}, "max_ips": 3}
    assert user_body() == {}
    with pytest.raises(ValueError):
        user_body(user_type="root")


class AdminServer:
    """A fake admin API that checks the key like the real one."""

    def __init__(self) -> None:
        self.users: dict[str, dict] = {}
        self.calls: list[tuple[str, str, str | None]] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.calls.append((request.method, request.url.path, request.headers.get("authorization")))
        if request.headers.get("authorization") != f"Bearer {ADMIN_SECRET}":
            return httpx.Response(401, json={"error": {"message": "needs the admin key"}})
        path = request.url.path.removeprefix("/admin/api")
        if path == "/users" and request.method == "POST":
            body = json.loads(request.content)
            user = {"token": USER_TOKEN, "nickname": body.get("nickname"), "type": body.get("type", "normal")}
            self.users[USER_TOKEN] = user
            return httpx.Response(201, json=user)
        if path == "/users":
            return httpx.Response(200, json={"users": list(self.users.values())})
        if path == "/keys/recheck":
            return httpx.Response(202, json={"status": "recheck started"})
        return httpx.Response(404, json={"error": {"message": "not found"}})


def admin_panel(server: AdminServer) -> AdminPanel:
    with gr.Blocks():
        return AdminPanel(make_ctx(transport=httpx.MockTransport(server)))


def values_of(update: dict) -> str:
    return json.dumps({str(k): getattr(v, "value", v) for k, v in update.items()}, default=str)


async def test_admin_actions_send_the_typed_key_and_get_nothing_without_it():
    server = AdminServer()
    panel = admin_panel(server)
    denied = await panel.create("wrong-key", "bob", "normal", "", 0, 0)
    assert denied[panel.status] == "Wrong admin key."
    assert USER_TOKEN not in values_of(denied)
    assert (await panel.unlock(""))[panel.status] == "Wrong admin key."
    assert (await panel.recheck("nope"))[panel.status] == "Wrong admin key."
    assert server.users == {}
    assert all(auth in (None, "Bearer wrong-key", "Bearer nope") for _, _, auth in server.calls)


async def test_new_token_is_shown_once_and_the_list_is_masked():
    server = AdminServer()
    panel = admin_panel(server)
    unlocked = await panel.unlock(ADMIN_SECRET)
    assert unlocked[panel.status].startswith("Unlocked")
    created = await panel.create(ADMIN_SECRET, "<b>bob</b>", "normal", "gpt-4o=10", 0, 0)
    assert created[panel.new_token].value == USER_TOKEN
    assert "&lt;b&gt;bob&lt;/b&gt;" in created[panel.status]
    assert USER_TOKEN not in created[panel.table].to_json()
    assert created[panel.tokens] == [USER_TOKEN]  # gr.State: kept on the server, never sent
    cleared = panel.clear_new_token()
    assert cleared[panel.new_token].value == ""
    listed = await panel.refresh(ADMIN_SECRET)
    assert USER_TOKEN not in values_of({k: v for k, v in listed.items() if k is not panel.tokens})
    assert ADMIN_SECRET not in values_of(listed)
    assert (await panel.recheck(ADMIN_SECRET))[panel.status].startswith("Key check started")


# ---------------------------------------------------------------- my usage


def test_my_usage_uses_server_quota_and_never_echoes_the_token():
    me = {
        "token": USER_TOKEN[:6] + "…",
        "nickname": "<i>carol</i>",
        "type": "normal",
        "expires_at": None,
        "token_limits": {"gpt-4o": 1000},
        "token_counts": {"gpt-4o": 250, "claude": 10},
        "prompt_count": 3,
        "ip_count": 2,
        "max_ips": 3,
        "quota": {"gpt-4o": {"limit": 1000, "used": 250, "in_progress": 50, "remaining": 700}},
        "quota_exempt": False,
        "quota_refresh": "daily",
        "quota_refills_at": NOW + 600,
    }
    assert quota_rows(me) == [["claude", "10", "unlimited", "unlimited"], ["gpt-4o", "250", "1,000", "700"]]
    summary = me_summary(me, now=NOW)
    assert "&lt;i&gt;carol&lt;/i&gt;" in summary and "<i>" not in summary
    assert "2 of 3" in summary and "refill daily" in summary
    assert USER_TOKEN not in summary


# ---------------------------------------------------------------- escaping


def test_escape_neutralises_html_and_markdown():
    text = esc("<script>alert(1)</script> *bold* [link](http://x) & `code`")
    assert "<" not in text and ">" not in text
    assert "\\*bold\\*" in text and "\\[link\\]\\(http://x\\)" in text and "&amp;" in text
    assert "&lt;script&gt;" in describe_error(502, {"error": {"message": "<script>"}})


# ---------------------------------------------------------------- the whole page


@pytest.fixture
def secret_env(monkeypatch):
    for name, value in (
        ("OPENAI_KEY", OPENAI_SECRET),
        ("ANTHROPIC_KEY", ANTHROPIC_SECRET),
        ("PROXY_KEY", PROXY_SECRET),
        ("ADMIN_KEY", ADMIN_SECRET),
    ):
        monkeypatch.setenv(name, value)


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"space_host": "me-proxy.hf.space,alt.hf.space", "space_id": "me/proxy", "auth_mode": "user_token"},
        {"services": (), "auth_mode": "none", "status": dict, "recent": lambda n: []},
        {"services": ("anthropic",)},
    ],
)
def test_page_builds_without_secrets_in_config_or_public_endpoints(secret_env, overrides):
    demo = build_ui(make_ctx(**overrides))
    config = json.dumps(demo.get_config_file(), default=str)
    assert not any(secret in config for secret in SECRETS)
    api = demo.get_api_info()
    assert api["named_endpoints"] == {} and api["unnamed_endpoints"] == {}
    assert all(fn.api_visibility != "public" for fn in demo.fns.values())


def test_page_has_the_elements_browser_tests_look_for():
    demo = build_ui(make_ctx())
    ids = {getattr(block, "elem_id", None) for block in demo.blocks.values()}
    expected = {
        "share-url-openai",
        "share-url-anthropic",
        "keys-table-openai",
        "keys-table-anthropic",
        "usage-table",
        "chat-model",
        "chat-credential",
    }
    assert expected <= ids
    assert isinstance(build_theme(), gr.themes.Base) and ".service-card" in CSS


def test_page_without_openai_says_how_to_add_the_key():
    demo = build_ui(make_ctx(services=("anthropic",)))
    config = json.dumps(demo.get_config_file(), default=str)
    assert "OPENAI_KEY" in config
    assert "share-url-openai" not in config and "share-url-anthropic" in config


def test_live_refresh_outputs_hold_no_secret(secret_env):
    ctx = make_ctx()
    demo = build_ui(ctx)
    refresh = next(fn.fn for fn in demo.fns.values() if getattr(fn.fn, "__name__", "") == "refresh")
    values = refresh()
    flat = json.dumps([v.to_dict() if hasattr(v, "to_dict") else v for v in values], default=str)
    assert "oai-1a2b3c4d" in flat and "1h 2m" in flat
    assert not any(secret in flat for secret in SECRETS)
    assert "<b>proxy</b>" not in flat


def test_times_are_relative_to_now():
    assert key_rows({"keys": [{"id": "k", "last_checked": time.time() - 5}]})[0][5].endswith("s ago")
