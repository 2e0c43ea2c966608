"""Composition root: settings -> runtime -> FastAPI proxy with the Gradio page mounted at "/".

`python app.py` serves it with uvicorn on HOST:PORT.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import sys
import tempfile
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from proxy.config import ConfigError, Settings, load_settings

if TYPE_CHECKING:
    from fastapi import FastAPI


def build_app(
    settings: Settings, self_url: str | None = None, *, page_later: bool = False, redactor: Any = None
) -> FastAPI:
    """The whole app. `self_url` is how the page's test chat reaches this server over HTTP.

    `page_later`: the proxy serves as soon as the server starts, and the Gradio page follows
    once it is built (importing Gradio and building the page take seconds: a restart should
    not keep clients waiting for a page they do not use). Until then "/" says it is starting."""
    from proxy.server import build_runtime, create_app

    runtime = build_runtime(settings, redactor)
    app = create_app(settings, runtime)  # proxy routes first: a mount at "/" shadows later routes
    if self_url is None:
        host = "127.0.0.1" if settings.host in ("0.0.0.0", "::", "") else settings.host
        self_url = f"http://{host}:{settings.port}"
    if not page_later:
        return mount_page(app, build_page(settings, runtime, self_url), settings)
    page = LatePage(lambda: mount_page(_page_app(), build_page(settings, runtime, self_url), settings))
    app.mount("/", page)
    app.state.page = page
    serve = app.router.lifespan_context

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[Any]:
        async with serve(app) as state:
            page.begin()
            try:
                yield state
            finally:
                await page.aclose()

    app.router.lifespan_context = lifespan
    return app


def build_page(settings: Settings, runtime: Any, self_url: str) -> Any:
    """The Gradio Blocks of the page (imports Gradio: seconds)."""
    from ui import sessions
    from ui.blocks import UIContext, build_ui

    sessions.install()  # a visitor's new session no longer renders the whole page's config
    ctx = UIContext(
        title=settings.title,
        self_url=self_url,
        space_host=settings.space_host or None,
        space_id=settings.space_id or None,
        services=tuple(runtime.services),
        auth_mode=settings.auth_mode,
        status=runtime.status,
        recent=runtime.ledger.recent,
        client_headers=runtime.page_headers,
        models=lambda service: sorted(runtime.services[service].pool.chat_models()),
        series=runtime.ledger.series,
        greeting=settings.greeting,
        admin_enabled=bool(settings.admin_key),
        show_costs=settings.show_token_costs,
        info_check=(
            (lambda password, request: runtime.info_password_ok(password, runtime.client_ip(request)))
            if settings.service_info_password
            else None
        ),
        families=limit_families(runtime),
        quota_defaults=dict(settings.token_quota),
    )
    return build_ui(ctx)


def mount_page(app: FastAPI, blocks: Any, settings: Settings) -> FastAPI:
    """`blocks` mounted at "/" of `app` with the page's settings."""
    # Imported here: gradio reads GRADIO_SERVER_PORT at import, so settings are checked first.
    import gradio as gr

    from ui.blocks import CSS, build_theme

    app = gr.mount_gradio_app(
        app,
        blocks,
        path="/",
        ssr_mode=False,
        theme=build_theme(),
        css=CSS,
        footer_links=[],
        allowed_paths=[],  # nothing beyond Gradio's own cache, uploads, CWD and temp dir
        blocked_paths=blocked_paths(settings),
        max_file_size=1,  # the page takes no file: uploads are refused (proxy/page_limits.py)
        show_error=False,  # an unexpected error's text (paths, values) stays in the redacted log
    )
    # Gradio checks the file paths an event's inputs name (only files it received as uploads) and
    # its outputs name (no blocked path) only once `has_launched` is set, which `launch()` does and
    # `mount_gradio_app` does not: without it a crafted event could have any file copied to the
    # cache and served (processing_utils._check_allowed).
    blocks.has_launched = True
    # Gradio's queue looks for work every 1 ms while it has none (queueing.Queue, 50 ms on
    # Windows): ~1,000 wake-ups a second, 3.6 % of a core here while idle, in the event loop that
    # relays every stream. A click on the page waits at most PAGE_QUEUE_POLL_S more.
    queue = getattr(blocks, "_queue", None)
    if queue is not None:
        queue.sleep_when_free = PAGE_QUEUE_POLL_S
        queue.progress_update_sleep_when_free = max(queue.progress_update_sleep_when_free, 0.1)
    return app


PAGE_QUEUE_POLL_S = 0.02


def _page_app() -> FastAPI:
    """The app the late page is mounted in (its lifespan starts Gradio's queue)."""
    from fastapi import FastAPI

    return FastAPI(docs_url=None, redoc_url=None, openapi_url=None)


STARTING_PAGE = b"""<!doctype html><html><head><meta charset="utf-8"><meta http-equiv="refresh" content="2">
<title>Starting</title></head><body style="font-family:sans-serif;margin:3em">
<p>The page is starting; it will appear in a moment. The proxy already serves requests.</p></body></html>"""


class LatePage:
    """The ASGI app at "/" while the Gradio page is built in a thread: a short "starting" page
    (503, refreshing itself) until then, the page after. If building it fails, the proxy goes
    on serving and "/" says the page is unavailable (the reason is in the log)."""

    def __init__(self, build: Callable[[], FastAPI]) -> None:
        self._build = build
        self.app: FastAPI | None = None
        self.failed = False
        self._task: asyncio.Task | None = None
        self._stack = contextlib.AsyncExitStack()

    def begin(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._load(), name="page")

    async def _load(self) -> None:
        try:
            app = await asyncio.to_thread(self._build)
            await self._stack.enter_async_context(app.router.lifespan_context(app))  # Gradio's queue
        except Exception:
            logging.getLogger("proxy").exception("the page could not be built; the proxy goes on serving")
            self.failed = True
            return
        gc.freeze()  # the page's long-lived heap, as for the rest (see _ready)
        self.app = app
        logging.getLogger("proxy").info("page ready")

    async def aclose(self) -> None:
        if self._task is not None and not self._task.done():
            self._task.cancel()
            with contextlib.suppress(BaseException):
                await self._task
        await self._stack.aclose()

    async def __call__(self, scope: Any, receive: Callable, send: Callable) -> None:
        app = self.app
        if app is not None:
            await app(scope, receive, send)
            return
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1013})  # try again later
            return
        if scope["type"] != "http":
            return
        status, body = (500, b"The page is unavailable; the proxy works.") if self.failed else (503, STARTING_PAGE)
        headers = [(b"content-type", b"text/html; charset=utf-8"), (b"cache-control", b"no-store")]
        if not self.failed:
            headers.append((b"retry-after", b"2"))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})


def limit_families(runtime) -> tuple[str, ...]:
    """Families a token limit may name: those the keys serve first, then every other text family."""
    from proxy.families import NON_TEXT, known_families

    served = [f for service in runtime.services.values() for f in service.pool.snapshot()["families"]]
    rest = sorted(known_families() - NON_TEXT - set(served) - {"anthropic-other"})
    return tuple(dict.fromkeys([*served, *rest]))


def blocked_paths(settings: Settings) -> list[str]:
    """Paths Gradio must never move to its cache nor serve: the data directory (the database and
    its WAL hold user tokens) and the .env file."""
    paths = [Path(settings.data_dir).resolve(), settings.sqlite_path.parent.resolve(), Path(".env").resolve()]
    return [str(p) for p in dict.fromkeys(paths)]


def worker_app() -> tuple[FastAPI, Settings]:
    """The app of one worker process when WORKERS > 1 (proxy/workers.py), and its settings."""
    settings = load_settings()
    return _ready(settings), settings


def _ready(settings: Settings) -> FastAPI:
    """Logging set up, the app built, and its long-lived heap frozen: what serving needs."""
    from proxy.errors import Redactor
    from proxy.logs import configure_logging, redact_std_streams

    redactor = Redactor(settings.secrets)
    configure_logging(settings.log_level, redactor)
    redact_std_streams(redactor)  # Gradio prints tracebacks to stderr itself, past logging
    app = build_app(settings, page_later=True, redactor=redactor)
    settle_heap()  # the page's heap is frozen once it is built (LatePage)
    return app


def settle_heap() -> None:
    """Garbage collection for serving (bench/proxy_server.py does the same, to measure this)."""
    # Gradio's large, long-lived heap made every garbage collection walk it: freezing it took
    # ~30% off the proxy's CPU per request (bench/README.md).
    gc.collect()
    gc.freeze()
    # Fewer, larger young collections and rarer full ones: with 1,000 streams in flight a full
    # collection walked their ~150,000 objects every ~2 s (20-80 ms pauses); the slowest chunk
    # relayed went from ~80 to ~45 ms and the p99 from ~17 to ~11 ms (bench/README.md), at the
    # same CPU per request.
    gc.set_threshold(10_000, 50, 100)


def main() -> int:
    try:
        settings = load_settings()
    except ConfigError as exc:
        print(f"Cannot start: {exc}", file=sys.stderr)
        return 2
    import uvicorn

    from proxy.guard import server_config
    from proxy.store import StoreError

    if settings.workers > 1:
        # Several worker processes on one socket (proxy/workers.py), each a whole app; they share
        # state through Postgres and Redis, and their metrics through files in one directory
        # (prometheus_client finds it in the environment the workers inherit).
        try:  # migrate and check the database once, before any worker starts
            from proxy.state import open_store

            open_store(settings).close()
        except StoreError as exc:
            print(f"Cannot start: {exc}", file=sys.stderr)
            return 1
        from proxy.workers import supervise

        here = str(Path(__file__).resolve().parent)
        env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": tempfile.mkdtemp(prefix="proxy-metrics-")}
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [here, env.get("PYTHONPATH")]))
        return supervise(settings.host, settings.port, settings.workers, env)
    try:
        app = _ready(settings)
    except StoreError as exc:  # e.g. another instance holds DATA_DIR
        print(f"Cannot start: {exc}", file=sys.stderr)
        return 1
    # uvicorn with the connection guard: request deadlines, header size and per-address limits.
    uvicorn.Server(server_config(app, settings)).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
