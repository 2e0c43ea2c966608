"""The connection guard: uvicorn's httptools protocol with the limits uvicorn lacks.

uvicorn has no deadline for receiving a request (its keep-alive timer is reset by every byte, so
a client trickling one byte at a time holds a connection for ever), and httptools buffers a
header of any size. This protocol adds, per connection:

- a deadline for the request line and headers (armed when the connection opens and when a read
  leaves a request's headers incomplete; a keep-alive connection idle between requests is
  uvicorn's `timeout_keep_alive`), answered with 408 and a close;
- a limit on their total size, answered with 431 and a close, checked before each read is
  parsed, so nothing beyond the limit is ever buffered;
- a minimum body rate: while a body is being received and the app is reading it, each window of
  `body_window` seconds must bring `body_min_rate` bytes a second on average, else 408 (or a
  plain close once the response has begun);
- a cap on simultaneous connections from one peer address (the peer is the socket's: behind a
  front proxy every connection comes from it, hence `Settings.connections_per_ip` is off on a
  Space and with TRUSTED_PROXIES set, and 127.0.0.1 and ::1, this machine, are not capped),
  answered with 429 and a close.

Each refusal before a request was read (slow or oversized headers, too many connections) is
counted for the owner (`on_refused`: the ledger's outcomes on the page and in /status, and
Prometheus's `proxy_refused_connections`), as every other refusal is. A body cut off for its
rate belongs to a request the app already holds: the proxy's requests count it themselves (an
incomplete body, a bad request); the page's and admin's are not counted.

Everything else is uvicorn's (httptools parser, flow control, pipelining), so the proxy's
throughput is unchanged (bench/README.md).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

log = logging.getLogger("proxy.guard")

# Why the guard refused a connection before any request was read: the reasons `on_refused` is told.
SLOW_CLIENT = "slow_client"  # headers too slow (408)
HEADERS_TOO_LARGE = "headers_too_large"  # 431
TOO_MANY_CONNECTIONS = "too_many_connections"  # 429

# This machine: the page's own calls to the proxy, or a front proxy running beside it.
UNCAPPED = frozenset({"127.0.0.1", "::1"})


@dataclass(frozen=True)
class ConnectionLimits:
    header_timeout: float = 10.0
    max_header_bytes: int = 65536
    body_min_rate: int = 1024
    body_window: float = 10.0
    connections_per_ip: int = 0  # 0: no cap

    @classmethod
    def from_settings(cls, settings: Any) -> ConnectionLimits:
        return cls(
            header_timeout=settings.header_timeout,
            max_header_bytes=settings.max_header_bytes,
            body_min_rate=settings.body_min_rate,
            body_window=settings.body_rate_window,
            connections_per_ip=settings.connections_per_ip,
        )


def _reply(status: int, reason: str, message: str) -> bytes:
    body = message.encode()
    head = (
        f"HTTP/1.1 {status} {reason}\r\ncontent-type: text/plain; charset=utf-8\r\n"
        f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
    )
    return head.encode() + body


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    """HttpToolsProtocol with request deadlines, a header size limit and a per-address cap."""

    limits: ClassVar[ConnectionLimits] = ConnectionLimits()
    open_by_ip: ClassVar[dict[str, int]] = {}
    on_refused: ClassVar[Callable[[str], None] | None] = None  # told each refusal's reason

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._ip: str | None = self.client[0] if self.client else None
        self._counted = False
        self._awaiting_headers = True
        self._header_bytes = 0
        self._header_timer: asyncio.TimerHandle | None = None
        self._body_timer: asyncio.TimerHandle | None = None
        self._body_pending = False
        self._body_bytes = 0
        cap = self.limits.connections_per_ip
        if cap and self._ip is not None and self._ip not in UNCAPPED:
            held = self.open_by_ip.get(self._ip, 0)
            if held >= cap:
                log.warning("refused a connection: %d already open from one address", held)
                self._refuse(
                    429, "Too Many Requests", f"Too many connections from your address (limit {cap}).",
                    TOO_MANY_CONNECTIONS,
                )  # fmt: skip
                return
            self.open_by_ip[self._ip] = held + 1
            self._counted = True
        self._arm_header_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._release()
        super().connection_lost(exc)

    def handle_websocket_upgrade(self) -> None:
        self._release()  # the websocket protocol takes the transport; this one hears no more
        super().handle_websocket_upgrade()

    def data_received(self, data: bytes) -> None:
        if self.transport.is_closing():
            return
        if self._awaiting_headers:
            self._header_bytes += len(data)
            limit = self.limits.max_header_bytes
            if self._header_bytes > limit:
                # Over the limit unless the headers end in this read within it (a body may follow).
                end = data.find(b"\r\n\r\n")
                size = self._header_bytes if end < 0 else self._header_bytes - len(data) + end + 4
                if size > limit:
                    self._refuse(
                        431, "Request Header Fields Too Large", f"Request headers over {limit} bytes.",
                        HEADERS_TOO_LARGE,
                    )  # fmt: skip
                    return
        elif self._body_timer is not None:
            self._body_bytes += len(data)
        super().data_received(data)
        # Timers are armed only for what one read did not complete: most requests arrive whole.
        if self.transport.is_closing():
            return
        if self._awaiting_headers:
            if self._header_bytes and self._header_timer is None:
                self._arm_header_timer()
        elif self._body_pending and self._body_timer is None:
            self._body_bytes = 0
            self._body_timer = self.loop.call_later(self.limits.body_window, self._check_body_rate)

    # Parser callbacks
    def on_headers_complete(self) -> None:
        self._awaiting_headers = False
        self._header_bytes = 0
        self._cancel_header_timer()
        super().on_headers_complete()
        self._body_pending = True

    def on_message_complete(self) -> None:
        self._body_pending = False
        self._cancel_body_timer()
        self._awaiting_headers = True
        super().on_message_complete()

    # Timers
    def _arm_header_timer(self) -> None:
        self._header_timer = self.loop.call_later(self.limits.header_timeout, self._header_timeout)

    def _cancel_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _cancel_body_timer(self) -> None:
        if self._body_timer is not None:
            self._body_timer.cancel()
            self._body_timer = None

    def _header_timeout(self) -> None:
        self._header_timer = None
        if self.transport.is_closing() or not self._awaiting_headers:
            return
        if self.cycle is not None and not self.cycle.response_complete:
            self._arm_header_timer()  # a pipelined request waits for the current reply: not the client's fault
            return
        if self._header_bytes:
            self._refuse(408, "Request Timeout", "The request headers took too long to arrive.", SLOW_CLIENT)
        else:
            self.transport.close()  # an idle connection: close it quietly

    def _check_body_rate(self) -> None:
        self._body_timer = None
        if self.transport.is_closing() or not self._body_pending or self.cycle is None:
            return
        enough = self.limits.body_min_rate * self.limits.body_window
        if self.flow.read_paused or self._body_bytes >= enough:
            # Reading paused: the app is not taking the body yet, which is not the client's fault.
            self._body_bytes = 0
            self._body_timer = self.loop.call_later(self.limits.body_window, self._check_body_rate)
            return
        log.warning("closed a connection whose request body came slower than %d bytes/s", self.limits.body_min_rate)
        self.cycle.disconnected = True
        self.cycle.message_event.set()
        if self.cycle.response_started:
            self.transport.close()
        else:
            self._refuse(408, "Request Timeout", "The request body arrived too slowly.")

    def _refuse(self, status: int, reason: str, message: str, why: str | None = None) -> None:
        """Answer `status` and close; `why` (a refusal before any request was read) is counted."""
        self._cancel_header_timer()
        self._cancel_body_timer()
        self.transport.write(_reply(status, reason, message))
        self.transport.close()
        if why is not None:
            self._count(why)

    def _count(self, why: str) -> None:
        if self.on_refused is not None:
            try:
                self.on_refused(why)
            except Exception:  # counting must never break the connection handling
                log.exception("could not count a refused connection")

    def _release(self) -> None:
        self._cancel_header_timer()
        self._cancel_body_timer()
        if self._counted and self._ip is not None:
            self._counted = False
            left = self.open_by_ip.get(self._ip, 1) - 1
            if left > 0:
                self.open_by_ip[self._ip] = left
            else:
                self.open_by_ip.pop(self._ip, None)


def guarded_protocol(
    limits: ConnectionLimits, on_refused: Callable[[str], None] | None = None
) -> type[GuardedHttpToolsProtocol]:
    """A protocol class with these limits and its own per-address counts (one per server);
    `on_refused` is told the reason of each refusal."""
    attributes = {"limits": limits, "open_by_ip": {}, "on_refused": staticmethod(on_refused) if on_refused else None}
    return type("GuardedHttpToolsProtocol", (GuardedHttpToolsProtocol,), attributes)


def server_config(app: Any, settings: Any, **kwargs: Any) -> uvicorn.Config:
    """The uvicorn configuration `python app.py` serves with: the guarded protocol, and
    uvicorn's own options as app.py sets them (overridable by `kwargs`). The guard's refusals are
    counted by the proxy's runtime when `app` has one (`app.state.runtime`)."""
    runtime = getattr(getattr(app, "state", None), "runtime", None)
    on_refused = getattr(runtime, "connection_refused", None)
    options: dict[str, Any] = {
        "host": settings.host,
        "port": settings.port,
        "log_config": None,
        "proxy_headers": False,  # whose forwarded-for to believe is decided in Runtime.client_ip
        "access_log": False,  # the pipeline logs one line per proxy request itself
        "http": guarded_protocol(ConnectionLimits.from_settings(settings), on_refused),
    }
    options.update(kwargs)
    return uvicorn.Config(app, **options)
