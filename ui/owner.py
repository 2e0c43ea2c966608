"""Admin tab, owner controls: the IP blacklist and admin whitelist (edited at run time), a
user's recent events, and usage statistics exports. Every call goes to `/admin/api` with the
admin key typed in the Admin tab; the server checks it (and the admin whitelist)."""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

import gradio as gr
import pandas as pd

from ui.admin_api import ADMIN_PREFIX, failure
from ui.common import ApiResult, UIContext, call_json, esc, fmt_date

EVENT_HEADERS = ["Time", "Service", "Model", "Status", "Tokens in", "Tokens out", "Latency ms", "Queue ms", "Stream"]
EXPORT_LIFETIME_SECONDS = 300


def rules_text(entries: Any) -> str:
    return "\n".join(str(e) for e in entries or [])


def rules_list(text: str | None) -> list[str]:
    return [part.strip() for part in (text or "").replace(",", "\n").splitlines() if part.strip()]


def events_frame(events: list[dict]) -> pd.DataFrame:
    rows = [
        [
            fmt_date(e.get("time")),
            str(e.get("service") or ""),
            str(e.get("model") or ""),
            e.get("status"),
            e.get("tokens_in"),
            e.get("tokens_out"),
            e.get("latency_ms"),
            "" if e.get("queue_ms") is None else e.get("queue_ms"),
            "yes" if e.get("streamed") else "no",
        ]
        for e in events
        if isinstance(e, dict)
    ]
    return pd.DataFrame(rows, columns=EVENT_HEADERS)


def controls_markdown(summary: Any) -> str:
    """Which owner controls are on, and what they refused (escaped Markdown)."""
    if not isinstance(summary, dict):
        return ""

    def on(value: Any) -> str:
        return "on" if value else "off"

    vision = summary.get("allowed_vision_services")
    lines = [
        f"- IP blacklist: {int(summary.get('ip_blacklist') or 0)} range(s); admin whitelist: "
        f"{int(summary.get('admin_whitelist') or 0) or 'any address'}",
        f"- Blocked origins: {esc(', '.join(summary.get('blocked_origins') or [])) or 'none'}",
        f"- Reject phrases: {int(summary.get('reject_phrases') or 0)}",
        f"- Images allowed for: {'every service' if vision is None else esc(', '.join(vision)) or 'no service'}",
        f"- Context caps: {esc(str(summary.get('max_context_tokens') or 'none'))}; output caps: "
        f"{esc(str(summary.get('max_output_tokens') or 'none'))}",
        f"- Event log: {on(summary.get('event_logging'))}; prompt logging: {on(summary.get('prompt_logging'))}"
        + (f" ({int(summary.get('prompts_uploaded') or 0)} uploaded)" if summary.get("prompt_logging") else ""),
        f"- Self-service tokens: {esc(str(summary.get('captcha_mode') or 'none'))}",
    ]
    refused = summary.get("refused") or {}
    if isinstance(refused, dict) and refused:
        counts = ", ".join(f"{esc(str(k))}: {int(v)}" for k, v in sorted(refused.items()))
        lines.append(f"- Refused or changed since start: {counts}")
    if summary.get("prompt_log_error"):
        lines.append(f"- Prompt log upload error: {esc(str(summary['prompt_log_error']))}")
    return "\n".join(lines)


class OwnerPanel:
    """Built inside the Admin tab's unlocked area; `key` is the Admin tab's admin-key box."""

    def __init__(self, ctx: UIContext, key: gr.Textbox) -> None:
        self.ctx = ctx
        self.key = key
        with gr.Accordion("Owner controls", open=False):
            self.controls = gr.Markdown("Press Load to see which controls are on.", elem_id="owner-controls")
        with gr.Accordion("IP blacklist and admin whitelist", open=False):
            gr.Markdown(
                "One address or CIDR range per line. Blacklisted addresses are refused everywhere; when the "
                "whitelist is not empty, only its addresses reach the admin API and this tab.",
                elem_classes=["muted"],
            )
            with gr.Row():
                self.blacklist = gr.Textbox(label="IP blacklist", lines=4, elem_id="owner-blacklist")
                self.whitelist = gr.Textbox(label="Admin whitelist", lines=4, elem_id="owner-whitelist")
            with gr.Row():
                self.load_rules_btn = gr.Button("Load", size="sm", elem_id="owner-rules-load")
                self.save_rules_btn = gr.Button("Save", variant="primary", size="sm", elem_id="owner-rules-save")
        with gr.Accordion("Quotas", open=False):
            gr.Markdown(
                "Refreshing sets a user's limit for each family with a default quota (TOKEN_QUOTA_<FAMILY>) to "
                "what they have used plus that default. Resetting zeroes every user's counts.",
                elem_classes=["muted"],
            )
            with gr.Row(elem_classes=["form-row"]):
                self.quota_token = gr.Textbox(label="User token", type="password", scale=4, elem_id="owner-quota-token")
                self.refresh_btn = gr.Button("Refresh this user's quota", scale=1, elem_id="owner-refresh-quota")
            self.reset_btn = gr.Button("Reset every user's counts", variant="stop", size="sm", elem_id="owner-reset")
        with gr.Accordion("Event log", open=False):
            with gr.Row(elem_classes=["form-row"]):
                self.event_token = gr.Textbox(
                    label="User token (empty = everyone)", type="password", scale=4, elem_id="owner-event-token"
                )
                self.event_limit = gr.Number(label="Rows", value=50, precision=0, minimum=1, maximum=1000, scale=1)
                self.events_btn = gr.Button("Show events", scale=1, elem_id="owner-events")
            self.events_table = gr.Dataframe(
                value=events_frame([]),
                interactive=False,
                show_label=False,
                max_height=360,
                elem_id="owner-events-table",
            )
            with gr.Row(elem_classes=["form-row"]):
                self.stats_format = gr.Radio(["CSV", "Markdown"], value="CSV", label="Statistics format")
                self.anonymise = gr.Checkbox(label="Anonymise users", value=True)
                self.stats_btn = gr.Button("Export statistics", elem_id="owner-stats")
            self.stats_file = gr.File(label="Statistics", visible=False, interactive=False)
        self.status = gr.Markdown("", elem_id="owner-status")

    async def _call(self, key: str, method: str, path: str, body: Any = None, request: Any = None) -> ApiResult:
        if not (key or "").strip():
            return ApiResult(401, {"error": {"message": "enter the admin key first"}})
        return await call_json(self.ctx, method, path, credential=key, json_body=body, request=request)

    async def load_rules(self, key: str, request: gr.Request | None = None) -> dict:
        result = await self._call(key, "GET", f"{ADMIN_PREFIX}/ip-rules", request=request)
        if not result.ok or not isinstance(result.data, dict):
            return {self.status: failure(result, "load the IP rules")}
        summary = await self._call(key, "GET", f"{ADMIN_PREFIX}/controls", request=request)
        return {
            self.blacklist: rules_text(result.data.get("ip_blacklist")),
            self.whitelist: rules_text(result.data.get("admin_whitelist")),
            self.controls: controls_markdown(summary.data) if summary.ok else "",
            self.status: "Loaded.",
        }

    async def save_rules(self, key: str, black: str, white: str, request: gr.Request | None = None) -> dict:
        body = {"ip_blacklist": rules_list(black), "admin_whitelist": rules_list(white)}
        result = await self._call(key, "PUT", f"{ADMIN_PREFIX}/ip-rules", body, request)
        if not result.ok or not isinstance(result.data, dict):
            return {self.status: failure(result, "save the IP rules")}
        return {
            self.blacklist: rules_text(result.data.get("ip_blacklist")),
            self.whitelist: rules_text(result.data.get("admin_whitelist")),
            self.status: f"Saved: {len(body['ip_blacklist'])} blocked, {len(body['admin_whitelist'])} admin ranges.",
        }

    async def refresh_quota(self, key: str, token: str, request: gr.Request | None = None) -> dict:
        if not (token or "").strip():
            return {self.status: "Paste the user's token first."}
        path = f"{ADMIN_PREFIX}/users/{quote(token.strip(), safe='')}/refresh-quota"
        result = await self._call(key, "POST", path, request=request)
        if not result.ok:
            return {self.status: failure(result, "refresh the quota")}
        return {self.status: "Quota refreshed."}

    async def reset_counts(self, key: str, request: gr.Request | None = None) -> dict:
        result = await self._call(key, "POST", f"{ADMIN_PREFIX}/quotas/reset-all", request=request)
        if not result.ok or not isinstance(result.data, dict):
            return {self.status: failure(result, "reset the counts")}
        return {self.status: f"Counts reset for {int(result.data.get('reset') or 0)} user(s)."}

    async def show_events(self, key: str, token: str, limit: Any, request: gr.Request | None = None) -> dict:
        query = {"limit": int(limit or 50)}
        if (token or "").strip():
            query["user"] = token.strip()
        result = await self._call(key, "GET", f"{ADMIN_PREFIX}/events?{urlencode(query)}", request=request)
        if not result.ok or not isinstance(result.data, dict):
            return {self.status: failure(result, "read the event log")}
        events = result.data.get("events") or []
        return {self.events_table: events_frame(events), self.status: f"{len(events)} event(s)."}

    async def export_stats(self, key: str, fmt: str, anonymise: bool, request: gr.Request | None = None) -> dict:
        ext = "md" if fmt == "Markdown" else "csv"
        query = urlencode({"format": ext, "anonymise": "true" if anonymise else "false"})
        result = await self._call(key, "GET", f"{ADMIN_PREFIX}/stats?{query}", request=request)
        if not result.ok or not isinstance(result.data, str):
            return {self.status: failure(result, "export the statistics")}
        folder = tempfile.mkdtemp(prefix="proxy-stats-")
        path = Path(folder) / time.strftime(f"usage-%Y%m%d-%H%M%S.{ext}", time.gmtime())
        path.write_text(result.data, encoding="utf-8")
        os.chmod(path, 0o600)
        _remove_later(str(path))
        return {self.stats_file: gr.File(value=str(path), visible=True), self.status: esc("Statistics ready.")}

    def wire(self) -> None:
        outputs = [self.controls, self.blacklist, self.whitelist, self.events_table, self.stats_file, self.status]

        def on(trigger, fn, inputs) -> None:
            trigger(fn, inputs=inputs, outputs=outputs, api_visibility="private", concurrency_limit=None)

        on(self.load_rules_btn.click, self.load_rules, [self.key])
        on(self.save_rules_btn.click, self.save_rules, [self.key, self.blacklist, self.whitelist])
        on(self.refresh_btn.click, self.refresh_quota, [self.key, self.quota_token])
        on(self.reset_btn.click, self.reset_counts, [self.key])
        on(self.events_btn.click, self.show_events, [self.key, self.event_token, self.event_limit])
        on(self.stats_btn.click, self.export_stats, [self.key, self.stats_format, self.anonymise])


def _remove_later(path: str) -> None:
    import asyncio
    import contextlib

    def remove() -> None:
        with contextlib.suppress(OSError):
            os.remove(path)
            os.rmdir(os.path.dirname(path))

    with contextlib.suppress(RuntimeError):
        asyncio.get_running_loop().call_later(EXPORT_LIFETIME_SECONDS, remove)
