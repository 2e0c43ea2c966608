"""Self-service temporary user tokens for a proof of work (CAPTCHA_MODE=proof_of_work).

The server hands out a signed challenge (a random salt, argon2id parameters, a target, an
expiry and the asker's address); the browser searches for a string whose argon2id hash, read
as a number, is at most the target (POW_DIFFICULTY_LEVEL hashes on average); the server checks
the signature, the address, the expiry and that the challenge was not used before, hashes the
solution once (argon2-cffi, in a worker thread, one at a time) and issues a temporary token.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import secrets
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from argon2.low_level import Type, hash_secret_raw

from proxy.access.ratelimit import FailureGuard, SlidingWindow, network_of
from proxy.config import Settings

log = logging.getLogger("proxy.access")

HASH_LENGTH = 32
PARALLELISM = 1
CHALLENGES_PER_MINUTE = 10  # per address (an IPv4 address or an IPv6 /64)
VERIFY_INTERVAL_S = 10.0  # one verification per address this often
BOGUS_LOCKOUT_S = 3600.0  # a wrong solution locks the address out this long
MAX_WAITING_VERIFICATIONS = 8  # beyond this many queued, the server says it is busy
MAX_SOLUTION_CHARS = 64


class PowError(Exception):
    """A refused challenge or verification; `status` and a message for the visitor."""

    def __init__(self, status: int, message: str, retry_after: int | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.retry_after = status, message, retry_after


class ProofOfWork:
    def __init__(self, settings: Settings, users: Any, clock: Callable[[], float] = time.time) -> None:
        self.users = users
        self.clock = clock
        self.iterations = settings.pow_iterations
        self.challenge_s = settings.pow_challenge_timeout * 60
        self.token_s = settings.pow_token_hours * 3600
        self.max_ips = settings.pow_token_max_ips
        self.purge_s = settings.pow_token_purge_hours * 3600
        self.time_cost = settings.argon2_time_cost
        self.memory_kb = settings.argon2_memory_kb
        self._secret = secrets.token_bytes(32)  # per process: a restart invalidates open challenges
        self._asked = SlidingWindow(CHALLENGES_PER_MINUTE, 60.0, clock)
        self._tried = SlidingWindow(1, VERIFY_INTERVAL_S, clock)
        self._bogus = FailureGuard(1, BOGUS_LOCKOUT_S, BOGUS_LOCKOUT_S, clock)
        self._used: dict[str, float] = {}  # signature -> expiry, until the challenge expires anyway
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="pow-verify")
        self._waiting = 0

    @property
    def target(self) -> int:
        return (1 << (HASH_LENGTH * 8)) // max(self.iterations, 1)

    def _sign(self, challenge: dict) -> str:
        canonical = json.dumps(challenge, sort_keys=True, separators=(",", ":")).encode()
        return hmac.new(self._secret, canonical, hashlib.sha256).hexdigest()

    def challenge(self, ip: str) -> dict:
        """A new signed challenge for the address `ip`; PowError(429) when it asks too often."""
        client = network_of(ip)
        with self._lock:
            decision = self._asked.check(client)
            if not decision.allowed:
                raise PowError(429, f"Too many challenges; try again in {decision.reset_s} s.", decision.reset_s)
            self._asked.hit(client)
        challenge = {
            "s": secrets.token_hex(32),
            "hl": HASH_LENGTH,
            "t": self.time_cost,
            "m": self.memory_kb,
            "p": PARALLELISM,
            "d": str(self.target),
            "e": int(self.clock() + self.challenge_s),
            "ip": client,
        }
        return {"challenge": challenge, "signature": self._sign(challenge), "iterations": self.iterations}

    async def verify(self, body: Any, ip: str) -> dict:
        """Check a solved challenge and issue a temporary token: {"token", "expires_at"}."""
        challenge, signature, solution = _parts(body)
        client = network_of(ip)
        if not hmac.compare_digest(self._sign(challenge), signature):
            raise PowError(400, "This challenge was not issued by this server (or it restarted); ask for a new one.")
        if challenge.get("ip") != client:
            raise PowError(400, "Solve the challenge from the address that asked for it.")
        now = self.clock()
        if now > challenge["e"]:
            raise PowError(400, "The challenge expired before it was solved; ask for a new one.")
        with self._lock:
            self._forget_expired(now)
            if signature in self._used:
                raise PowError(400, "This challenge was already used; ask for a new one.")
            wait = self._bogus.retry_after(client)
            if wait is not None:
                raise PowError(429, f"A wrong solution came from this address; try again in {wait} s.", wait)
            decision = self._tried.check(client)
            if not decision.allowed:
                raise PowError(429, f"Wait {decision.reset_s} s between verifications.", decision.reset_s)
            if self._waiting >= MAX_WAITING_VERIFICATIONS:
                raise PowError(503, "The server is busy checking other solutions; try again in a minute.", 60)
            self._tried.hit(client)
            self._used[signature] = challenge["e"]  # used once, even if the solution is wrong
            self._waiting += 1
        try:
            ok = await asyncio.get_running_loop().run_in_executor(self._pool, self._check, challenge, solution)
        finally:
            with self._lock:
                self._waiting -= 1
        if not ok:
            with self._lock:
                self._bogus.failed(client)
            log.warning("pow: a wrong solution from %s; locked out for %.0f s", client, BOGUS_LOCKOUT_S)
            raise PowError(400, "The solution is wrong.")
        return self._issue(ip)

    def _check(self, challenge: dict, solution: str) -> bool:
        digest = hash_secret_raw(
            solution.encode(),
            bytes.fromhex(challenge["s"]),
            time_cost=challenge["t"],
            memory_cost=challenge["m"],
            parallelism=challenge["p"],
            hash_len=challenge["hl"],
            type=Type.ID,
        )
        return int.from_bytes(digest, "big") <= int(challenge["d"])

    def _issue(self, ip: str) -> dict:
        expires_at = self.clock() + self.token_s
        user = self.users.create(type="temporary", expires_at=expires_at, max_ips=self.max_ips or None)
        self.users.add_ip(user, ip)
        log.info("pow: issued temporary token %s…", user.token[:6])
        return {"token": user.token, "expires_at": expires_at}

    def _forget_expired(self, now: float) -> None:
        if len(self._used) > 1000:
            for signature, expiry in list(self._used.items()):
                if expiry < now:
                    del self._used[signature]

    def purge(self) -> int:
        """Delete temporary users expired more than POW_TOKEN_PURGE_HOURS ago; returns how many."""
        cutoff = self.clock() - self.purge_s
        stale = [
            u.token
            for u in self.users.all()
            if u.type == "temporary" and u.expires_at is not None and u.expires_at < cutoff
        ]
        for token in stale:
            self.users.delete(token)
        if stale:
            log.info("pow: purged %d expired temporary tokens", len(stale))
        return len(stale)

    def public(self) -> dict:
        """What the page shows before a visitor starts."""
        return {
            "iterations": self.iterations,
            "token_hours": self.token_s / 3600,
            "max_ips": self.max_ips,
            "challenge_minutes": self.challenge_s / 60,
        }

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


_CHALLENGE_TYPES = {"s": str, "hl": int, "t": int, "m": int, "p": int, "d": str, "e": int, "ip": str}


def _parts(body: Any) -> tuple[dict, str, str]:
    """The challenge, signature and solution of a verify request, or PowError(400)."""
    if not isinstance(body, dict):
        raise PowError(400, 'Expected {"challenge": {...}, "signature": "...", "solution": "..."}.')
    challenge, signature, solution = body.get("challenge"), body.get("signature"), body.get("solution")
    if (
        not isinstance(challenge, dict)
        or set(challenge) != set(_CHALLENGE_TYPES)
        or not all(type(challenge[k]) is t for k, t in _CHALLENGE_TYPES.items())
        or not isinstance(signature, str)
        or len(signature) != 64
        or not isinstance(solution, str)
        or not 0 < len(solution) <= MAX_SOLUTION_CHARS
    ):
        raise PowError(400, "The challenge, signature or solution is malformed.")
    return challenge, signature, solution
