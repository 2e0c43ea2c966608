"""A streamed request that has to wait in line: its SSE headers at once, then `: queued, position N,
about S s` comments until its upstream answers, then the relayed stream or one error event in the
client's dialect. A part of the `Pipeline` (a mixin)."""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.responses import Response

from proxy import error_chat
from proxy.access.gatekeeper import Admission
from proxy.access.queue import Ticket
from proxy.client import ClientGone, unless_client_leaves
from proxy.errors import Kind, ProxyError
from proxy.logs import log_safe
from proxy.outcomes import STREAM_HEADERS
from proxy.providers.base import Endpoint
from proxy.relay import RelayResponse
from proxy.upstream import UpstreamReply
from proxy.usage import Usage

if TYPE_CHECKING:
    from proxy.pipeline import Service, _Ctx

log = logging.getLogger("proxy.access")


class WaitingStreams:
    """The `Pipeline`'s streamed requests that wait in line."""

    # Waiting in line, seen by a streaming client -------------------------------------------------
    async def _stream_or_wait(
        self, request: Request, work: Any, service: Service, endpoint: Endpoint, state: dict,
        admission: Admission, ctx: _Ctx, payload: dict,
    ) -> Response:  # fmt: skip
        """A streamed request answered as usual when its upstream answers soon; when it has to wait
        in line (or the upstream is silent for HEARTBEAT_INTERVAL), the SSE headers go out at once,
        then comments until the reply comes: `: queued, position 3, about 40 s`."""
        ticket = ctx.ticket
        assert ticket is not None
        queued = asyncio.get_running_loop().create_future()
        ticket.on_queued = lambda: queued.done() or queued.set_result(None)
        task = asyncio.ensure_future(unless_client_leaves(request, work))
        try:
            await asyncio.wait((task, queued), timeout=self.heartbeat, return_when=asyncio.FIRST_COMPLETED)
        except BaseException:
            task.cancel()
            raise
        finally:
            ticket.on_queued = None
        if task.done():
            reply, response = task.result()
            if response is None:
                response = self._stream(service, endpoint, reply, state, admission, ctx, payload)
            return response
        body = self._waiting_body(task, service, endpoint, state, admission, ctx, payload)
        return RelayResponse(body, None, dict(STREAM_HEADERS))

    def _wait_comment(self, ticket: Ticket) -> bytes:
        if not ticket.waiting:
            return b": waiting for the upstream\n\n"
        position, wait = self.queue.wait_of(ticket)
        return f": queued, position {position}, about {wait} s\n\n".encode()

    async def _waiting_body(
        self, task: asyncio.Future, service: Service, endpoint: Endpoint, state: dict, admission: Admission,
        ctx: _Ctx, payload: dict,
    ):  # fmt: skip
        """Comments while the request waits; then the relayed stream, or one error event in the
        client's dialect (the status line is already sent)."""
        ticket = ctx.ticket
        assert ticket is not None
        status, relayed = 499, False
        refused: ProxyError | UpstreamReply | None = None  # counted as in `handle`: refused (why) or failed
        try:
            yield self._wait_comment(ticket)
            while not (await asyncio.wait((task,), timeout=self.heartbeat))[0]:
                yield self._wait_comment(ticket)
            try:
                reply, response = task.result()
            except ProxyError as exc:
                status, refused = exc.status, exc
                if self.errors_as_chat and error_chat.applies(exc, endpoint.kind):  # as without the wait
                    model = ctx.model or ""
                    yield error_chat.stream_events(endpoint.kind, model[:200], self.redact(error_chat.error_text(exc)))
                    return
                yield self._error_event(endpoint.shape, self.error_response(endpoint.shape, exc))
                return
            except UpstreamReply as exc:
                status, refused = exc.status, exc
                yield self._error_event(endpoint.shape, self._pass_error(endpoint.shape, exc))
                return
            except ClientGone:
                return
            except Exception:
                log.exception("unexpected error on %s %s", ctx.method, log_safe(ctx.path))
                status = 500
                error = ProxyError(500, "The proxy failed to handle this request; it has been logged.", Kind.UPSTREAM)
                yield self._error_event(endpoint.shape, self.error_response(endpoint.shape, error))
                return
            relayed = True  # accounted by _complete or _relay from here on
            if response is not None:  # the upstream answered a stream request with one JSON reply
                yield self._error_event(endpoint.shape, response)
                return
            ctx.streamed = True
            async for chunk in self._relay(service, endpoint, reply, state, admission, ctx, payload):
                yield chunk
        finally:
            if not task.done():
                task.cancel()
            if not relayed:
                self.gatekeeper.release(admission)
                if refused is None:
                    if not ctx.accounted:  # (a reply accounted, then its commit waited on: left meanwhile)
                        self._account(ctx, admission, Usage(), status)
                else:
                    self.queue.done(ticket)
                    ctx.usage = Usage()
                    self._count_refusal(ctx, refused if isinstance(refused, ProxyError) else None, status)
                self._log(ctx, status)

    @staticmethod
    def _error_event(shape: str, response: Response) -> bytes:
        """An error reply's body as the stream's last event: OpenAI `data: {"error": ...}`,
        Anthropic `event: error`."""
        body = bytes(response.body).decode("utf-8", errors="replace").replace("\n", " ")
        return f"event: error\ndata: {body}\n\n".encode() if shape == "anthropic" else f"data: {body}\n\n".encode()
