"""The Admin tab's owner controls (ui/owner.py) against a real server: IP rules saved and
loaded, a user's events shown, statistics exported; nothing works without the admin key."""

from __future__ import annotations

import asyncio
from pathlib import Path

import gradio as gr
import httpx

from tests.conftest import PAID
from ui.common import UIContext
from ui.owner import OwnerPanel

ADMIN = "admin-key-for-owner-ui-0001"


def panel_for(url: str) -> OwnerPanel:
    ctx = UIContext(
        title="t", self_url=url, space_host=None, space_id=None, services=("openai",),
        auth_mode="user_token", status=dict, recent=lambda n: [],
    )  # fmt: skip
    with gr.Blocks():
        key = gr.Textbox()
        return OwnerPanel(ctx, key)


def test_owner_panel_edits_ip_rules_shows_events_and_exports_statistics(proxy_app, fake_openai) -> None:
    served = proxy_app(
        OPENAI_KEY=PAID, OPENAI_BASE_URL=fake_openai.base_url, GATEKEEPER="user_token", ADMIN_KEY=ADMIN,
        EVENT_LOGGING="true",
    )  # fmt: skip
    panel = panel_for(served.url)
    token = httpx.post(
        f"{served.url}/admin/api/users", json={"nickname": "zed"}, headers={"authorization": f"Bearer {ADMIN}"}
    ).json()["token"]
    reply = httpx.post(
        f"{served.proxy()}/chat/completions",
        json={"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]},
        headers={"authorization": f"Bearer {token}"},
    )
    assert reply.status_code == 200

    async def run() -> None:
        wrong = await panel.save_rules("wrong-key", "203.0.113.0/24", "")
        assert "Wrong admin key" in wrong[panel.status]
        saved = await panel.save_rules(ADMIN, "203.0.113.0/24, 198.51.100.7", "")
        assert saved[panel.blacklist] == "203.0.113.0/24\n198.51.100.7/32"
        loaded = await panel.load_rules(ADMIN)
        assert loaded[panel.blacklist] == "203.0.113.0/24\n198.51.100.7/32" and loaded[panel.whitelist] == ""
        assert "IP blacklist: 2 range(s)" in loaded[panel.controls]
        assert "Event log: on; prompt logging: off" in loaded[panel.controls]

        shown = await panel.show_events(ADMIN, token, 10)
        table = shown[panel.events_table]
        assert list(table["Model"]) == ["gpt-4o"] and list(table["Status"]) == [200]

        assert (await panel.refresh_quota(ADMIN, token))[panel.status] == "Quota refreshed."
        assert (await panel.reset_counts(ADMIN))[panel.status] == "Counts reset for 1 user(s)."

        exported = await panel.export_stats(ADMIN, "Markdown", True)
        path = Path(exported[panel.stats_file].value["path"] if isinstance(exported[panel.stats_file].value, dict)
                    else exported[panel.stats_file].value)  # fmt: skip
        text = path.read_text()
        assert "| user-1 | gpt-4o | 1 | 1 | 0 |" in text and "zed" not in text

    asyncio.run(run())
    assert served.runtime.owner.rules.blocked("203.0.113.50")
