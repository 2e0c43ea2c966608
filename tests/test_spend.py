"""Spend caps per service: MAX_OUTPUT_TOKENS_<SERVICE> clamps what reaches the upstream;
MAX_CONTEXT_TOKENS_<SERVICE> refuses an oversized request, naming both numbers, before any
upstream call. Both off by default."""

from __future__ import annotations

import re

import anthropic
import httpx
import openai
import pytest

from proxy.access.tokens import count_prompt
from tests.conftest import PAID, PROXY_KEY, Served
from tests.fakes import FakeAnthropic, FakeOpenAI

ANT_KEY = "sk-ant-paid-0123456789"
HAIKU = "claude-3-5-haiku-20241022"


def chat(served: Served, **body) -> httpx.Response:
    payload = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hello"}], **body}
    return httpx.post(
        f"{served.proxy()}/chat/completions", json=payload, headers={"authorization": f"Bearer {PROXY_KEY}"}, timeout=10
    )


def sent(fake: FakeOpenAI | FakeAnthropic) -> dict:
    generation = [r for r in fake.requests if r.method == "POST"]
    return generation[-1].json


def test_output_caps_clamp_what_reaches_the_upstream(proxy_app, fake_openai: FakeOpenAI, fake_anthropic) -> None:
    served = proxy_app(
        OPENAI_KEY=PAID, OPENAI_BASE_URL=fake_openai.base_url, ANTHROPIC_KEY=ANT_KEY,
        ANTHROPIC_BASE_URL=fake_anthropic.base_url, PROXY_KEY=PROXY_KEY,
        MAX_OUTPUT_TOKENS_OPENAI="100", MAX_OUTPUT_TOKENS_ANTHROPIC="64",
    )  # fmt: skip
    assert chat(served, max_tokens=500).status_code == 200
    assert sent(fake_openai)["max_tokens"] == 100
    assert chat(served, max_completion_tokens=50).status_code == 200
    assert sent(fake_openai)["max_completion_tokens"] == 50
    assert chat(served).status_code == 200  # none asked: the cap is set
    assert sent(fake_openai)["max_completion_tokens"] == 100

    claude = httpx.post(
        f"{served.proxy('anthropic')}/messages",
        json={"model": HAIKU, "max_tokens": 1000, "messages": [{"role": "user", "content": "hi"}]},
        headers={"x-api-key": PROXY_KEY, "anthropic-version": "2023-06-01"},
    )
    assert claude.status_code == 200 and sent(fake_anthropic)["max_tokens"] == 64
    door = openai.OpenAI(base_url=served.proxy("anthropic"), api_key=PROXY_KEY, max_retries=0)
    door.chat.completions.create(model=HAIKU, messages=[{"role": "user", "content": "hi"}])  # default 4096
    assert sent(fake_anthropic)["max_tokens"] == 64


def test_context_cap_refuses_with_both_numbers_before_any_upstream_call(proxy_app, fake_anthropic) -> None:
    served = proxy_app(
        ANTHROPIC_KEY=ANT_KEY, ANTHROPIC_BASE_URL=fake_anthropic.base_url, PROXY_KEY=PROXY_KEY,
        MAX_CONTEXT_TOKENS_ANTHROPIC="300",
    )  # fmt: skip
    client_ = anthropic.Anthropic(base_url=f"{served.url}/proxy/anthropic", api_key=PROXY_KEY, max_retries=0)
    long_prompt = "word " * 400
    with pytest.raises(anthropic.BadRequestError) as refused:
        client_.messages.create(model=HAIKU, max_tokens=100, messages=[{"role": "user", "content": long_prompt}])
    message = refused.value.body["error"]["message"]
    numbers = re.search(r"needs (\d+) tokens \((\d+) of prompt \+ (\d+) of output\).*limit of (\d+)", message)
    assert numbers is not None, message
    total, prompt, output, cap = map(int, numbers.groups())
    assert (output, cap) == (100, 300) and total == prompt + output > cap
    sent_payload = {"model": HAIKU, "max_tokens": 100, "messages": [{"role": "user", "content": long_prompt}]}
    assert prompt == count_prompt(sent_payload, bound=600, claude=True)  # the quotas' own tokenizer
    assert fake_anthropic.requests == []
    fine = client_.messages.create(model=HAIKU, max_tokens=100, messages=[{"role": "user", "content": "hi"}])
    assert fine.content


def test_spend_caps_are_off_by_default(shared) -> None:
    fake, served = shared
    fake.reset()
    assert chat(served, max_tokens=50_000, messages=[{"role": "user", "content": "word " * 5000}]).status_code == 200
    body = sent(fake)
    assert body["max_tokens"] == 50_000 and "max_completion_tokens" not in body


def test_the_responses_api_output_is_clamped_too(proxy_app, fake_openai: FakeOpenAI) -> None:
    served = proxy_app(
        OPENAI_KEY=PAID, OPENAI_BASE_URL=fake_openai.base_url, PROXY_KEY=PROXY_KEY, MAX_OUTPUT_TOKENS="40"
    )
    client = openai.OpenAI(base_url=served.proxy(), api_key=PROXY_KEY, max_retries=0)
    client.responses.create(model="gpt-4o", input="hello", max_output_tokens=500)
    assert sent(fake_openai)["max_output_tokens"] == 40
    client.responses.create(model="gpt-4o", input="hello")
    assert sent(fake_openai)["max_output_tokens"] == 40
