"""The health of the services the proxy's state depends on (Postgres, Redis), for /health and for
failing closed: while one is down, proxy requests get a 503 rather than unchecked service."""

from __future__ import annotations

from collections.abc import Callable

Problem = Callable[[], str | None]  # None when healthy, else what is wrong (checked on every request: cheap)


class Dependencies:
    def __init__(self) -> None:
        self._checks: dict[str, Problem] = {}

    def add(self, name: str, problem: Problem) -> None:
        self._checks[name] = problem

    def __bool__(self) -> bool:
        return bool(self._checks)

    def problem(self) -> str | None:
        """The first dependency that is down, as '<name>: <why>', or None."""
        for name, check in self._checks.items():
            why = check()
            if why:
                return f"{name}: {why}"
        return None

    def report(self) -> dict[str, str]:
        """{name: "ok" | "unavailable"} for /health (no details: it is public)."""
        return {name: "unavailable" if check() else "ok" for name, check in self._checks.items()}
