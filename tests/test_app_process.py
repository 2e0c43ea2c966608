"""`python app.py` itself, as a process: what it prints, how it refuses to start twice, and the
connection guard and page limits as the real server applies them."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parent.parent
ADMIN_KEY = "adm-process-test-key-5f2a9c7e41"


@dataclass
class Process:
    url: str
    proc: subprocess.Popen
    log: Path
    data_dir: Path
    first_page: httpx.Response | None = None  # "/" and a proxy route as soon as /health answered
    first_proxy: httpx.Response | None = None

    def output(self) -> str:
        return self.log.read_text(errors="replace")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def app_env(data_dir: Path, port: int, **extra: str) -> dict[str, str]:
    keep = {k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "LANG", "PYTHONPATH", "VIRTUAL_ENV")}
    return {
        **keep,
        "HOST": "127.0.0.1",
        "PORT": str(port),
        "DATA_DIR": str(data_dir),
        "CHECK_KEYS": "false",
        "GATEKEEPER": "user_token",
        "ADMIN_KEY": ADMIN_KEY,
        "HEADER_TIMEOUT": "2",
        "PAGE_MAX_BODY_BYTES": "200000",
        "GRADIO_ANALYTICS_ENABLED": "False",
        **extra,
    }


@pytest.fixture(scope="module")
def app(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Process]:
    root = tmp_path_factory.mktemp("app-process")
    port = free_port()
    log = root / "app.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, str(ROOT / "app.py")], cwd=root, env=app_env(root / "data", port), stdout=out, stderr=out
        )
    # cwd is a temp dir: no .env is read; Python finds the checkout's packages beside app.py.
    url = f"http://127.0.0.1:{port}"
    served = Process(url, proc, log, root / "data")
    try:
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"app.py exited: {served.output()[-2000:]}")
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("app.py did not start")
            time.sleep(0.05)
        # What a client sees the moment the server answers: the proxy, and the page still starting.
        served.first_page = httpx.get(url + "/", timeout=5)
        served.first_proxy = httpx.get(url + "/proxy/openai/v1/models", timeout=5)
        while httpx.get(url + "/", timeout=5).status_code != 200:  # the page follows
            if time.monotonic() > deadline:
                raise RuntimeError(f"the page did not appear: {served.output()[-2000:]}")
            time.sleep(0.2)
        yield served
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()


def run_app_py(cwd: Path, env: dict[str, str], timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "app.py")], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


def event_id_of(url: str, elem_id: str, event: str) -> int:
    config = httpx.get(url + "/config", timeout=10).json()
    ids = {c["id"] for c in config["components"] if (c.get("props") or {}).get("elem_id") == elem_id}
    (dep,) = [d for d in config["dependencies"] if any(t[0] in ids and t[1] == event for t in d["targets"])]
    return dep["id"]


def call_event(url: str, fn_index: int, data: list) -> dict:
    session = uuid.uuid4().hex[:12]
    body = {"data": data, "fn_index": fn_index, "session_hash": session, "trigger_id": None, "event_data": None}
    with httpx.Client(base_url=url, timeout=20) as http:
        joined = http.post("/gradio_api/queue/join", json=body)
        assert joined.status_code == 200, joined.text
        with http.stream("GET", "/gradio_api/queue/data", params={"session_hash": session}) as stream:
            for line in stream.iter_lines():
                if line.startswith("data:") and '"process_completed"' in line:
                    return json.loads(line[5:])
    raise AssertionError("the event never completed")


# ---------------------------------------------------------------- start-up: the proxy first


def test_the_proxy_serves_as_soon_as_the_server_starts_and_the_page_follows(app: Process) -> None:
    # Importing Gradio and building the page take seconds: clients do not wait for them.
    assert app.first_proxy is not None and app.first_page is not None
    assert app.first_proxy.status_code == 401  # the proxy's own answer: no credential given
    assert app.first_proxy.json()["error"]["type"]  # in the OpenAI shape
    assert app.first_page.status_code == 503
    assert app.first_page.headers["retry-after"] == "2"
    assert b"The page is starting" in app.first_page.content
    assert b'http-equiv="refresh"' in app.first_page.content  # the browser comes back by itself
    page = httpx.get(app.url + "/", timeout=10)
    assert page.status_code == 200 and b"gradio" in page.content.lower()
    assert "page ready" in app.output()


# ---------------------------------------------------------------- item 17: redaction, hidden errors


def test_a_malformed_admin_event_prints_no_key_and_shows_visitors_no_error_text(app: Process) -> None:
    select_row = event_id_of(app.url, "admin-users-table", "select")
    reply = call_event(app.url, select_row, [ADMIN_KEY])  # one input of two: Gradio raises, prints a traceback
    assert reply.get("success") is False
    assert (reply.get("output") or {}).get("error") is None, reply  # no exception text for the visitor
    time.sleep(0.5)
    output = app.output()
    assert "select_row" in output, "Gradio printed no traceback: the test no longer exercises it"
    assert ADMIN_KEY not in output


# ---------------------------------------------------------------- item 19: a second instance


def test_a_second_instance_on_a_locked_data_dir_says_so_in_one_line(app: Process, tmp_path: Path) -> None:
    result = run_app_py(tmp_path, app_env(app.data_dir, free_port()))
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    assert lines and lines[-1].startswith("Cannot start:"), result.stderr[-2000:]
    assert "another instance" in lines[-1] and str(app.data_dir) in lines[-1]
    assert httpx.get(app.url + "/health", timeout=5).status_code == 200  # the first one is untouched


# ---------------------------------------------------------------- items 3 to 5 on the real server


def test_the_real_server_closes_a_slowloris_connection(app: Process) -> None:
    port = int(app.url.rsplit(":", 1)[1])
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Slow: a")
    start = time.monotonic()
    sock.settimeout(0.3)
    data = b""
    while time.monotonic() - start < 8:
        try:
            sock.sendall(b"a")
            chunk = sock.recv(4096)
        except TimeoutError:
            continue
        except OSError:
            break
        if not chunk:
            break
        data += chunk
    sock.close()
    assert time.monotonic() - start < 6, "the trickling connection stayed open"
    assert data.startswith(b"HTTP/1.1 408"), data[:80]


def test_the_page_takes_no_uploads_and_bounds_its_event_bodies(app: Process) -> None:
    marker = uuid.uuid4().hex.encode()
    upload = httpx.post(app.url + "/gradio_api/upload", files=[("files", ("a.json", marker, "application/json"))])
    assert upload.status_code == 403
    join = httpx.post(
        app.url + "/gradio_api/queue/join",
        content=b'{"data": ["' + b"x" * 300_000 + b'"], "fn_index": 0, "session_hash": "abc"}',
        headers={"content-type": "application/json"},
        timeout=10,
    )
    assert join.status_code == 413
    big = httpx.get(app.url + "/health", headers={"X-Big": "a" * 100_000}, timeout=10)
    assert big.status_code == 431
