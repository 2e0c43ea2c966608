"""Public routes of the proof of work: POST /pow/challenge, POST /pow/verify, GET /pow/argon2.js.

Mounted only with CAPTCHA_MODE=proof_of_work. Errors are {"error": {"message", "type"}}."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, JSONResponse, Response

from proxy.access.pow import PowError, ProofOfWork

ARGON2_JS = Path(__file__).resolve().parent.parent / "static" / "vendor" / "hash-wasm" / "argon2.umd.min.js"
MAX_BODY_BYTES = 4096


def _error(exc: PowError) -> JSONResponse:
    headers = {"Retry-After": str(exc.retry_after)} if exc.retry_after else None
    kind = {429: "rate_limit", 503: "unavailable"}.get(exc.status, "invalid_request")
    return JSONResponse({"error": {"message": exc.message, "type": kind}}, exc.status, headers=headers)


async def _small_json(request: Request) -> object:
    raw = b""
    async for chunk in request.stream():
        raw += chunk
        if len(raw) > MAX_BODY_BYTES:
            raise PowError(413, "The request is too large.")
    try:
        return json.loads(raw) if raw.strip() else {}
    except ValueError:
        raise PowError(400, "The request body is not valid JSON.") from None


def pow_router(pow_: ProofOfWork, client_ip: Callable[[Request], str]) -> APIRouter:
    router = APIRouter()

    @router.post("/pow/challenge")
    async def challenge(request: Request) -> Response:
        try:
            await _small_json(request)
            return JSONResponse(pow_.challenge(client_ip(request)), headers={"cache-control": "no-store"})
        except PowError as exc:
            return _error(exc)

    @router.post("/pow/verify")
    async def verify(request: Request) -> Response:
        try:
            body = await _small_json(request)
            return JSONResponse(await pow_.verify(body, client_ip(request)), headers={"cache-control": "no-store"})
        except PowError as exc:
            return _error(exc)

    @router.get("/pow/argon2.js")
    async def argon2_js() -> Response:
        return FileResponse(
            ARGON2_JS, media_type="text/javascript", headers={"cache-control": "public, max-age=86400"}
        )

    return router
