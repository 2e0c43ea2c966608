"""Prometheus metrics at /metrics: outcomes, tokens, latencies and key states, behind METRICS_KEY."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import PAID, PROXY_KEY

ROOT = Path(__file__).resolve().parents[1]
CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}


def samples(text: str) -> dict[tuple[str, tuple], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def value(found: dict, name: str, **labels: str) -> float:
    """The sum of the samples named `name` whose labels include `labels`."""
    return sum(v for (n, ls), v in found.items() if n == name and set(labels.items()) <= set(ls))


def test_requests_tokens_latencies_and_key_states_are_counted(proxy_app: Any, fake_openai: Any) -> None:
    served = proxy_app(OPENAI_KEY=PAID, OPENAI_BASE_URL=fake_openai.base_url, PROXY_KEY=PROXY_KEY)
    auth = {"Authorization": f"Bearer {PROXY_KEY}"}
    url = f"{served.proxy()}/chat/completions"
    assert httpx.post(url, json=CHAT, headers=auth).status_code == 200
    with httpx.stream("POST", url, json={**CHAT, "stream": True}, headers=auth) as streamed:
        assert streamed.status_code == 200
        streamed.read()
    assert httpx.post(url, json=CHAT, headers={"Authorization": "Bearer wrong"}).status_code == 401

    response = httpx.get(f"{served.url}/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    found = samples(response.text)
    ok = {"service": "openai", "family": "gpt-4o-mini", "status": "200", "user_type": "proxy_key"}
    assert value(found, "proxy_requests_total", **ok) == 2
    assert value(found, "proxy_requests_total", service="openai", status="401") == 1
    assert value(found, "proxy_tokens_total", service="openai", direction="in") > 0
    assert value(found, "proxy_tokens_total", service="openai", direction="out") > 0
    assert value(found, "proxy_request_seconds_count", service="openai", streamed="true") == 1
    assert value(found, "proxy_request_seconds_count", service="openai", streamed="false") == 2
    assert value(found, "proxy_upstream_seconds_count", service="openai") == 2
    assert value(found, "proxy_added_seconds_count", service="openai") == 2
    assert value(found, "proxy_time_to_first_byte_seconds_count", service="openai") == 1
    assert value(found, "proxy_streams_in_flight", service="openai") == 0
    assert value(found, "proxy_keys", service="openai", state="active") + value(
        found, "proxy_keys", service="openai", state="unchecked"
    ) == 1
    assert value(found, "proxy_queue_length", service="openai", family="gpt-4o-mini") == 0  # none waits now
    assert value(found, "proxy_queue_wait_seconds_count", service="openai") == 2  # each went through the line
    assert PAID not in response.text and PROXY_KEY not in response.text


def test_with_a_metrics_key_only_its_bearer_may_scrape(proxy_app: Any, fake_openai: Any) -> None:
    served = proxy_app(OPENAI_KEY=PAID, OPENAI_BASE_URL=fake_openai.base_url, METRICS_KEY="scrape-secret-77")
    assert httpx.get(f"{served.url}/metrics").status_code == 401
    assert httpx.get(f"{served.url}/metrics", headers={"Authorization": "Bearer nope"}).status_code == 401
    allowed = httpx.get(f"{served.url}/metrics", headers={"Authorization": "Bearer scrape-secret-77"})
    assert allowed.status_code == 200 and "proxy_requests_total" in allowed.text


def test_with_several_workers_a_scrape_of_any_one_counts_them_all(tmp_path: Path) -> None:
    """Multiprocess mode: each worker writes its own files; the scrape sums them."""
    record = textwrap.dedent(
        """
        from proxy.metrics import Metrics
        m = Metrics(multiprocess=True)
        for _ in range(3):
            m.observe(service="openai", family="gpt-4o", status=200, user_type="normal", streamed=False,
                      tokens_in=10, tokens_out=5, total_s=0.01, upstream_s=0.008, added_s=0.0005, first_byte_s=None)
        """
    )
    scrape = (
        "import sys; from proxy.metrics import Metrics; "
        "sys.stdout.write(Metrics(multiprocess=True).exposition().decode())"
    )
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path), "PYTHONPATH": str(ROOT)}
    for _ in range(2):  # two workers
        subprocess.run([sys.executable, "-c", record], env=env, check=True, cwd=ROOT, timeout=60)
    text = subprocess.run(
        [sys.executable, "-c", scrape], env=env, check=True, cwd=ROOT, capture_output=True, text=True, timeout=60
    ).stdout
    found = samples(text)
    assert value(found, "proxy_requests_total", service="openai", status="200", user_type="normal") == 6
    assert value(found, "proxy_tokens_total", direction="in") == 60


def test_a_stream_the_proxy_fails_to_relay_counts_as_a_500_on_both_relays(
    tmp_path: Path, fake_openai: Any, monkeypatch: Any
) -> None:
    """A failure of the proxy's own in the middle of a relay is not a client that left (499)."""
    from proxy.server import create_app
    from proxy.upstream import EventRelay
    from tests.conftest import make_settings, serve

    def broken(self: EventRelay, chunk: bytes) -> tuple[bytes, bool]:
        raise RuntimeError("a bug in the relay")

    monkeypatch.setattr(EventRelay, "feed", broken)
    for http in ("httptools", "h11"):  # the direct relay (proxy/relay.py), the async one
        env = {"OPENAI_KEY": PAID, "OPENAI_BASE_URL": fake_openai.base_url, "PROXY_KEY": PROXY_KEY}
        settings = make_settings(env, tmp_path)
        with serve(create_app(settings), settings, http=http) as served:
            auth = {"Authorization": f"Bearer {PROXY_KEY}"}
            try:
                with httpx.stream("POST", f"{served.proxy()}/chat/completions", json={**CHAT, "stream": True},
                                  headers=auth, timeout=10) as streamed:  # fmt: skip
                    streamed.read()
            except httpx.HTTPError:
                pass  # the connection is cut short: the relay failed
            found = samples(httpx.get(f"{served.url}/metrics").text)
        assert value(found, "proxy_requests_total", service="openai", status="500") == 1, http
        assert value(found, "proxy_requests_total", service="openai", status="499") == 0, http
