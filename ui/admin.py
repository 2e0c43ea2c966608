"""Admin tab: users, tokens, backups and key re-checks through the admin HTTP API.

Every event takes the admin key from the password box and sends it to `/admin/api`, which
checks it; tokens are shown masked, except a freshly created one, shown once and then cleared."""

from __future__ import annotations

import json
import time

import gradio as gr
import pandas as pd

from ui.admin_api import (
    USER_HEADERS,
    USER_TYPES,
    AdminAPI,
    add_limit,
    failure,
    limits_to_text,
    mask_token,
    mode_note,
    pick_token,
    user_body,
    user_rows,
    users_from,
)
from ui.common import UIContext, esc
from ui.owner import OwnerPanel

NEW_TOKEN_SECONDS = 120
# The pasted import travels in one Gradio event, under PAGE_MAX_BODY_BYTES (JSON-escaped there).
MAX_IMPORT_CHARS = 3_000_000


def users_frame(users: list[dict]) -> pd.DataFrame:
    return pd.DataFrame(user_rows(users), columns=USER_HEADERS)


def quota_defaults_text(defaults: dict[str, int] | None) -> str:
    """What an empty limits field means when creating a user, in plain words."""
    if not defaults:
        return (
            "Families you leave out have no limit: this server sets no TOKEN_QUOTA_<FAMILY> defaults. "
            "Write family=number for each family to limit."
        )
    listed = ", ".join(f"{family}={limit:,}" for family, limit in sorted(defaults.items()))
    return (
        f"Families you leave out get this server's defaults (TOKEN_QUOTA_<FAMILY>): {listed}. "
        "Any other family has no limit."
    )


class AdminPanel:
    def __init__(self, ctx: UIContext) -> None:
        self.ctx = ctx
        gr.Markdown(
            "Unlock with the server's `ADMIN_KEY`. The key stays in this box in your browser and "
            "is checked by the server on every action.",
            elem_classes=["muted"],
        )
        gr.Markdown(mode_note(ctx.auth_mode), elem_id="admin-mode")
        with gr.Row(elem_classes=["form-row"]):
            self.key = gr.Textbox(label="Admin key", type="password", value="", scale=4, elem_id="admin-key")
            self.unlock_btn = gr.Button("Unlock", variant="primary", scale=1, elem_id="admin-unlock")
            self.lock_btn = gr.Button("Lock", scale=1, elem_id="admin-lock")
        self.status = gr.Markdown("", elem_id="admin-status")
        users = ctx.auth_mode == "user_token"  # user tokens work only in that mode
        self.tokens = gr.State([])  # full tokens in table order; lives on the server only
        self.selected = gr.State("")  # full token of the selected user; server only

        with gr.Column(visible=False, elem_id="admin-area") as self.area:
            with gr.Accordion("Create a user token", open=True, visible=users):
                with gr.Row():
                    self.new_nickname = gr.Textbox(label="Nickname", max_length=80)
                    self.new_type = gr.Dropdown(list(USER_TYPES), value="normal", label="Type")
                    self.new_max_ips = gr.Number(label="Max IPs (0 = default)", precision=0, minimum=0)
                    self.new_expires = gr.Number(label="Expires in hours (0 = never)", minimum=0)
                self.new_limits = gr.Textbox(
                    label="Token limits per model family (family=0: no limit)",
                    placeholder="gpt-4o=100000, claude-sonnet=50000",
                    info=quota_defaults_text(ctx.quota_defaults),
                    elem_id="admin-new-limits",
                )
                with gr.Row(elem_classes=["form-row"]):
                    self.limit_family = gr.Dropdown(
                        list(ctx.families), value=None, label="Model family", scale=2, elem_id="admin-limit-family"
                    )
                    self.limit_tokens = gr.Number(label="Tokens", precision=0, minimum=0, scale=2)
                    self.limit_add = gr.Button("Add limit", scale=1, min_width=120, elem_id="admin-limit-add")
                self.create_btn = gr.Button("Create token", variant="primary", elem_id="admin-create")
                with gr.Row(elem_classes=["form-row"]):
                    self.new_token = gr.Textbox(
                        label="New token: copy it now, it is shown only once",
                        value="",
                        interactive=False,
                        buttons=["copy"],
                        visible=False,
                        scale=4,
                        elem_id="admin-new-token",
                    )
                    self.copied_btn = gr.Button("I copied it", visible=False, scale=1, elem_id="admin-new-token-done")
                self.new_token_timer = gr.Timer(NEW_TOKEN_SECONDS, active=False)

            with gr.Accordion("Users", open=True, visible=users):
                self.refresh_btn = gr.Button("↻ Refresh list", size="sm", elem_id="admin-refresh")
                self.table = gr.Dataframe(
                    value=users_frame([]),
                    headers=USER_HEADERS,
                    interactive=False,
                    wrap=True,
                    show_label=False,
                    max_height=420,
                    elem_id="admin-users-table",
                )
                gr.Markdown("Click a row to select a user, or paste a full token:", elem_classes=["muted"])
                with gr.Row(elem_classes=["form-row"]):
                    self.paste = gr.Textbox(
                        label="Token", type="password", value="", scale=4, elem_id="admin-token-input"
                    )
                    self.load_btn = gr.Button("Select", scale=1, elem_id="admin-select")
                self.selected_md = gr.Markdown("No user selected.", elem_id="admin-selected")

            self.recheck_btn = gr.Button("Re-check all provider keys", size="sm", elem_id="admin-recheck")
            with gr.Accordion("Edit the selected user", open=False, visible=users):
                with gr.Row():
                    self.edit_nickname = gr.Textbox(label="Nickname", max_length=80)
                    self.edit_type = gr.Dropdown(list(USER_TYPES), value=None, label="Type")
                    self.edit_max_ips = gr.Number(label="Max IPs (0 = unchanged)", precision=0, minimum=0)
                    self.edit_expires = gr.Number(label="Expires in hours from now (0 = unchanged)", minimum=0)
                self.edit_limits = gr.Textbox(
                    label="Token limits per model family (empty = unchanged, {} = none)",
                    placeholder="gpt-4o=100000",
                    info="What you write replaces all the user's limits; a family left out has no limit.",
                )
                self.save_btn = gr.Button("Save changes", variant="primary", elem_id="admin-save")
                with gr.Row(elem_classes=["form-row"]):
                    self.reason = gr.Textbox(label="Reason for disabling", scale=3, max_length=500)
                    self.disable_btn = gr.Button("Disable", variant="stop", scale=1, elem_id="admin-disable")
                    self.enable_btn = gr.Button("Enable", scale=1, elem_id="admin-enable")
                self.delete_btn = gr.Button("Delete user", variant="stop", size="sm", elem_id="admin-delete")

            with gr.Accordion("Backup", open=False), gr.Row():
                with gr.Column():
                    self.export_btn = gr.Button("Export users (JSON)", elem_id="admin-export")
                    # Handed over as text, once: no file is written, nothing stays in Gradio's cache.
                    self.export_file = gr.Textbox(
                        label="Export: every user's token, copy it somewhere safe",
                        visible=False,
                        interactive=False,
                        lines=6,
                        max_lines=12,
                        buttons=["copy"],
                        elem_id="admin-export-text",
                    )
                with gr.Column():
                    self.import_file = gr.Textbox(
                        label="Import users: paste an export's JSON",
                        lines=4,
                        max_lines=12,
                        max_length=MAX_IMPORT_CHARS,
                        elem_id="admin-import-text",
                    )
                    self.import_btn = gr.Button("Import", elem_id="admin-import")

            self.owner = OwnerPanel(ctx, self.key)  # ui/owner.py: IP rules, event log, statistics

    # ------------------------------------------------------------ helpers

    async def _listing(self, api: AdminAPI, key: str) -> dict:
        result = await api.list_users(key)
        if not result.ok:
            return {}
        users = users_from(result.data)
        return {self.table: users_frame(users), self.tokens: [str(u.get("token") or "") for u in users]}

    def _locked(self, message: str) -> dict:
        return {
            self.status: message,
            self.area: gr.Column(visible=False),
            self.table: users_frame([]),
            self.tokens: [],
            self.selected: "",
            self.selected_md: "No user selected.",
            self.new_token: gr.Textbox(value="", visible=False),
            self.copied_btn: gr.Button(visible=False),
            self.export_file: gr.Textbox(value="", visible=False),
            self.import_file: "",
        }

    # ------------------------------------------------------------ handlers

    async def unlock(self, key: str, request: gr.Request | None = None) -> dict:
        api = AdminAPI(self.ctx, request)
        result = await api.list_users(key)
        if not result.ok:
            return self._locked(failure(result, "unlock"))
        users = users_from(result.data)
        count = f" {len(users)} user{'s' if len(users) != 1 else ''}." if self.ctx.auth_mode == "user_token" else ""
        return {
            self.status: f"Unlocked.{count}",
            self.area: gr.Column(visible=True),
            self.table: users_frame(users),
            self.tokens: [str(u.get("token") or "") for u in users],
        }

    def lock(self) -> dict:
        return {**self._locked("Locked."), self.key: ""}

    async def create(
        self, key, nickname, user_type, limits, max_ips, expires, request: gr.Request | None = None
    ) -> dict:
        api = AdminAPI(self.ctx, request)
        try:
            body = user_body(
                nickname=nickname, user_type=user_type, limits_text=limits, max_ips=max_ips, expires_hours=expires
            )
        except ValueError as exc:
            return {self.status: f"Could not create: {esc(exc)}"}
        result = await api.create_user(key, body)
        token = result.data.get("token") if isinstance(result.data, dict) else None
        if not result.ok or not token:
            return {self.status: failure(result, "create the user")}
        name = esc(result.data.get("nickname") or "") or "the new user"
        return {
            self.status: f"Created a token for {name}. Copy it now: it will not be shown again.",
            self.new_token: gr.Textbox(value=str(token), visible=True),
            self.copied_btn: gr.Button(visible=True),
            self.new_token_timer: gr.Timer(active=True),
            self.new_nickname: "",
            self.new_limits: "",
            **await self._listing(api, key),
        }

    def add_limit(self, text: str, family: str | None, amount) -> dict:
        try:
            return {self.new_limits: add_limit(text, family, amount)}
        except ValueError as exc:
            return {self.status: f"Could not add the limit: {esc(exc)}"}

    def clear_new_token(self) -> dict:
        return {
            self.new_token: gr.Textbox(value="", visible=False),
            self.copied_btn: gr.Button(visible=False),
            self.new_token_timer: gr.Timer(active=False),
        }

    async def refresh(self, key: str, request: gr.Request | None = None) -> dict:
        api = AdminAPI(self.ctx, request)
        result = await api.list_users(key)
        if not result.ok:
            return {self.status: failure(result, "list users")}
        users = users_from(result.data)
        return {
            self.status: f"{len(users)} user{'s' if len(users) != 1 else ''}.",
            self.table: users_frame(users),
            self.tokens: [str(u.get("token") or "") for u in users],
        }

    async def _select_token(self, api: AdminAPI, key: str, token: str) -> dict:
        result = await api.get_user(key, token)
        if not result.ok or not isinstance(result.data, dict):
            return {
                self.status: failure(result, "load the user"),
                self.selected: "",
                self.selected_md: "No user selected.",
            }
        user = result.data.get("user", result.data)
        nickname = str(user.get("nickname") or "")
        expires = user.get("expires_at")
        return {
            self.status: "",
            self.selected: token,
            self.selected_md: f"Selected **{esc(mask_token(token))}** {esc(nickname)}",
            self.edit_nickname: nickname,
            self.edit_type: user.get("type") if user.get("type") in USER_TYPES else None,
            self.edit_max_ips: user.get("max_ips"),
            self.edit_expires: round(max(0.0, (expires - time.time()) / 3600), 2)
            if isinstance(expires, (int, float))
            else None,
            self.edit_limits: limits_to_text(user.get("token_limits")),
            self.reason: str(user.get("disabled_reason") or ""),
        }

    async def select_row(
        self, key: str, tokens: list[str], evt: gr.SelectData, request: gr.Request | None = None
    ) -> dict:
        api = AdminAPI(self.ctx, request)
        index = evt.index[0] if isinstance(evt.index, (list, tuple)) else evt.index
        masked = evt.row_value[0] if isinstance(evt.row_value, (list, tuple)) and evt.row_value else None
        token = pick_token(tokens or [], index if isinstance(index, int) else None, masked)
        if not token:
            return {self.status: "Could not tell which user that row is; paste the token instead."}
        return await self._select_token(api, key, token)

    async def select_pasted(self, key: str, pasted: str, request: gr.Request | None = None) -> dict:
        api = AdminAPI(self.ctx, request)
        if not (pasted or "").strip():
            return {self.status: "Paste a token first."}
        return {**await self._select_token(api, key, pasted.strip()), self.paste: ""}

    async def _update(self, api: AdminAPI, key: str, token: str, body: dict, done: str) -> dict:
        if not token:
            return {self.status: "Select a user first."}
        result = await api.update_user(key, token, body)
        if not result.ok:
            return {self.status: failure(result, "update the user")}
        return {self.status: done, **await self._listing(api, key)}

    async def save(
        self, key, token, nickname, user_type, limits, max_ips, expires, request: gr.Request | None = None
    ) -> dict:
        api = AdminAPI(self.ctx, request)
        try:
            body = user_body(
                nickname=nickname, user_type=user_type, limits_text=limits, max_ips=max_ips, expires_hours=expires
            )
        except ValueError as exc:
            return {self.status: f"Could not save: {esc(exc)}"}
        return await self._update(api, key, token, body, "Saved.")

    async def disable(self, key, token, reason, request: gr.Request | None = None) -> dict:
        api = AdminAPI(self.ctx, request)
        body = {"disabled": True, "disabled_reason": (reason or "").strip()[:500] or None}
        return await self._update(api, key, token, body, "User disabled.")

    async def enable(self, key, token, request: gr.Request | None = None) -> dict:
        api = AdminAPI(self.ctx, request)
        return await self._update(api, key, token, {"disabled": False, "disabled_reason": None}, "User enabled.")

    async def delete(self, key, token, request: gr.Request | None = None) -> dict:
        api = AdminAPI(self.ctx, request)
        if not token:
            return {self.status: "Select a user first."}
        result = await api.delete_user(key, token)
        if not result.ok:
            return {self.status: failure(result, "delete the user")}
        return {
            self.status: "User deleted.",
            self.selected: "",
            self.selected_md: "No user selected.",
            **await self._listing(api, key),
        }

    async def export(self, key: str, request: gr.Request | None = None) -> dict:
        api = AdminAPI(self.ctx, request)
        result = await api.export(key)
        if not result.ok:
            return {self.status: failure(result, "export")}
        return {
            self.status: "Export ready below: it holds every user's token, keep it safe. Lock clears it.",
            self.export_file: gr.Textbox(value=json.dumps(result.data, indent=2), visible=True),
        }

    async def import_(self, key: str, text: str | None, request: gr.Request | None = None) -> dict:
        api = AdminAPI(self.ctx, request)
        if not isinstance(text, str) or not text.strip():
            return {self.status: "Paste an export's JSON first."}
        checked = await api.list_users(key)  # the admin key first
        if not checked.ok:
            return {self.status: failure(checked, "import")}
        if len(text) > MAX_IMPORT_CHARS:
            return {self.status: f"That export is over {MAX_IMPORT_CHARS} characters."}
        try:
            data = json.loads(text)
        except ValueError:
            return {self.status: "That is not valid JSON."}
        result = await api.import_(key, data)
        if not result.ok:
            return {self.status: failure(result, "import")}
        count = result.data.get("imported") if isinstance(result.data, dict) else None
        return {
            self.status: f"Imported {int(count or 0)} user(s).",
            self.import_file: "",
            **await self._listing(api, key),
        }

    async def recheck(self, key: str, request: gr.Request | None = None) -> dict:
        api = AdminAPI(self.ctx, request)
        result = await api.recheck_keys(key)
        if not result.ok:
            return {self.status: failure(result, "start the key check")}
        return {self.status: "Key check started; the Keys tab updates as results come in."}

    # ------------------------------------------------------------ wiring

    def wire(self) -> None:
        everything = [
            self.key,
            self.status,
            self.area,
            self.table,
            self.tokens,
            self.selected,
            self.selected_md,
            self.new_nickname,
            self.new_limits,
            self.new_token,
            self.copied_btn,
            self.new_token_timer,
            self.export_file,
            self.import_file,
            self.paste,
            self.edit_nickname,
            self.edit_type,
            self.edit_max_ips,
            self.edit_expires,
            self.edit_limits,
            self.reason,
        ]

        def on(trigger, fn, inputs) -> None:
            trigger(fn, inputs=inputs, outputs=everything, api_visibility="private", concurrency_limit=None)

        key, selected = self.key, self.selected
        on(self.unlock_btn.click, self.unlock, [key])
        on(self.key.submit, self.unlock, [key])
        on(self.lock_btn.click, self.lock, None)
        create_inputs = [key, self.new_nickname, self.new_type, self.new_limits, self.new_max_ips, self.new_expires]
        on(self.create_btn.click, self.create, create_inputs)
        on(self.copied_btn.click, self.clear_new_token, None)
        self.limit_add.click(
            self.add_limit,
            inputs=[self.new_limits, self.limit_family, self.limit_tokens],
            outputs=[self.new_limits, self.status],
            api_visibility="private",
        )
        on(self.new_token_timer.tick, self.clear_new_token, None)
        on(self.refresh_btn.click, self.refresh, [key])
        on(self.recheck_btn.click, self.recheck, [key])
        on(self.table.select, self.select_row, [key, self.tokens])
        on(self.load_btn.click, self.select_pasted, [key, self.paste])
        on(self.paste.submit, self.select_pasted, [key, self.paste])
        edit_inputs = [
            key,
            selected,
            self.edit_nickname,
            self.edit_type,
            self.edit_limits,
            self.edit_max_ips,
            self.edit_expires,
        ]
        on(self.save_btn.click, self.save, edit_inputs)
        on(self.disable_btn.click, self.disable, [key, selected, self.reason])
        on(self.enable_btn.click, self.enable, [key, selected])
        on(self.delete_btn.click, self.delete, [key, selected])
        on(self.export_btn.click, self.export, [key])
        on(self.import_btn.click, self.import_, [key, self.import_file])
        self.owner.wire()
