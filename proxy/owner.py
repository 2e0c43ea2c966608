"""The owner's controls, composed: abuse controls (proxy/access/abuse.py), the event log
(proxy/eventlog.py), and the hooks the pipeline calls. Built once from the settings and the
store; every part is off unless its setting is set."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

from proxy.access.abuse import AbuseControls, IpRules
from proxy.access.pow import ProofOfWork
from proxy.access.refresh import QuotaRefresher
from proxy.access.spend import GENERATION_KINDS, check_context, clamp_output, requested_output
from proxy.access.tokens import count_prompt_async
from proxy.config import Settings
from proxy.errors import ProxyError
from proxy.eventlog import FLUSH_EVERY_S, Event, EventLog
from proxy.promptlog import LOGGED_KINDS, NOTICE, PromptLog, StreamCapture, reply_text

log = logging.getLogger("proxy.owner")

PRUNE_EVERY_S = 3600.0
PURGE_EVERY_S = 600.0


class Owner:
    def __init__(self, settings: Settings, store: Any, users: Any = None) -> None:
        self.settings = settings
        self.users = users
        self.rules = IpRules.from_settings(settings, store)
        self.abuse = AbuseControls(settings, self.rules)
        self.events = EventLog(store, settings.event_log_days) if settings.event_logging else None
        self.prompts = PromptLog.from_settings(settings)
        self.pow = ProofOfWork(settings, users) if settings.captcha_mode == "proof_of_work" else None
        self.quotas = (
            QuotaRefresher(users, settings.token_quota, settings.quota_refresh_period)
            if users is not None and settings.auth_mode == "user_token"
            else None
        )
        self._tasks: list[asyncio.Task] = []
        self._stop = asyncio.Event()
        self._prompt_task: asyncio.Task | None = None

    def _user_of(self, caller: Any) -> Any:
        token = getattr(caller, "user_token", None)
        if token is None or self.users is None:
            return None
        return self.users.current(token)  # accepted by the gatekeeper: no hash again

    # Pipeline hooks ----------------------------------------------------------------------------
    def check_origin(self, headers: Any) -> None:
        self.abuse.check_origin(headers)

    async def before_upstream(self, ctx: Any, payload: dict) -> None:
        """Everything checked once the body is read and before a key is picked; may raise ProxyError.
        Spend caps may lower the output length `payload` asks for."""
        service, kind = ctx.service, ctx.endpoint.kind if ctx.endpoint is not None else ""
        refused = self.abuse.refused
        output_cap = self.settings.output_cap(service)
        if output_cap:
            before = requested_output(payload)
            clamp_output(payload, kind, output_cap)
            if before > output_cap:
                refused["output_clamped"] = refused.get("output_clamped", 0) + 1
        context_cap = self.settings.context_cap(service)
        if context_cap and kind in GENERATION_KINDS:
            # The quota's tokenizer (offline, bounded); exact up to twice the cap, "more than" beyond.
            bound = 2 * context_cap
            claude = service == "anthropic" or (ctx.family or "").startswith("claude")
            counted = payload
            if kind == "generate":  # Gemini's turns and system instruction, counted as messages
                counted = {"messages": payload.get("contents"), "system": payload.get("systemInstruction")}
            prompt = await count_prompt_async(counted, bound=bound, claude=claude)
            try:
                check_context(prompt, requested_output(payload), context_cap, service, exact=prompt <= bound)
            except ProxyError:
                refused["context_cap"] = refused.get("context_cap", 0) + 1
                raise
        user = self._user_of(ctx.caller)
        await self.abuse.check_payload(service, payload, exempt=bool(user is not None and user.exempt))

    def replied(self, ctx: Any, body: Any) -> None:
        """A non-streamed reply arrived (parsed JSON, or None)."""
        if self.prompts is not None:
            ctx.reply = reply_text(body)

    def tap(self, ctx: Any) -> StreamCapture | None:
        """A copy of a stream's bytes as they reach the client, when prompts are logged."""
        if self.prompts is None:
            return None
        ctx.reply = StreamCapture()
        return ctx.reply

    def finished(self, ctx: Any, status: int) -> None:
        """One request is over (served, refused or failed): its event row and prompt record."""
        if self.prompts is not None and 200 <= status < 300 and ctx.payload is not None:
            self._log_prompt(ctx)
        if self.events is None or not ctx.service:
            return
        usage = ctx.usage
        caller = ctx.caller
        self.events.record(
            Event(
                time=time.time(),
                subject=self.events.subject(getattr(caller, "user_token", None), ctx.ip),
                service=ctx.service,
                model=ctx.model or "",
                family=ctx.family or "",
                status=status,
                tokens_in=usage.tokens_in if usage else 0,
                tokens_out=usage.tokens_out if usage else 0,
                latency_ms=round((time.perf_counter() - ctx.started) * 1000, 1),
                queue_ms=getattr(ctx, "queue_ms", None),
                streamed=ctx.streamed,
            )
        )

    def _log_prompt(self, ctx: Any) -> None:
        assert self.prompts is not None
        if ctx.endpoint is None or ctx.endpoint.kind not in LOGGED_KINDS:
            return
        reply = ctx.reply.text() if isinstance(ctx.reply, StreamCapture) else (ctx.reply or "")
        self.prompts.add(
            {
                "time": time.time(),
                "service": ctx.service,
                "model": ctx.model,
                "user": ctx.user,
                "endpoint": ctx.endpoint.kind,
                "request": ctx.payload,
                "reply": reply,
            }
        )

    def public_status(self) -> dict:
        """What /status adds: that prompts are logged, when they are; the proof of work, when on."""
        out: dict = {"prompt_logging": self.prompts is not None}
        if self.prompts is not None:
            out["notice"] = NOTICE
        if self.pow is not None:
            out["proof_of_work"] = self.pow.public()
        return out

    def summary(self) -> dict:
        """Which controls are on and how many requests each refused, for the Admin tab."""
        s = self.settings
        return {
            "ip_blacklist": len(self.rules.blacklist),
            "admin_whitelist": len(self.rules.whitelist),
            "blocked_origins": s.origin_blocks,
            "reject_phrases": len(self.abuse.phrases.patterns),
            "allowed_vision_services": None if s.vision_services is None else sorted(s.vision_services),
            "max_context_tokens": {k: s.context_cap(k) for k in ("openai", "anthropic") if s.context_cap(k)},
            "max_output_tokens": {k: s.output_cap(k) for k in ("openai", "anthropic") if s.output_cap(k)},
            "event_logging": self.events is not None,
            "event_log_days": s.event_log_days if self.events is not None else None,
            "prompt_logging": self.prompts is not None,
            "prompts_uploaded": self.prompts.uploaded if self.prompts is not None else 0,
            "prompts_dropped": self.prompts.dropped if self.prompts is not None else 0,
            "prompt_log_error": self.prompts.last_error if self.prompts is not None else None,
            "captcha_mode": s.captcha_mode,
            "refused": dict(self.abuse.refused),
        }

    # Names for the statistics ------------------------------------------------------------------
    def user_names(self) -> dict[str, str]:
        """Event subjects of user tokens -> nicknames."""
        if self.users is None or self.events is None:
            return {}
        return {self.events.subject(u.token, ""): u.nickname for u in self.users.all() if u.nickname}

    # Lifetime ----------------------------------------------------------------------------------
    def start(self) -> None:
        """Start background work (call from the app's lifespan, on the running loop)."""
        if self.events is not None:
            self._tasks.append(asyncio.create_task(self._flush_forever(), name="event-log"))
        if self.pow is not None:
            self._tasks.append(asyncio.create_task(self._purge_forever(), name="pow-purge"))
        if self.quotas is not None and self.settings.quota_refresh_period:
            self._tasks.append(asyncio.create_task(self.quotas.run(), name="quota-refresh"))
        if self.prompts is not None:
            self._prompt_task = asyncio.create_task(self.prompts.run(self._stop), name="prompt-log")

    async def _flush_forever(self) -> None:
        """Write buffered event rows every FLUSH_EVERY_S; prune old ones every PRUNE_EVERY_S."""
        assert self.events is not None
        pruned_at = 0.0
        while True:
            try:
                self.events.flush()
                if time.monotonic() - pruned_at >= PRUNE_EVERY_S:
                    pruned_at = time.monotonic()
                    self.events.prune()
            except Exception:
                log.exception("event log: writing or pruning failed")
            await asyncio.sleep(FLUSH_EVERY_S)

    async def _purge_forever(self) -> None:
        assert self.pow is not None
        while True:
            try:
                self.pow.purge()
            except Exception:
                log.exception("pow: purging expired tokens failed")
            await asyncio.sleep(PURGE_EVERY_S)

    async def aclose(self) -> None:
        self._stop.set()
        task = self._prompt_task
        if task is not None:  # its last upload, within a bound
            with contextlib.suppress(TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(task, 60)
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks.clear()
        if self.events is not None:
            self.events.flush()  # before the store closes
        self.abuse.close()
        if self.pow is not None:
            self.pow.close()
