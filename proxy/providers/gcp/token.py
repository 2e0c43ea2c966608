"""OAuth access tokens for service accounts: a JWT signed with google-auth's RSA signer, exchanged at
the token endpoint (GCP_TOKEN_URL), cached until five minutes before it expires.

One mint at a time per account (a burst of first requests waits for the one mint); the exchange
goes over its own short-lived aiohttp session, bounded in time and size.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from typing import Any

import aiohttp

from proxy.providers.cloud_credentials import GcpEntry

SCOPE = "https://www.googleapis.com/auth/cloud-platform"
GRANT = "urn:ietf:params:oauth:grant-type:jwt-bearer"
EARLY = 300.0  # refresh this long before expiry
TIMEOUT = 20.0
MAX_REPLY = 64 * 1024
MAX_ACCOUNTS = 1024


class TokenRefused(aiohttp.ClientError):
    """The token endpoint refused the service account (its status and OAuth error code, no secret)."""

    def __init__(self, status: int, error: str) -> None:
        super().__init__(f"the token endpoint refused the service account ({status} {error})")
        self.status, self.error = status, error


class TokenCache:
    def __init__(self, token_url: str, clock: Callable[[], float] = time.time) -> None:
        from google.auth import crypt, jwt  # imported once at start, only when GCP credentials are set

        self._crypt, self._jwt = crypt, jwt
        self.token_url = token_url
        self.clock = clock
        self._tokens: dict[str, tuple[str, float]] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._signers: dict[str, Any] = {}
        self.minted = 0  # how many tokens were minted (for tests and the log)

    @staticmethod
    def _ident(entry: GcpEntry) -> str:
        return f"{entry.info['client_email']}/{entry.info.get('private_key_id', '')}"

    async def token(self, entry: GcpEntry) -> str:
        ident = self._ident(entry)
        cached = self._tokens.get(ident)
        if cached and cached[1] - EARLY > self.clock():
            return cached[0]
        lock = self._locks.setdefault(ident, asyncio.Lock())
        async with lock:
            cached = self._tokens.get(ident)
            if cached and cached[1] - EARLY > self.clock():
                return cached[0]
            token, expires_in = await self.mint(entry)
            if len(self._tokens) >= MAX_ACCOUNTS:
                self._tokens.clear()
            self._tokens[ident] = (token, self.clock() + expires_in)
            return token

    def forget(self) -> None:
        """Drop every cached token (after Google said one was not accepted)."""
        self._tokens.clear()

    async def mint(self, entry: GcpEntry) -> tuple[str, float]:
        """A fresh token and its lifetime in seconds; TokenRefused if the endpoint says no."""
        ident = self._ident(entry)
        signer = self._signers.get(ident)
        if signer is None:
            try:
                signer = self._crypt.RSASigner.from_service_account_info(entry.info)
            except (ValueError, TypeError):
                raise TokenRefused(0, "unreadable private key") from None
            self._signers[ident] = signer
        now = int(time.time())
        email = entry.info["client_email"]
        claims = {"iss": email, "scope": SCOPE, "aud": self.token_url, "iat": now, "exp": now + 3600}
        assertion = self._jwt.encode(signer, claims)
        if isinstance(assertion, bytes):
            assertion = assertion.decode()
        timeout = aiohttp.ClientTimeout(total=TIMEOUT)
        session = aiohttp.ClientSession(timeout=timeout, trust_env=False, cookie_jar=aiohttp.DummyCookieJar())
        form = {"grant_type": GRANT, "assertion": assertion}
        async with session, session.post(self.token_url, data=form, allow_redirects=False) as response:
            raw = await response.content.read(MAX_REPLY)
            status = response.status
        try:
            body = json.loads(raw) if raw else {}
        except ValueError:
            body = {}
        body = body if isinstance(body, dict) else {}
        token = body.get("access_token")
        if status != 200 or not isinstance(token, str) or not token:
            error = body.get("error") if isinstance(body.get("error"), str) else "no token"
            raise TokenRefused(status, str(error)[:64])
        self.minted += 1
        expires_in = body.get("expires_in")
        return token, float(expires_in) if isinstance(expires_in, (int, float)) and expires_in > 0 else 3600.0
