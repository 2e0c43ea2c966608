"""WORKERS > 1: several processes on one port, one state (Postgres, Redis), one /metrics."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import PAID, PROXY_KEY
from tests.fakes import FakeOpenAI
from tests.instances import start_instance

_names = itertools.count()
CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}


def test_two_workers_serve_one_port_and_a_scrape_counts_both(
    tmp_path: Path, postgres: Any, redis: Any, fake_openai: FakeOpenAI
) -> None:
    env = {
        "OPENAI_KEY": PAID, "OPENAI_BASE_URL": fake_openai.base_url, "PROXY_KEY": PROXY_KEY, "WORKERS": "2",
        "DATABASE_URL": postgres.database(f"workers_{next(_names)}"), "REDIS_URL": redis.url,
    }  # fmt: skip
    instance = start_instance(env, tmp_path)
    try:
        assert len(instance.workers()) == 2
        for _ in range(30):
            with httpx.Client(timeout=30) as client:  # a new connection each time: spread over workers
                reply = client.post(
                    f"{instance.proxy()}/chat/completions", json=CHAT, headers={"Authorization": f"Bearer {PROXY_KEY}"}
                )
            assert reply.status_code == 200
        scraped = httpx.get(f"{instance.url}/metrics", timeout=10).text
        total = sum(
            s.value
            for family in text_string_to_metric_families(scraped)
            for s in family.samples
            if s.name == "proxy_requests_total" and s.labels.get("status") == "200"
        )
        assert total == 30
    finally:
        instance.kill()


def test_several_workers_on_sqlite_refuse_to_start_saying_why(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError) as caught:
        start_instance({"WORKERS": "2"}, tmp_path, timeout=30)
    assert "needs REDIS_URL" in str(caught.value) and "Traceback" not in str(caught.value)
