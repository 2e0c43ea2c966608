"""Prompt logging: off by default; with PROMPT_LOGGING=true, prompts and replies (streamed or
not) reach a private dataset on a fake Hub as JSONL, batched, and every visitor is told."""

from __future__ import annotations

import json
import time

import httpx
import openai
import pytest

import proxy.promptlog
from tests.conftest import PAID, PROXY_KEY, serve
from tests.fakes import FakeOpenAI
from tests.test_backup import HF_TOKEN, FakeHub
from ui.blocks import header_markdown
from ui.common import UIContext

pytestmark = pytest.mark.filterwarnings("ignore:Use 'content=<...>':DeprecationWarning")
REPO = "friend/prompt-logs"


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch):
    fake = FakeHub()
    with serve(fake.app, None) as served:  # type: ignore[arg-type]
        monkeypatch.setattr(proxy.promptlog, "HUB_ENDPOINT", served.url)
        yield fake


def logged_records(hub: FakeHub, count: int, timeout: float = 10.0) -> list[dict]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        files = hub.repos.get(REPO, {})
        records = [json.loads(line) for data in files.values() for line in data.decode().splitlines()]
        if len(records) >= count:
            return records
        time.sleep(0.05)
    raise AssertionError(f"only {hub.repos.get(REPO)} logged")


def test_prompts_and_replies_reach_a_private_dataset_in_batches_and_visitors_are_told(
    proxy_app, fake_openai: FakeOpenAI, hub: FakeHub
) -> None:
    served = proxy_app(
        OPENAI_KEY=PAID,
        OPENAI_BASE_URL=fake_openai.base_url,
        PROXY_KEY=PROXY_KEY,
        PROMPT_LOGGING="true",
        PROMPT_LOGGING_REPO=REPO,
        HF_TOKEN=HF_TOKEN,
        PROMPT_LOGGING_INTERVAL="0.3",
    )
    status = httpx.get(f"{served.url}/status").json()
    assert status["prompt_logging"] is True and "logged" in status["notice"]

    client = openai.OpenAI(base_url=served.proxy(), api_key=PROXY_KEY, max_retries=0)
    plain = client.chat.completions.create(
        model="gpt-4o", messages=[{"role": "user", "content": f"first question, my key is {PAID}"}]
    )
    streamed = "".join(
        chunk.choices[0].delta.content or ""
        for chunk in client.chat.completions.create(
            model="gpt-4o", messages=[{"role": "user", "content": "second question"}], stream=True
        )
        if chunk.choices
    )
    answered = client.responses.create(model="gpt-4o", input="third question")
    with client.responses.stream(model="gpt-4o", input="fourth question") as events:
        fourth = events.get_final_response().output_text
    records = sorted(logged_records(hub, 4), key=lambda r: r["time"])
    assert hub.private[REPO] is True
    assert all(path.startswith("prompts/") and path.endswith(".jsonl") for path in hub.repos[REPO])
    first, second, third, last = records
    assert third["request"]["input"] == "third question" and third["reply"] == answered.output_text
    assert last["reply"] == fourth and fourth and last["endpoint"] == "responses"
    assert first["request"]["messages"][0]["content"].startswith("first question, my key is ")
    assert PAID not in json.dumps(records)  # a provider key inside a prompt is redacted
    assert first["reply"] == plain.choices[0].message.content and first["reply"]
    assert second["request"]["messages"][0]["content"] == "second question"
    assert second["reply"] == streamed and streamed
    assert first["model"] == "gpt-4o" and first["service"] == "openai"


def test_prompt_logging_is_off_by_default_and_the_page_says_so_only_when_on(shared) -> None:
    fake, served = shared
    assert httpx.get(f"{served.url}/status").json()["prompt_logging"] is False
    assert served.runtime.owner.prompts is None
    ctx = UIContext(
        title="t", self_url="", space_host=None, space_id=None, services=("openai",), auth_mode="none",
        status=dict, recent=lambda n: [],
    )  # fmt: skip
    assert "logged" not in header_markdown(ctx, {"prompt_logging": False})
    notice = header_markdown(ctx, {"prompt_logging": True, "notice": proxy.promptlog.NOTICE})
    assert proxy.promptlog.NOTICE in notice


def test_prompt_logging_needs_a_repo_and_a_token() -> None:
    from proxy.config import ConfigError, load_settings

    with pytest.raises(ConfigError, match="PROMPT_LOGGING_REPO"):
        load_settings({"PROMPT_LOGGING": "true"}, env_file=None)
