"""Usage panel: recent requests (no prompts, no credentials), totals per family, and plots."""

from __future__ import annotations

import datetime as dt

import gradio as gr
import pandas as pd

from ui.common import UIContext, fmt_clock, safe_status

RECENT_LIMIT = 200
EVENT_HEADERS = ["Time (UTC)", "Service", "Model", "Streamed", "Tokens in", "Tokens out", "Latency (ms)", "Status"]
FAMILY_HEADERS = ["Model family", "Requests", "Tokens in", "Tokens out"]
BUCKET_SECONDS = 60


def _int(value: object) -> int:
    try:
        return int(value or 0)  # type: ignore[call-overload]
    except (TypeError, ValueError):
        return 0


def event_rows(events: list[dict]) -> list[list]:
    """Rows for the recent-requests table, newest first; only whitelisted fields are read."""
    rows = []
    for event in events:
        if not isinstance(event, dict):
            continue
        latency = event.get("latency_ms")
        rows.append(
            [
                fmt_clock(event.get("time")),
                str(event.get("service") or ""),
                str(event.get("model") or ""),
                "yes" if event.get("streamed") else "no",
                _int(event.get("tokens_in")),
                _int(event.get("tokens_out")),
                round(float(latency)) if isinstance(latency, (int, float)) else None,
                _int(event.get("status")),
            ]
        )
    return rows


def family_rows(usage: dict | None) -> list[list]:
    """Totals per model family, biggest first, with an overall total row at the end."""
    usage = usage or {}
    by_family = usage.get("by_family") or {}
    rows = [
        [str(name), _int(v.get("requests")), _int(v.get("tokens_in")), _int(v.get("tokens_out"))]
        for name, v in by_family.items()
        if isinstance(v, dict)
    ]
    rows.sort(key=lambda r: (-r[1], r[0]))
    rows.append(["Total", _int(usage.get("requests")), _int(usage.get("tokens_in")), _int(usage.get("tokens_out"))])
    return rows


def _bucket(epoch: float) -> dt.datetime:
    start = int(epoch // BUCKET_SECONDS) * BUCKET_SECONDS
    return dt.datetime.fromtimestamp(start, tz=dt.UTC).replace(tzinfo=None)


def requests_frame(events: list[dict]) -> pd.DataFrame:
    """Requests per minute: columns `time` and `requests`, oldest first."""
    counts: dict[dt.datetime, int] = {}
    for event in events:
        if isinstance(event, dict) and isinstance(event.get("time"), (int, float)):
            bucket = _bucket(event["time"])
            counts[bucket] = counts.get(bucket, 0) + 1
    frame = pd.DataFrame(sorted(counts.items()), columns=["time", "requests"])
    frame["time"] = pd.to_datetime(frame["time"])
    return frame


def tokens_frame(events: list[dict]) -> pd.DataFrame:
    """Tokens per minute in long form: columns `time`, `tokens`, `direction` (in / out)."""
    sums: dict[tuple[dt.datetime, str], int] = {}
    for event in events:
        if not (isinstance(event, dict) and isinstance(event.get("time"), (int, float))):
            continue
        bucket = _bucket(event["time"])
        for direction in ("in", "out"):
            key = (bucket, direction)
            sums[key] = sums.get(key, 0) + _int(event.get(f"tokens_{direction}"))
    rows = [(t, tokens, d) for (t, d), tokens in sorted(sums.items())]
    frame = pd.DataFrame(rows, columns=["time", "tokens", "direction"])
    frame["time"] = pd.to_datetime(frame["time"])
    return frame


class UsagePanel:
    def __init__(self, ctx: UIContext) -> None:
        self.ctx = ctx
        self.totals = gr.Markdown("")
        with gr.Row(equal_height=True):
            self.requests_plot = gr.BarPlot(
                value=requests_frame([]),
                x="time",
                y="requests",
                title="Requests per minute",
                x_title="time (UTC)",
                height=240,
                show_label=False,
                elem_id="usage-requests-plot",
            )
            self.tokens_plot = gr.LinePlot(
                value=tokens_frame([]),
                x="time",
                y="tokens",
                color="direction",
                title="Tokens per minute",
                x_title="time (UTC)",
                height=240,
                show_label=False,
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
        gr.Markdown("#### Totals per model family")
        self.families = gr.Dataframe(
            value=pd.DataFrame([], columns=FAMILY_HEADERS),
            headers=FAMILY_HEADERS,
            interactive=False,
            show_label=False,
            elem_id="usage-families",
        )

    def outputs(self) -> list[gr.components.Component]:
        return [self.totals, self.requests_plot, self.tokens_plot, self.table, self.families]

    def values(self, snapshot: dict | None = None) -> list:
        snapshot = safe_status(self.ctx) if snapshot is None else snapshot
        try:
            events = list(self.ctx.recent(RECENT_LIMIT) or [])
        except Exception:  # noqa: BLE001 - a failing ledger must not break the page
            events = []
        usage = snapshot.get("usage") or {}
        totals = (
            f"**{_int(usage.get('requests')):,}** requests · "
            f"**{_int(usage.get('tokens_in')):,}** tokens in · "
            f"**{_int(usage.get('tokens_out')):,}** tokens out since start"
        )
        return [
            totals,
            requests_frame(events),
            tokens_frame(events),
            pd.DataFrame(event_rows(events), columns=EVENT_HEADERS),
            pd.DataFrame(family_rows(usage), columns=FAMILY_HEADERS),
        ]
