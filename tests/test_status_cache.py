"""The public status is built at most once a second however many visitors poll it, through
/status or the page's live panels (issue 9, item 6). bench/page_refresh.py measures what 50
polling visitors cost the proxy's requests."""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Callable, Iterator

import httpx
import pytest

from tests.browser_util import serve_whole_app
from tests.conftest import PROXY_KEY, Served, make_settings
from ui.blocks import REFRESH_SECONDS


def count_builds(served: Served) -> list[float]:
    """Every time the snapshot is built from here on (wraps the runtime's builder)."""
    runtime = served.runtime
    builds: list[float] = []
    build = runtime._build_status

    def counted(base_url: str) -> dict:
        builds.append(time.monotonic())
        return build(base_url)

    runtime._build_status = counted
    return builds


def hammer(call: Callable[[], None], threads: int, seconds: float) -> int:
    done = [0]
    stop = time.monotonic() + seconds

    def loop() -> None:
        while time.monotonic() < stop:
            call()
            done[0] += 1

    workers = [threading.Thread(target=loop) for _ in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    return done[0]


def test_status_polled_by_many_is_built_at_most_once_a_second(proxy_app: Callable[..., Served]) -> None:
    served = proxy_app(PROXY_KEY=PROXY_KEY, STATUS_CACHE_SECONDS="1")
    builds = count_builds(served)
    client = httpx.Client(timeout=10)
    start = time.monotonic()
    replies = hammer(lambda: client.get(f"{served.url}/status").raise_for_status(), threads=8, seconds=2.0)
    elapsed = time.monotonic() - start
    assert replies >= 50, replies
    assert 1 <= len(builds) <= int(elapsed) + 2, (len(builds), replies)
    gaps = [b - a for a, b in zip(builds, builds[1:], strict=False)]
    assert all(gap >= 0.99 for gap in gaps), gaps


def test_status_still_changes_after_the_second(proxy_app: Callable[..., Served]) -> None:
    served = proxy_app(PROXY_KEY=PROXY_KEY, STATUS_CACHE_SECONDS="1")
    first = httpx.get(f"{served.url}/status", timeout=5).json()["uptime_s"]
    time.sleep(1.2)
    assert httpx.get(f"{served.url}/status", timeout=5).json()["uptime_s"] > first


@pytest.fixture(scope="module")
def whole(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    settings = make_settings({"PROXY_KEY": PROXY_KEY, "STATUS_CACHE_SECONDS": "1"}, tmp_path_factory.mktemp("st"))
    with serve_whole_app(settings) as app:
        yield app


def refresh_event(url: str) -> int:
    """The page's live refresh: the event its 5-second timer triggers."""
    config = httpx.get(url + "/config", timeout=10).json()
    timers = {
        c["id"]
        for c in config["components"]
        if c["type"] == "timer" and (c.get("props") or {}).get("active") and c["props"].get("value") == REFRESH_SECONDS
    }
    (dep,) = [d for d in config["dependencies"] if any(t[0] in timers and t[1] == "tick" for t in d["targets"])]
    return dep["id"]


def run_refresh(url: str, fn_index: int) -> None:
    session = uuid.uuid4().hex[:12]
    # The one input is the lock state: Gradio takes its value from the session, whatever is sent.
    body = {"data": [None], "fn_index": fn_index, "session_hash": session, "trigger_id": None, "event_data": None}
    with httpx.Client(base_url=url, timeout=20) as http:
        assert http.post("/gradio_api/queue/join", json=body).status_code == 200
        with http.stream("GET", "/gradio_api/queue/data", params={"session_hash": session}) as stream:
            for line in stream.iter_lines():
                if line.startswith("data:") and '"process_completed"' in line:
                    assert json.loads(line[5:]).get("success") is True, line
                    return
    raise AssertionError("the refresh never completed")


def test_visitors_looping_the_page_refresh_build_the_status_at_most_once_a_second(whole: Served) -> None:
    fn_index = refresh_event(whole.url)
    builds = count_builds(whole)
    start = time.monotonic()
    refreshes = hammer(lambda: run_refresh(whole.url, fn_index), threads=10, seconds=2.5)
    elapsed = time.monotonic() - start
    assert refreshes >= 20, refreshes
    assert 1 <= len(builds) <= int(elapsed) + 2, (len(builds), refreshes)


def test_a_new_visitors_first_event_renders_only_what_it_updates(
    whole: Served, monkeypatch: pytest.MonkeyPatch
) -> None:
    from gradio.blocks import BlocksConfig

    rendered: list[int] = []
    original = BlocksConfig.config_for_block

    def counted(_id: int, *args, **kwargs):
        rendered.append(_id)
        return original(_id, *args, **kwargs)

    monkeypatch.setattr(BlocksConfig, "config_for_block", staticmethod(counted))
    config = httpx.get(whole.url + "/config", timeout=10).json()
    fn_index = refresh_event(whole.url)
    rendered.clear()
    run_refresh(whole.url, fn_index)  # a new session hash: a new visitor
    assert len(config["components"]) > 60
    # Gradio 6 rendered every block's config for each new session (~120 here); now only the outputs.
    assert len(rendered) <= 12, len(rendered)


def test_a_client_changing_its_host_header_cannot_force_a_rebuild(proxy_app: Callable[..., Served]) -> None:
    """The snapshot was cached per Host header (16 at most, then all dropped): a client naming a
    new host on every request had it rebuilt every time. Only the endpoints depend on the host."""
    served = proxy_app(PROXY_KEY=PROXY_KEY, STATUS_CACHE_SECONDS="60")
    builds = count_builds(served)
    with httpx.Client(timeout=10) as client:
        for i in range(40):
            status = client.get(f"{served.url}/status", headers={"host": f"h{i}.example"}).json()
            assert status["endpoints"]["openai"] == f"http://h{i}.example/proxy/openai/v1"
    assert len(builds) <= 1, len(builds)
