"""The connection guard (proxy/guard.py) and the body limit of non-proxy routes, over raw sockets:
slow and oversized requests are cut off, one address cannot hold every connection, and the
server keeps answering everyone else meanwhile."""

from __future__ import annotations

import contextlib
import socket
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.conftest import PAID, PROXY_KEY, Served, make_settings, serve
from tests.fakes import FakeOpenAI, KeyBehaviour

GUARD_ENV = {
    "HEADER_TIMEOUT": "1",
    "BODY_MIN_RATE": "2000",
    "BODY_RATE_WINDOW": "1",
    "MAX_CONNECTIONS_PER_IP": "5",
    "MAX_HEADER_BYTES": "65536",
    "PAGE_MAX_BODY_BYTES": "100000",
    "ADMIN_KEY": "admin-key-guard-tests-77",
}


@pytest.fixture(scope="module")
def guarded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    from proxy.server import create_app

    with FakeOpenAI({PAID: KeyBehaviour()}) as fake:
        env = {"OPENAI_KEY": PAID, "OPENAI_BASE_URL": fake.base_url, "PROXY_KEY": PROXY_KEY, **GUARD_ENV}
        settings = make_settings(env, tmp_path_factory.mktemp("guard"))
        with serve(create_app(settings), settings, guarded=True) as served:
            yield served


def connect(served: Served, source: str = "127.0.0.1") -> socket.socket:
    port = int(served.url.rsplit(":", 1)[1])
    sock = socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(source, 0))
    return sock


def read_until_closed(sock: socket.socket, timeout: float) -> tuple[bytes, float]:
    """Everything the server sends until it closes, and how long that took (or timeout)."""
    start = time.monotonic()
    sock.settimeout(0.2)
    data = b""
    while time.monotonic() - start < timeout:
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            continue
        except ConnectionResetError:
            break
        if not chunk:
            break
        data += chunk
    return data, time.monotonic() - start


def health_ms(served: Served, source: str = "127.0.0.9") -> float:
    transport = httpx.HTTPTransport(local_address=source)
    with httpx.Client(transport=transport, timeout=5) as client:
        start = time.perf_counter()
        response = client.get(f"{served.url}/health")
        assert response.status_code == 200
        return (time.perf_counter() - start) * 1000


def trickle(sock: socket.socket, data: bytes, interval: float, until: float) -> bool:
    """Send `data` one byte per `interval` until `until` seconds pass; False once the server closed."""
    start = time.monotonic()
    for byte in data:
        if time.monotonic() - start > until:
            return True
        try:
            sock.sendall(bytes([byte]))
        except OSError:
            return False
        time.sleep(interval)
    return True


def test_headers_sent_one_byte_at_a_time_get_408_within_the_header_deadline(guarded: Served) -> None:
    sock = connect(guarded, "127.0.0.2")
    request = b"GET /health HTTP/1.1\r\nHost: x\r\n" + b"X-Slow: " + b"a" * 1000
    still_open = trickle(sock, request, 0.1, until=3.0)
    data, _ = read_until_closed(sock, 3)
    sock.close()
    assert not still_open or data, "the trickling connection was never closed"
    assert data.startswith(b"HTTP/1.1 408"), data[:80]
    assert health_ms(guarded) < 500


def test_a_connection_that_sends_nothing_is_closed(guarded: Served) -> None:
    sock = connect(guarded, "127.0.0.3")
    data, took = read_until_closed(sock, 5)
    sock.close()
    assert took < 3, "an idle connection stayed open past the header deadline"
    assert data == b""


def test_a_body_slower_than_the_minimum_rate_is_cut_off(guarded: Served) -> None:
    sock = connect(guarded, "127.0.0.4")
    sock.sendall(
        b"POST /proxy/openai/v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
        + f"Authorization: Bearer {PROXY_KEY}\r\nContent-Type: application/json\r\n".encode()
        + b"Content-Length: 100000\r\n\r\n{"
    )
    still_open = trickle(sock, b'"model": "gpt-4o", ' * 100, 0.05, until=4.0)
    data, took = read_until_closed(sock, 3)
    sock.close()
    assert not still_open or took < 3, "a body trickled at 20 bytes/s was read for ever"
    assert data == b"" or data.startswith((b"HTTP/1.1 408", b"HTTP/1.1 400")), data[:120]


def test_a_body_at_a_normal_pace_still_gets_through(guarded: Served) -> None:
    body = b'{"model": "gpt-4o", "messages": [{"role": "user", "content": "' + b"x" * 30000 + b'"}]}'
    sock = connect(guarded, "127.0.0.5")
    sock.sendall(
        b"POST /proxy/openai/v1/chat/completions HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
        + f"Authorization: Bearer {PROXY_KEY}\r\nContent-Type: application/json\r\n".encode()
        + f"Content-Length: {len(body)}\r\n\r\n".encode()
    )
    for start in range(0, len(body), 4000):  # 4 KB every 0.25 s: 16 KB/s, 2 s in all
        sock.sendall(body[start : start + 4000])
        time.sleep(0.25)
    data, _ = read_until_closed(sock, 10)
    sock.close()
    assert data.startswith(b"HTTP/1.1 200"), data[:200]


def test_headers_over_the_limit_get_431_and_normal_ones_pass(guarded: Served) -> None:
    sock = connect(guarded, "127.0.0.6")
    sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: ")
    sent = 0
    try:
        for _ in range(400):  # up to 20 MB, refused long before
            sock.sendall(b"a" * 50_000)
            sent += 50_000
    except OSError:
        pass
    data, _ = read_until_closed(sock, 5)
    sock.close()
    assert data.startswith(b"HTTP/1.1 431"), data[:80]
    assert sent < 5_000_000, f"{sent} bytes of one header were accepted"
    ok = httpx.get(f"{guarded.url}/health", headers={"X-Fine": "b" * 20_000}, timeout=5)
    assert ok.status_code == 200


def test_one_address_cannot_hold_more_than_its_connections(guarded: Served) -> None:
    held = [connect(guarded, "127.0.0.7") for _ in range(5)]
    try:
        time.sleep(0.2)
        extra = connect(guarded, "127.0.0.7")
        data, _ = read_until_closed(extra, 3)
        extra.close()
        assert data.startswith(b"HTTP/1.1 429"), data[:80]
        assert health_ms(guarded, "127.0.0.8") < 500  # another address is served meanwhile
    finally:
        for sock in held:
            sock.close()
    time.sleep(0.3)
    transport = httpx.HTTPTransport(local_address="127.0.0.7")
    with httpx.Client(transport=transport, timeout=5) as client:
        assert client.get(f"{guarded.url}/health").status_code == 200  # the count went down again


def test_many_slow_clients_do_not_slow_health(guarded: Served) -> None:
    slow: list[socket.socket] = []
    try:
        for i in range(40):  # 8 addresses, 5 each: every one at its cap
            sock = connect(guarded, f"127.0.1.{i % 8 + 1}")
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Slow: a")
            slow.append(sock)
        times = sorted(health_ms(guarded, "127.0.2.1") for _ in range(20))
        assert times[10] < 100, times  # the median: a busy shared machine adds the odd spike
    finally:
        for sock in slow:
            sock.close()


# ---------------------------------------------------------------- non-proxy bodies (item 4)


def raw_post(served: Served, path: str, headers: bytes, body: Any, source: str) -> bytes:
    sock = connect(served, source)
    sock.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\n".encode() + headers + b"\r\n")
    try:
        for chunk in body:
            sock.sendall(chunk)
    except OSError:
        pass
    data, _ = read_until_closed(sock, 5)
    sock.close()
    return data


def test_a_declared_body_over_the_page_limit_is_refused_unread(guarded: Served) -> None:
    headers = b"Content-Length: 400000000\r\nContent-Type: application/json\r\n"
    data = raw_post(guarded, "/admin/api/import", headers, [b"["], "127.0.3.1")
    assert data.startswith(b"HTTP/1.1 413"), data[:100]


def test_a_chunked_body_growing_past_the_page_limit_is_cut_off(guarded: Served) -> None:
    chunk = b"a" * 20_000
    pieces = (f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n" for _ in range(500))  # 10 MB if all read
    headers = b"Transfer-Encoding: chunked\r\nAuthorization: Bearer admin-key-guard-tests-77\r\n"
    data = raw_post(guarded, "/admin/api/import", headers, pieces, "127.0.3.2")
    assert data.startswith(b"HTTP/1.1 413"), data[:100]


def test_the_per_address_cap_is_off_on_a_space_where_every_connection_is_its_front_proxy() -> None:
    assert make_settings({}).connections_per_ip == 64
    assert make_settings({"SPACE_ID": "someone/proxy"}).connections_per_ip == 0
    assert make_settings({"SPACE_ID": "someone/proxy", "MAX_CONNECTIONS_PER_IP": "10"}).connections_per_ip == 10
    assert make_settings({"MAX_CONNECTIONS_PER_IP": "0"}).connections_per_ip == 0


def test_this_machine_is_never_capped(guarded: Served) -> None:
    held = [connect(guarded, "127.0.0.1") for _ in range(8)]  # over the cap of 5
    try:
        assert health_ms(guarded, "127.0.0.1") < 500
    finally:
        for sock in held:
            sock.close()


def test_behind_trusted_front_proxies_the_per_address_cap_is_off_by_default() -> None:
    """With TRUSTED_PROXIES set every visitor arrives from the front proxy's address: a cap on the
    socket peer would cap them all together."""
    assert make_settings({"TRUSTED_PROXIES": "1"}).connections_per_ip == 0
    assert make_settings({"TRUSTED_PROXIES": "10.0.0.0/8"}).connections_per_ip == 0
    assert make_settings({"TRUSTED_PROXIES": "1", "MAX_CONNECTIONS_PER_IP": "200"}).connections_per_ip == 200


def test_visitors_behind_a_trusted_front_proxy_are_not_capped_together(tmp_path) -> None:
    """A front proxy on another address (127.0.0.20 here: a tunnel, a load balancer) holding more
    connections than the default cap, one per visitor: every visitor is still served."""
    from proxy.server import create_app

    env = {"PROXY_KEY": PROXY_KEY, "TRUSTED_PROXIES": "127.0.0.20/32", "HEADER_TIMEOUT": "20"}
    settings = make_settings(env, tmp_path)
    with serve(create_app(settings), settings, guarded=True) as served:
        held = [connect(served, "127.0.0.20") for _ in range(70)]  # over the default cap of 64
        try:
            time.sleep(0.2)
            assert health_ms(served, "127.0.0.20") < 2000
        finally:
            for sock in held:
                sock.close()


def owner_counts(served: Served) -> tuple[dict[str, int], dict[str, float]]:
    """The outcomes since this start (/status, as the page shows them) and the guard's Prometheus
    counter by reason."""
    outcomes = httpx.get(f"{served.url}/status", timeout=5).json()["usage"]["outcomes"]
    metric = {}
    for line in httpx.get(f"{served.url}/metrics", timeout=5).text.splitlines():
        if line.startswith("proxy_refused_connections_total{"):
            reason = line.split('reason="', 1)[1].split('"', 1)[0]
            metric[reason] = float(line.rsplit(" ", 1)[1])
    return outcomes, metric


def test_every_refusal_of_the_guard_is_counted_for_the_owner(guarded: Served) -> None:
    """Refusals before any request was read are outcomes as much as a wrong key is: the owner sees
    them with the others (the page's counts and chart, /status) and in /metrics, by reason. A
    connection that never sent a byte (a browser's preconnect) is closed quietly, not counted; a
    body cut off for its rate is the request's own outcome (the pipeline's), not counted twice."""
    outcomes_before, metric_before = owner_counts(guarded)

    slow = connect(guarded, "127.0.4.1")  # 408: headers begun, never finished
    slow.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")
    idle = connect(guarded, "127.0.4.2")  # sends nothing
    big = connect(guarded, "127.0.4.3")  # 431
    big.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: ")
    with contextlib.suppress(OSError):
        for _ in range(4):
            big.sendall(b"a" * 50_000)
    assert read_until_closed(big, 5)[0].startswith(b"HTTP/1.1 431")
    held = [connect(guarded, "127.0.4.4") for _ in range(5)]
    try:
        time.sleep(0.2)
        extra = connect(guarded, "127.0.4.4")  # 429: the sixth from one address
        assert read_until_closed(extra, 3)[0].startswith(b"HTTP/1.1 429")
        extra.close()
    finally:
        for sock in held:
            sock.close()
    assert read_until_closed(slow, 4)[0].startswith(b"HTTP/1.1 408")
    assert read_until_closed(idle, 4)[0] == b""
    stalled = connect(guarded, "127.0.4.5")  # a body that stops: the proxy's request, counted by it
    stalled.sendall(
        b"POST /proxy/openai/v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
        + f"Authorization: Bearer {PROXY_KEY}\r\nContent-Type: application/json\r\n".encode()
        + b"Content-Length: 1000\r\n\r\n{"
    )
    assert read_until_closed(stalled, 5)[0].startswith(b"HTTP/1.1 408")
    for sock in (slow, idle, big, stalled):
        sock.close()

    expected = {"slow_client": 1, "headers_too_large": 1, "too_many_connections": 1}
    incomplete = "refused: bad request"  # the stalled body, once: the pipeline's incomplete body

    def grown(outcomes: dict[str, int]) -> dict[str, int]:
        names = {why: f"refused: {why.replace('_', ' ')}" for why in expected} | {incomplete: incomplete}
        return {key: outcomes.get(name, 0) - outcomes_before.get(name, 0) for key, name in names.items()}

    deadline = time.monotonic() + 5  # /status is cached for a second
    while (grew := grown((counts := owner_counts(guarded))[0])) != {**expected, incomplete: 1}:
        assert time.monotonic() < deadline, grew
        time.sleep(0.2)
    metric = counts[1]
    assert {why: metric.get(why, 0) - metric_before.get(why, 0) for why in expected} == expected
