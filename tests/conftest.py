"""Shared fixtures: fake upstreams and the proxy served for real on loopback ports."""

from __future__ import annotations

import itertools
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import pytest
import uvicorn

from proxy.config import Settings, load_settings
from tests.fakes import FakeAnthropic, FakeOpenAI, KeyBehaviour

PAID = "sk-paid-0123456789abcdef"
PROXY_KEY = "pk-test-proxy-key-42"


@dataclass
class Served:
    """An app served by uvicorn in a thread."""

    url: str
    app: Any
    settings: Settings
    server: uvicorn.Server

    @property
    def runtime(self) -> Any:
        return self.app.state.runtime

    def proxy(self, service: str = "openai") -> str:
        return f"{self.url}/proxy/{service}/v1"


@contextmanager
def serve(app: Any, settings: Settings, guarded: bool = False, http: str = "auto") -> Iterator[Served]:
    """Serve an ASGI app on 127.0.0.1 (OS-assigned port) until the block ends.

    `app` may also be a builder taking the server's own URL (the whole app needs it: the page's
    test chat and admin tab call the server over HTTP), called once the socket is bound.
    `guarded`: with the connection guard, as `python app.py` serves (proxy/guard.py). `http`:
    uvicorn's HTTP protocol otherwise ("h11": the proxy's streams take their async path)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    if not hasattr(app, "router"):
        app = app(url)
    options: dict[str, Any] = dict(log_level="warning", lifespan="on", timeout_graceful_shutdown=2, proxy_headers=False)
    if guarded:
        from proxy.guard import server_config

        config = server_config(app, settings, log_config=uvicorn.config.LOGGING_CONFIG, **options)
    else:
        config = uvicorn.Config(app, http=http, **options)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            sock.close()
            raise RuntimeError("the app did not start")
        time.sleep(0.02)
    try:
        yield Served(url, app, settings, server)
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


_data_dirs = itertools.count()


def make_settings(env: dict[str, str], tmp_path: Any = None) -> Settings:
    """Settings from `env` alone (never the process environment), each app with its own DATA_DIR."""
    # A fresh status on every read: tests check it right after the requests they make.
    base = {"CHECK_KEYS": "false", "LOG_LEVEL": "warning", "STATUS_CACHE_SECONDS": "0"}
    if tmp_path is not None:
        base["DATA_DIR"] = str(tmp_path / f"data-{next(_data_dirs)}")
    return load_settings({**base, **env}, env_file=None)


@pytest.fixture
def fake_openai() -> Iterator[FakeOpenAI]:
    with FakeOpenAI({PAID: KeyBehaviour("paid")}) as fake:
        yield fake


@pytest.fixture
def fake_anthropic() -> Iterator[FakeAnthropic]:
    with FakeAnthropic({"sk-ant-paid-0123456789": KeyBehaviour("paid")}) as fake:
        yield fake


@pytest.fixture
def proxy_app(tmp_path: Any) -> Iterator[Callable[..., Served]]:
    """A factory: proxy_app(ENV=...) serves the proxy (without the UI) with those settings."""
    from proxy.server import create_app

    stack: list[Any] = []

    def start(**env: str) -> Served:
        settings = make_settings(env, tmp_path)
        ctx = serve(create_app(settings), settings)
        stack.append(ctx)
        return ctx.__enter__()

    yield start
    for ctx in reversed(stack):
        ctx.__exit__(None, None, None)


@pytest.fixture(autouse=True)
def _no_real_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """No SDK may fall back to a real endpoint, key or proxy from the environment."""
    for name in (
        "OPENAI_BASE_URL", "OPENAI_API_KEY", "ANTHROPIC_BASE_URL", "ANTHROPIC_API_KEY", "ANTHROPIC_AUTH_TOKEN",
        "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy",
    ):  # fmt: skip
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(scope="module")
def shared(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[FakeOpenAI, Served]]:
    """One fake OpenAI and one proxy per test module, for tests that need no special settings.

    A module may set `SHARED_ENV` (default: a PROXY_KEY) to add settings."""
    yield from shared_proxy(request, tmp_path_factory)


def shared_proxy(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, http: str = "auto"
) -> Iterator[tuple[FakeOpenAI, Served]]:
    """The `shared` fixture's fake and proxy, served with uvicorn's `http` protocol."""
    from proxy.server import create_app

    extra = getattr(request.module, "SHARED_ENV", {"PROXY_KEY": PROXY_KEY})
    with FakeOpenAI({PAID: KeyBehaviour()}) as fake:
        env = {"OPENAI_KEY": PAID, "OPENAI_BASE_URL": fake.base_url, **extra}
        settings = make_settings(env, tmp_path_factory.mktemp("proxy"))
        with serve(create_app(settings), settings, http=http) as served:
            yield fake, served


@pytest.fixture
def fake(shared: tuple[FakeOpenAI, Served]) -> FakeOpenAI:
    """The module's shared fake, with its default knobs and nothing recorded."""
    upstream = shared[0]
    upstream.reset()
    upstream.stream_delay, upstream.chunks = 0.0, 5
    upstream.drop_mid_stream, upstream.hang_first_byte = False, 0.0
    upstream.next_status.clear()
    return upstream


@pytest.fixture
def claude_pool(proxy_app: Callable[..., Served]) -> Iterator[Callable[..., tuple[Served, FakeAnthropic]]]:
    """A factory: claude_pool({secret: KeyBehaviour}) serves the proxy over a fake holding those keys."""
    fakes: list[FakeAnthropic] = []

    def start(keys: dict[str, KeyBehaviour], fake_class: type[FakeAnthropic] = FakeAnthropic, **env: str):
        fake = fake_class(keys).start()
        fakes.append(fake)
        served = proxy_app(ANTHROPIC_KEY=",".join(keys), ANTHROPIC_BASE_URL=fake.base_url, PROXY_KEY=PROXY_KEY, **env)
        return served, fake

    yield start
    for fake in fakes:
        fake.stop()


@pytest.fixture(scope="session")
def postgres() -> Iterator[Any]:
    """One real PostgreSQL server on loopback for the session (tests/services.py); skipped where
    it is not installed. Each test takes a fresh database with `postgres.database(name)`."""
    from tests.services import postgres_server

    with postgres_server() as server:
        yield server


@pytest.fixture(scope="session")
def redis() -> Iterator[Any]:
    """One real redis-server on loopback for the session (tests/services.py); flushed per use."""
    from tests.services import redis_server

    with redis_server() as server:
        yield server
