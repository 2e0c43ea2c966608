"""Usage panel: every outcome per minute (served, refused by the proxy and why, failed upstream),
tokens per minute, recent requests (no prompts, no credentials) and totals per family."""

from __future__ import annotations

import time

import gradio as gr
import pandas as pd

from ui.common import UIContext, fmt_clock, safe_status

RECENT_LIMIT = 200
WINDOW_MINUTES = 30
BUCKET_SECONDS = 60
EVENT_HEADERS = [
    "Time (UTC)", "Outcome", "Model", "Tokens in", "Tokens out", "Latency (ms)", "Streamed", "Service", "Queued (ms)",
]  # fmt: skip
FAMILY_HEADERS = ["Model family", "Requests", "Tokens in", "Tokens out"]
COST_HEADER = "Est. cost (USD)"
# One colour per outcome, the same in every chart and refresh.
OUTCOME_COLORS = {
    "served": "#22c55e",
    "refused: wrong key": "#f97316",
    "refused: model": "#eab308",
    "refused: quota": "#a855f7",
    "refused: rate limit": "#3b82f6",
    "refused: no key free": "#1f2937",
    "refused: dependency down": "#64748b",
    "refused: bad request": "#d1d5db",
    "refused: other": "#d1d5db",
    # The connection guard's (proxy/guard.py), before any request was read.
    "refused: slow client": "#9ca3af",
    "refused: headers too large": "#9ca3af",
    "refused: too many connections": "#9ca3af",
    "failed": "#ef4444",
    "cancelled": "#92400e",
}
# The legend is drawn as text (Vega's own legend squeezes the chart on a phone); each square is
# the emoji nearest its colour above.
OUTCOME_SQUARES = {
    "served": "🟩",
    "refused: wrong key": "🟧",
    "refused: model": "🟨",
    "refused: quota": "🟪",
    "refused: rate limit": "🟦",
    "refused: no key free": "⬛",
    "refused: dependency down": "◾",
    "refused: bad request": "⬜",
    "refused: other": "⬜",
    "refused: slow client": "⬜",
    "refused: headers too large": "⬜",
    "refused: too many connections": "⬜",
    "failed": "🟥",
    "cancelled": "🟫",
}
TOKEN_COLORS = {"in": "#6366f1", "out": "#14b8a6"}


def _int(value: object) -> int:
    try:
        return int(value or 0)  # type: ignore[call-overload]
    except (TypeError, ValueError):
        return 0


def event_rows(events: list[dict]) -> list[list]:
    """Rows for the recent-requests table, newest first; only whitelisted fields are read. The
    outcome (with its status) comes second so that it stays on screen on a phone."""
    rows = []
    for event in events:
        if not isinstance(event, dict):
            continue
        latency = event.get("latency_ms")
        outcome = str(event.get("outcome") or ("served" if 200 <= _int(event.get("status")) < 300 else "failed"))
        rows.append(
            [
                fmt_clock(event.get("time")),
                f"{outcome} ({_int(event.get('status'))})",
                str(event.get("model") or ""),
                _int(event.get("tokens_in")),
                _int(event.get("tokens_out")),
                round(float(latency)) if isinstance(latency, (int, float)) else None,
                "yes" if event.get("streamed") else "no",
                str(event.get("service") or ""),
                round(float(queued)) if isinstance(queued := event.get("queue_ms"), (int, float)) else 0,
            ]
        )
    return rows


def family_rows(usage: dict | None, costs: bool = False) -> list[list]:
    """Served totals per model family, biggest first, with an overall total row at the end."""
    usage = usage or {}
    by_family = usage.get("by_family") or {}
    rows = []
    for name, v in by_family.items():
        if isinstance(v, dict):
            row = [str(name), _int(v.get("requests")), _int(v.get("tokens_in")), _int(v.get("tokens_out"))]
            if costs:
                row.append(_dollars(v.get("cost_usd")))
            rows.append(row)
    rows.sort(key=lambda r: (-r[1], r[0]))
    total = ["Total", _int(usage.get("requests")), _int(usage.get("tokens_in")), _int(usage.get("tokens_out"))]
    if costs:
        total.append(_dollars(usage.get("cost_usd")))
    rows.append(total)
    return rows


def _dollars(value: object) -> str:
    if not isinstance(value, (int, float)):
        return "no price"
    return f"${value:,.2f}" if value >= 1 or value == 0 else f"${value:.4f}"


def series_from_events(events: list[dict]) -> list[dict]:
    """Per-minute points like UsageLedger.series(), from recent events (when no series is given)."""
    points: dict[int, dict] = {}
    for event in events:
        if not (isinstance(event, dict) and isinstance(event.get("time"), (int, float))):
            continue
        bucket = int(event["time"] // BUCKET_SECONDS) * BUCKET_SECONDS
        point = points.setdefault(bucket, {"time": bucket, "tokens_in": 0, "tokens_out": 0, "outcomes": {}})
        point["tokens_in"] += _int(event.get("tokens_in"))
        point["tokens_out"] += _int(event.get("tokens_out"))
        outcome = str(event.get("outcome") or ("served" if 200 <= _int(event.get("status")) < 300 else "failed"))
        point["outcomes"][outcome] = point["outcomes"].get(outcome, 0) + 1
    return [points[b] for b in sorted(points)]


def minutes(now: float, count: int = WINDOW_MINUTES) -> list[int]:
    """The starts of the last `count` minutes, oldest first, the current one included."""
    current = int(now // BUCKET_SECONDS) * BUCKET_SECONDS
    return [current - BUCKET_SECONDS * i for i in range(count - 1, -1, -1)]


def label(bucket: int, now: float | None = None) -> str:
    """24-hour UTC clock: 13:05. A minute of the day before `now` gets a leading space (invisible
    on the axis), so that sorting the labels as text keeps them in time order across midnight."""
    text = time.strftime("%H:%M", time.gmtime(bucket))
    if now is not None and bucket // 86400 < int(now) // 86400:
        return " " + text
    return text


def _window(series: list[dict], now: float) -> tuple[list[int], dict[int, dict]]:
    buckets = minutes(now)
    by_time = {int(p["time"]): p for p in series if isinstance(p, dict) and isinstance(p.get("time"), (int, float))}
    return buckets, by_time


def requests_frame(series: list[dict], now: float | None = None) -> pd.DataFrame:
    """Requests per minute and outcome over the window (columns `minute`, `outcome`, `requests`):
    a row for every minute, zero when idle, so bars stack and gaps show as gaps."""
    now = time.time() if now is None else now
    buckets, by_time = _window(series, now)
    seen = sorted({o for b in buckets for o in (by_time.get(b) or {}).get("outcomes", {})}, key=_outcome_order)
    rows = []
    for bucket in buckets:
        counts = (by_time.get(bucket) or {}).get("outcomes") or {}
        for outcome in seen or ["served"]:
            rows.append((label(bucket, now), outcome, _int(counts.get(outcome))))
    return pd.DataFrame(rows, columns=["minute", "outcome", "requests"])


def tokens_frame(series: list[dict], now: float | None = None) -> pd.DataFrame:
    """Tokens in and out per minute over the window (columns `minute`, `direction`, `tokens`)."""
    now = time.time() if now is None else now
    buckets, by_time = _window(series, now)
    rows = []
    for bucket in buckets:
        point = by_time.get(bucket) or {}
        rows.append((label(bucket, now), "in", _int(point.get("tokens_in"))))
        rows.append((label(bucket, now), "out", _int(point.get("tokens_out"))))
    return pd.DataFrame(rows, columns=["minute", "direction", "tokens"])


def _outcome_order(outcome: str) -> tuple[int, str]:
    order = list(OUTCOME_COLORS)
    return (order.index(outcome) if outcome in order else len(order), outcome)


def outcome_summary(outcomes: dict | None) -> str:
    """`12 served · 3 refused (wrong key 2, model 1) · 1 failed`: every outcome, counts add up."""
    outcomes = {str(k): _int(v) for k, v in (outcomes or {}).items() if _int(v)}
    refused = {k.removeprefix("refused: "): v for k, v in outcomes.items() if k.startswith("refused")}
    parts = [f"**{outcomes.get('served', 0):,}** served"]
    if refused:
        why = ", ".join(f"{name} {count:,}" for name, count in sorted(refused.items(), key=lambda kv: (-kv[1], kv[0])))
        parts.append(f"**{sum(refused.values()):,}** refused by the proxy ({why})")
    else:
        parts.append("**0** refused by the proxy")
    parts.append(f"**{outcomes.get('failed', 0):,}** failed upstream")
    if outcomes.get("cancelled"):
        parts.append(f"**{outcomes['cancelled']:,}** cancelled by the client")
    return " · ".join(parts)


def legend(outcomes: dict[str, int]) -> str:
    """The requests chart's legend: served and failed always, and each refusal seen."""
    shown = [o for o in OUTCOME_COLORS if o in ("served", "failed") or outcomes.get(o)]
    shown += sorted(o for o in outcomes if o not in OUTCOME_COLORS)
    return " · ".join(f"{OUTCOME_SQUARES.get(o, '⬜')} {o}" for o in shown)


def window_totals(series: list[dict], now: float | None = None) -> dict[str, int]:
    now = time.time() if now is None else now
    buckets, by_time = _window(series, now)
    totals: dict[str, int] = {}
    for bucket in buckets:
        for outcome, count in ((by_time.get(bucket) or {}).get("outcomes") or {}).items():
            totals[outcome] = totals.get(outcome, 0) + _int(count)
    return totals


class UsagePanel:
    def __init__(self, ctx: UIContext) -> None:
        self.ctx = ctx
        self.totals = gr.Markdown("", elem_id="usage-totals")
        with gr.Row(equal_height=False, elem_classes=["plots"]):
            with gr.Column(min_width=300):
                self.requests_plot = gr.BarPlot(
                    value=requests_frame([]),
                    x="minute",
                    y="requests",
                    color="outcome",
                    color_map=OUTCOME_COLORS,
                    colors_in_legend=[],  # see `legend`
                    title=f"Requests per minute, last {WINDOW_MINUTES} min",
                    x_title="time (UTC, 24 h)",
                    x_label_angle=-90,
                    sort="x",  # labels sort as text in time order (see `label`)
                    height=260,
                    show_label=False,
                    min_width=300,
                    elem_id="usage-requests-plot",
                )
                self.legend = gr.Markdown(legend({}), elem_classes=["muted"], elem_id="usage-legend")
            with gr.Column(min_width=300):
                self.tokens_plot = gr.BarPlot(
                    value=tokens_frame([]),
                    x="minute",
                    y="tokens",
                    color="direction",
                    color_map=TOKEN_COLORS,
                    title=f"Tokens per minute, last {WINDOW_MINUTES} min",
                    x_title="time (UTC, 24 h)",
                    x_label_angle=-90,
                    sort="x",
                    height=260,
                    show_label=False,
                    min_width=300,
                    elem_id="usage-tokens-plot",
                )
        gr.Markdown("#### Recent requests")
        self.table = gr.Dataframe(
            value=pd.DataFrame([], columns=EVENT_HEADERS),
            headers=EVENT_HEADERS,
            interactive=False,
            show_label=False,
            max_height=420,
            elem_id="usage-table",
        )
        gr.Markdown("#### Served, per model family (all time)")
        self.family_headers = FAMILY_HEADERS + ([COST_HEADER] if ctx.show_costs else [])
        self.families = gr.Dataframe(
            value=pd.DataFrame([], columns=self.family_headers),
            headers=self.family_headers,
            interactive=False,
            show_label=False,
            elem_id="usage-families",
        )

    def outputs(self) -> list[gr.components.Component]:
        return [self.totals, self.requests_plot, self.legend, self.tokens_plot, self.table, self.families]

    def values(self, snapshot: dict | None = None, now: float | None = None) -> list:
        snapshot = safe_status(self.ctx) if snapshot is None else snapshot
        now = time.time() if now is None else now
        usage = snapshot.get("usage")
        if not isinstance(usage, dict):  # hidden by SERVICE_INFO_PASSWORD, or not available
            return [
                "Enter the service info password above to see the usage.",
                requests_frame([], now),
                legend({}),
                tokens_frame([], now),
                pd.DataFrame([], columns=EVENT_HEADERS),
                pd.DataFrame([], columns=self.family_headers),
            ]
        try:
            events = list(self.ctx.recent(RECENT_LIMIT) or [])
        except Exception:  # noqa: BLE001 - a failing ledger must not break the page
            events = []
        try:
            series = list(self.ctx.series()) if self.ctx.series is not None else series_from_events(events)
        except Exception:  # noqa: BLE001
            series = series_from_events(events)
        cost = f" · estimated cost **{_dollars(usage.get('cost_usd'))}**" if self.ctx.show_costs else ""
        totals = (
            f"**Since this start:** {outcome_summary(usage.get('outcomes'))}  \n"
            f"**Last {WINDOW_MINUTES} minutes (the charts):** {outcome_summary(window_totals(series, now))}  \n"
            f"**All time, served:** **{_int(usage.get('requests')):,}** requests · "
            f"**{_int(usage.get('tokens_in')):,}** tokens in · "
            f"**{_int(usage.get('tokens_out')):,}** tokens out{cost}"
        )
        return [
            totals,
            requests_frame(series, now),
            legend(window_totals(series, now)),
            tokens_frame(series, now),
            pd.DataFrame(event_rows(events), columns=EVENT_HEADERS),
            pd.DataFrame(family_rows(usage, self.ctx.show_costs), columns=self.family_headers),
        ]
