"""The owner's controls, composed: abuse controls (proxy/access/abuse.py), and the hooks the
pipeline calls. Built once from the settings and the store; every part is off unless set."""

from __future__ import annotations

import logging
from typing import Any

from proxy.access.abuse import AbuseControls, IpRules
from proxy.config import Settings

log = logging.getLogger("proxy.owner")


class Owner:
    def __init__(self, settings: Settings, store: Any, users: Any = None) -> None:
        self.settings = settings
        self.users = users
        self.rules = IpRules.from_settings(settings, store)
        self.abuse = AbuseControls(settings, self.rules)

    def _user_of(self, caller: Any) -> Any:
        token = getattr(caller, "user_token", None)
        if token is None or self.users is None:
            return None
        return self.users.find(token)

    def check_origin(self, headers: Any) -> None:
        self.abuse.check_origin(headers)

    async def before_upstream(self, service: str, payload: dict, caller: Any) -> None:
        """Everything checked once the body is read and before a key is picked; may raise ProxyError."""
        user = self._user_of(caller)
        await self.abuse.check_payload(service, payload, exempt=bool(user is not None and user.exempt))

    def start(self) -> None:
        """Start background work (call from the app's lifespan, on the running loop)."""

    async def aclose(self) -> None:
        self.abuse.close()
