"""The HTTP client to the upstreams, and the streaming relay back to the client."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable, Iterable, Mapping

import aiohttp

from proxy.config import Settings
from proxy.providers.base import StreamMeter
from proxy.sse import SSEParser

NETWORK_ERRORS = (aiohttp.ClientError, OSError)
MAX_ERROR_BODY = 256 * 1024


def create_session(settings: Settings) -> aiohttp.ClientSession:
    """One pooled client for the process: no proxies from the environment, no cookies, no redirects."""
    connector = aiohttp.TCPConnector(limit=512, limit_per_host=0, ttl_dns_cache=300, enable_cleanup_closed=True)
    timeout = aiohttp.ClientTimeout(
        total=None, sock_connect=settings.upstream_connect_timeout, sock_read=settings.upstream_read_timeout
    )
    return aiohttp.ClientSession(
        connector=connector,
        timeout=timeout,
        trust_env=False,
        cookie_jar=aiohttp.DummyCookieJar(),
        auto_decompress=True,
        raise_for_status=False,
        skip_auto_headers=("User-Agent",),
    )


async def send(
    session: aiohttp.ClientSession, method: str, url: str, headers: Mapping[str, str], body: bytes | None
) -> aiohttp.ClientResponse:
    """Send one request; the caller owns the response and must release or close it."""
    return await session.request(method, url, headers=headers, data=body, allow_redirects=False)


async def read_error_body(response: aiohttp.ClientResponse) -> tuple[bytes, object]:
    """Read a (bounded) error reply, returning its bytes and its JSON (or None)."""
    try:
        raw = await response.content.read(MAX_ERROR_BODY)
    except NETWORK_ERRORS + (asyncio.TimeoutError,):
        raw = b""
    finally:
        response.release()
    try:
        return raw, json.loads(raw) if raw else None
    except ValueError:
        return raw, None


def pick_headers(headers: Mapping[str, str], allowed: Iterable[str]) -> dict[str, str]:
    """Only the allow-listed response headers go back to the client."""
    return {name: headers[name] for name in allowed if name in headers}


async def relay_events(
    response: aiohttp.ClientResponse,
    meter: StreamMeter,
    render: Callable[[list], list[bytes]] | None,
    stream_error: Callable[[str], bytes],
) -> AsyncIterator[bytes]:
    """Relay an SSE reply event by event as it arrives.

    `meter` reads usage and may hold events back; `render` (for translated streams) turns accepted
    events into the client's format. A drop mid-stream ends with one error event in the client's
    format. Cancellation (the client went away) closes the upstream connection at once.
    """
    parser = SSEParser()
    try:
        async for chunk in response.content.iter_any():
            accepted = [event for event in parser.feed(chunk) if meter.accept(event)]
            if accepted:
                yield b"".join(render(accepted) if render else [event.raw for event in accepted])
        tail = [event for event in parser.flush() if meter.accept(event)]
        if tail:
            yield b"".join(render(tail) if render else [event.raw for event in tail])
        if not meter.finished:
            yield stream_error("The upstream ended the stream before it was complete.")
    except asyncio.TimeoutError:
        yield stream_error("The upstream stopped sending data (read timeout).")
    except StreamAbort as exc:
        yield stream_error(str(exc))
    except NETWORK_ERRORS:
        yield stream_error("The upstream connection broke off in the middle of the stream.")
    finally:
        # Closing (not releasing) drops the connection if the body was not read to the end.
        if meter.finished:
            response.release()
        else:
            response.close()


class StreamAbort(Exception):
    """Raised by a renderer when the upstream reported an error inside the stream."""
