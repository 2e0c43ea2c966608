"""WORKERS > 1: several processes on one port, one state (Postgres, Redis), one /metrics."""

from __future__ import annotations

import contextlib
import itertools
import os
import socket
import time
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
        deadline = time.monotonic() + 30  # the second worker may still be starting when the port answers
        while len(instance.workers()) < 2 and time.monotonic() < deadline:
            time.sleep(0.2)
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


def test_connections_opened_at_once_are_spread_evenly_over_the_workers(
    tmp_path: Path, postgres: Any, redis: Any, fake_openai: FakeOpenAI
) -> None:
    """A client (or a front proxy) opening its pool at once: each worker gets a fair share. With
    one shared socket, the worker that woke first took a burst (22 of 64 against 42), and the
    busier one capped the throughput of both."""
    env = {
        "OPENAI_KEY": PAID, "OPENAI_BASE_URL": fake_openai.base_url, "PROXY_KEY": PROXY_KEY, "WORKERS": "2",
        "DATABASE_URL": postgres.database(f"workers_{next(_names)}"), "REDIS_URL": redis.url,
        "MAX_CONNECTIONS_PER_IP": "1000",
    }  # fmt: skip
    instance = start_instance(env, tmp_path)
    conns: list[socket.socket] = []
    try:
        deadline = time.monotonic() + 30
        while len(instance.workers()) < 2 and time.monotonic() < deadline:
            time.sleep(0.2)
        workers = instance.workers()
        assert len(workers) == 2
        host, port = instance.url.removeprefix("http://").rsplit(":", 1)
        for _ in range(200):
            conns.append(socket.create_connection((host, int(port)), timeout=30))
        for conn in conns:  # every connection served once (so accepted), all kept open
            conn.sendall(b"GET /health HTTP/1.1\r\nHost: proxy\r\n\r\n")
        for conn in conns:
            assert conn.recv(65536).startswith(b"HTTP/1.1 200")
        held = {pid: _established_on(pid, int(port)) for pid in workers}
        assert sum(held.values()) == 200, held
        assert min(held.values()) >= 60, held  # even: 100 each; a hash's spread is ~7
    finally:
        for conn in conns:
            conn.close()
        instance.kill()


def _established_on(pid: int, port: int) -> int:
    """How many established connections to local `port` process `pid` holds."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            target = os.readlink(fd)
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                fields = line.split()
                if fields[3] == "01" and int(fields[1].rsplit(":", 1)[1], 16) == port and fields[9] in inodes:
                    count += 1
    return count


def test_several_workers_on_sqlite_refuse_to_start_saying_why(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError) as caught:
        start_instance({"WORKERS": "2"}, tmp_path, timeout=30)
    assert "needs REDIS_URL" in str(caught.value) and "Traceback" not in str(caught.value)


def test_killing_one_of_two_instances_during_traffic_loses_no_acknowledged_usage(
    tmp_path: Path, postgres: Any, redis: Any, fake_openai: FakeOpenAI
) -> None:
    import threading

    import psycopg

    url = postgres.database(f"kill_{next(_names)}")
    env = {
        "OPENAI_KEY": PAID, "OPENAI_BASE_URL": fake_openai.base_url, "PROXY_KEY": PROXY_KEY,
        "DATABASE_URL": url, "REDIS_URL": redis.url,
    }  # fmt: skip
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    doomed, survivor = start_instance(env, tmp_path / "a"), start_instance(env, tmp_path / "b")
    fake_openai.stream_delay = 0.01  # requests in flight when the kill lands
    acknowledged = [0]
    lock = threading.Lock()
    stop = threading.Event()

    def traffic(base: str) -> None:
        with httpx.Client(timeout=10) as client:
            while not stop.is_set():
                try:
                    reply = client.post(
                        f"{base}/chat/completions", json={**CHAT, "stream": True},
                        headers={"Authorization": f"Bearer {PROXY_KEY}"},
                    )  # fmt: skip
                except httpx.HTTPError:
                    continue
                if reply.status_code == 200 and reply.text.rstrip().endswith("data: [DONE]"):
                    with lock:
                        acknowledged[0] += 1

    threads = [threading.Thread(target=traffic, args=(i.proxy(),)) for i in (doomed, survivor) for _ in range(3)]
    try:
        for t in threads:
            t.start()
        time.sleep(1.5)
        doomed.kill()  # SIGKILL, mid-traffic
        time.sleep(1.0)
    finally:
        stop.set()
        for t in threads:
            t.join(20)
        survivor.kill()
    with psycopg.connect(url) as conn:
        sql = "SELECT COALESCE(sum(requests), 0) FROM usage_totals WHERE scope = 'family'"
        (recorded,) = conn.execute(sql).fetchone()
    assert acknowledged[0] > 20
    assert recorded >= acknowledged[0]  # every reply a client received in full was counted first


def test_each_worker_gets_its_own_socket_on_the_one_port_and_a_taken_port_fails_the_start() -> None:
    from proxy.workers import listening_sockets

    sockets = listening_sockets("127.0.0.1", 0, 1)  # a free port, chosen by the kernel
    port = sockets[0].getsockname()[1]
    sockets[0].close()
    sockets = listening_sockets("127.0.0.1", port, 3)
    try:
        assert len({s.fileno() for s in sockets}) == 3  # one per worker: the kernel balances between them
        assert {s.getsockname()[1] for s in sockets} == {port}
        assert all(s.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT) for s in sockets)
        assert all(s.get_inheritable() for s in sockets)  # handed to the worker processes
        with socket.create_connection(("127.0.0.1", port), timeout=5):
            pass  # served by one of them
    finally:
        for s in sockets:
            s.close()
    with socket.socket() as other:  # another program on the port, without SO_REUSEPORT
        other.bind(("127.0.0.1", 0))
        other.listen()
        with pytest.raises(OSError):
            listening_sockets("127.0.0.1", other.getsockname()[1], 2)
