"""Keys panel: per service, the pool's health from the public status snapshot (key ids only)."""

from __future__ import annotations

import time
from collections import Counter

import gradio as gr
import pandas as pd

from ui.common import UIContext, esc, fmt_ago, fmt_duration, safe_status, service_label

KEY_HEADERS = ["Key", "Status", "Tier", "Model families", "Limits seen", "Last checked", "Locked until"]
STATUS_ICONS = {
    "active": "🟢 active",
    "revoked": "🔴 revoked",
    "over_quota": "🟠 over quota",
    "rate_limited": "🟡 rate limited",
    "unchecked": "⚪ unchecked",
}
COUNT_FIELDS = ("active", "rate_limited", "unchecked", "over_quota", "revoked")
FAMILY_HEADERS = ["Model family", "Active", "Limited", "Revoked", "In queue", "Expected wait"]


def services_to_show(ctx: UIContext, snapshot: dict) -> list[str]:
    """Configured services first, then any other service the snapshot reports."""
    names = list(ctx.services)
    for name in snapshot.get("keys") or {}:
        if name not in names:
            names.append(str(name))
    return names


def _limits_text(limits: object) -> str:
    if not isinstance(limits, dict) or not limits:
        return "—"
    return ", ".join(
        f"{name}: {value:,}" if isinstance(value, int) else f"{name}: {value}" for name, value in limits.items()
    )


def key_rows(service_status: dict | None, now: float | None = None) -> list[list[str]]:
    """One row per key: id, status, tier, families, limits, last check, lockout. No secrets."""
    now = time.time() if now is None else now
    rows = []
    for key in (service_status or {}).get("keys") or []:
        if not isinstance(key, dict):
            continue
        status = str(key.get("status") or "unchecked")
        locked = key.get("locked_until")
        rows.append(
            [
                str(key.get("id", "?")),
                STATUS_ICONS.get(status, status),
                str(key.get("tier") or "unknown"),
                ", ".join(str(f) for f in key.get("families") or []) or "—",
                _limits_text(key.get("limits")),
                fmt_ago(key.get("last_checked"), now),
                f"{fmt_duration(locked - now)} left" if isinstance(locked, (int, float)) and locked > now else "—",
            ]
        )
    return rows


def tier_counts(service_status: dict | None) -> dict[str, int]:
    keys = (service_status or {}).get("keys") or []
    return dict(Counter(str(k.get("tier") or "unknown") for k in keys if isinstance(k, dict)))


def key_summary(service: str, service_status: dict | None, now: float | None = None) -> str:
    """Markdown summary of one service's pool; every string from the snapshot is escaped."""
    label = service_label(service)
    if not service_status:
        return f"### {esc(label)}\nNo keys configured."
    total = int(service_status.get("total") or len(service_status.get("keys") or []))
    counts = " · ".join(f"{name.replace('_', ' ')}: **{int(service_status.get(name) or 0)}**" for name in COUNT_FIELDS)
    tiers = tier_counts(service_status)
    tiers_text = ", ".join(f"{esc(t)}: {n}" for t, n in sorted(tiers.items())) or "—"
    families = ", ".join(f"`{esc(f)}`" for f in service_status.get("families") or []) or "none yet"
    checking = " — checking keys now…" if service_status.get("checking") else ""
    return (
        f"### {esc(label)}: {total} key{'s' if total != 1 else ''}\n"
        f"{counts}\n\n"
        f"**Tiers:** {tiers_text}  \n"
        f"**Model families:** {families}  \n"
        f"**Last check:** {fmt_ago(service_status.get('last_check'), now)}{checking}"
    )


def family_rows(service_status: dict | None, queue: dict | None = None) -> list[list]:
    """Per model family: keys active / limited (resting after a rate limit) / revoked (or out of
    quota), and the queue's length and expected wait when the status reports a queue."""
    by_family = (service_status or {}).get("by_family") or {}
    queue = queue if isinstance(queue, dict) else {}
    rows = []
    for family in sorted(set(by_family) | set(queue)):
        counts = by_family.get(family) or {}
        waiting = queue.get(family) if isinstance(queue.get(family), dict) else None
        wait_s = (waiting or {}).get("estimated_wait_s")
        rows.append(
            [
                str(family),
                int(counts.get("active") or 0),
                int(counts.get("limited") or 0),
                int(counts.get("revoked") or 0),
                int(waiting.get("waiting") or 0) if waiting else "—",
                fmt_duration(wait_s) if isinstance(wait_s, (int, float)) and waiting else "—",
            ]
        )
    return rows


class KeysPanel:
    def __init__(self, ctx: UIContext) -> None:
        self.ctx = ctx
        snapshot = safe_status(ctx)
        self.services = services_to_show(ctx, snapshot)
        self.summaries: dict[str, gr.Markdown] = {}
        self.tables: dict[str, gr.Dataframe] = {}
        self.families: dict[str, gr.Dataframe] = {}
        if not self.services:
            gr.Markdown("No provider keys are configured.")
        for service in self.services:
            with gr.Column(elem_classes=["service-card"]):
                self.summaries[service] = gr.Markdown("Loading…")
                self.families[service] = gr.Dataframe(
                    headers=FAMILY_HEADERS[:4],
                    value=pd.DataFrame([], columns=FAMILY_HEADERS[:4]),
                    interactive=False,
                    show_label=False,
                    elem_id=f"keys-families-{service}",
                )
                self.tables[service] = gr.Dataframe(
                    headers=KEY_HEADERS,
                    value=pd.DataFrame([], columns=KEY_HEADERS),
                    datatype="str",
                    interactive=False,
                    wrap=True,
                    show_label=False,
                    max_height=360,
                    # Fixed widths: on a phone the table scrolls sideways with Key and Status in
                    # view, instead of squeezing every column to a letter a line.
                    column_widths=["120px", "130px", "80px", "220px", "190px", "110px", "110px"],
                    elem_id=f"keys-table-{service}",
                )

    def outputs(self) -> list[gr.components.Component]:
        out: list[gr.components.Component] = []
        for service in self.services:
            out += [self.summaries[service], self.families[service], self.tables[service]]
        return out

    def values(self, snapshot: dict | None = None) -> list:
        snapshot = safe_status(self.ctx) if snapshot is None else snapshot
        now = time.time()
        values: list = []
        if "keys" not in snapshot and snapshot.get("locked"):
            for _ in self.services:
                values.append("Enter the service info password above to see the keys' status.")
                values.append(pd.DataFrame([], columns=FAMILY_HEADERS[:4]))
                values.append(pd.DataFrame([], columns=KEY_HEADERS))
            return values
        by_service = snapshot.get("keys") or {}
        queues = snapshot.get("queue") if isinstance(snapshot.get("queue"), dict) else {}
        for service in self.services:
            service_status = by_service.get(service)
            values.append(key_summary(service, service_status, now))
            rows = family_rows(service_status, queues.get(service))
            if service not in queues:  # no queue reported: its columns would only say "—"
                rows = [row[:4] for row in rows]
            values.append(pd.DataFrame(rows, columns=FAMILY_HEADERS[: 6 if service in queues else 4]))
            values.append(pd.DataFrame(key_rows(service_status, now), columns=KEY_HEADERS))
        return values
