""" "My usage": a friend pastes their own token and sees their quota and usage (`GET /proxy/me`)."""

from __future__ import annotations

import time

import gradio as gr
import pandas as pd

from ui.admin_api import user_state
from ui.common import UIContext, call_json, describe_error, esc, fmt_ago, fmt_time

ME_PATH = "/proxy/me"
QUOTA_HEADERS = ["Model family", "Tokens used", "Limit", "Remaining"]


def _used(value: object) -> int:
    if isinstance(value, dict):
        value = value.get("total", sum(v for v in value.values() if isinstance(v, (int, float))))
    return int(value) if isinstance(value, (int, float)) else 0


def _limit(value: object) -> int:
    """A positive limit, or 0 for none (the server treats 0 and missing as unlimited)."""
    return int(value) if isinstance(value, (int, float)) and value > 0 else 0


def quota_rows(user: dict) -> list[list[str]]:
    """Per family: used, limit, remaining. Prefers the server's `quota` (it knows requests in
    flight); falls back to token_counts / token_limits."""
    quota = user.get("quota") if isinstance(user.get("quota"), dict) else {}
    counts = user.get("token_counts") or {}
    limits = user.get("token_limits") or {}
    rows = []
    for family in sorted(set(counts) | set(limits) | set(quota)):
        entry = quota.get(family)
        if isinstance(entry, dict) and _limit(entry.get("limit")):
            used, limit = _used(entry.get("used")), _limit(entry.get("limit"))
            remaining = entry.get("remaining")
            remaining = _used(remaining) if isinstance(remaining, (int, float)) else max(0, limit - used)
        else:
            used, limit = _used(counts.get(family, 0)), _limit(limits.get(family))
            remaining = max(0, limit - used)
        if limit:
            rows.append([str(family), f"{used:,}", f"{limit:,}", f"{remaining:,}"])
        else:
            rows.append([str(family), f"{used:,}", "unlimited", "unlimited"])
    return rows


def me_summary(user: dict, now: float | None = None) -> str:
    """Markdown about the caller's own account; the token itself is never echoed."""
    now = time.time() if now is None else now
    nickname = str(user.get("nickname") or "").strip()
    expires = user.get("expires_at")
    max_ips = user.get("max_ips")
    ips = user.get("ip_count")
    ips = int(ips) if isinstance(ips, (int, float)) else len(user.get("ips") or [])
    lines = [
        f"**{esc(nickname)}**" if nickname else "**Your token**",
        f"State: **{esc(user_state(user, now))}** · type: {esc(user.get('type') or 'normal')}",
        f"Prompts: **{int(user.get('prompt_count') or 0):,}** · last used {fmt_ago(user.get('last_used_at'), now)}",
        f"IP addresses used: {ips}" + (f" of {int(max_ips)}" if isinstance(max_ips, (int, float)) and max_ips else ""),
        f"Expires: {fmt_time(expires)}" if expires else "Expires: never",
    ]
    at_once = user.get("concurrency_limit")
    if isinstance(at_once, int) and at_once > 0:
        lines.append(f"Requests at once: at most {at_once} ({int(user.get('requests_in_progress') or 0)} in progress)")
    if user.get("quota_exempt"):
        lines.append("No quotas or rate limits apply to you.")
    else:
        refill = user.get("quota_refills_at")
        if user.get("quota_refresh"):
            when = f", next at {fmt_time(refill)}" if isinstance(refill, (int, float)) else ""
            lines.append(f"Quotas refill {esc(user['quota_refresh'])}{when}.")
        spent = [row[0] for row in quota_rows(user) if row[3] == "0"]
        if spent:
            until = "until the administrator raises it"
            if isinstance(refill, (int, float)):
                until = f"until {fmt_time(refill)}"
            lines.append(f"Spent: {esc(', '.join(spent))}. Requests to these families are refused {until}.")
    return "  \n".join(lines)


class MePanel:
    def __init__(self, ctx: UIContext) -> None:
        self.ctx = ctx
        gr.Markdown(
            "Paste **your own user token** to see your quota and usage. "
            "It is sent only to this server's `/proxy/me` and never shown back.",
            elem_classes=["muted"],
        )
        with gr.Row(elem_classes=["form-row"]):
            self.token = gr.Textbox(label="Your user token", type="password", value="", scale=4, elem_id="me-token")
            self.button = gr.Button("Show usage", variant="primary", scale=1, min_width=160, elem_id="me-show")
        self.summary = gr.Markdown("", elem_id="me-summary")
        self.table = gr.Dataframe(
            value=pd.DataFrame([], columns=QUOTA_HEADERS),
            headers=QUOTA_HEADERS,
            interactive=False,
            show_label=False,
            visible=False,
            elem_id="me-table",
        )

    async def lookup(self, token: str | None, request: gr.Request | None = None):
        if not (token or "").strip():
            return "Paste your token first.", gr.Dataframe(visible=False)
        result = await call_json(self.ctx, "GET", ME_PATH, credential=token, request=request)
        if not result.ok or not isinstance(result.data, dict):
            return describe_error(result.status, result.data), gr.Dataframe(visible=False)
        user = result.data.get("user", result.data)
        if not isinstance(user, dict):
            return describe_error(502, "unexpected reply"), gr.Dataframe(visible=False)
        frame = pd.DataFrame(quota_rows(user), columns=QUOTA_HEADERS)
        return me_summary(user), gr.Dataframe(value=frame, visible=True)

    def wire(self) -> None:
        kwargs = dict(
            fn=self.lookup,
            inputs=[self.token],
            outputs=[self.summary, self.table],
            api_visibility="private",
            concurrency_limit=None,
        )
        self.button.click(**kwargs)
        self.token.submit(**kwargs)
