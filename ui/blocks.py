"""The web UI: one gr.Blocks composed from the panels, plus the theme and CSS to mount it with.

app = gr.mount_gradio_app(app, build_ui(ctx), path="/", ssr_mode=False,
                          theme=build_theme(), css=CSS, footer_links=[], run_history=False)
"""

from __future__ import annotations

import time

import gradio as gr

from ui.admin import AdminPanel
from ui.chat import ChatPanel
from ui.common import UIContext, auth_hint, esc, fmt_duration, safe_markdown, safe_status, service_label
from ui.connect import ConnectPanel
from ui.keys import KeysPanel
from ui.me import MePanel
from ui.pow import PowPanel
from ui.usage import UsagePanel

REFRESH_SECONDS = 5
REFRESH_RENDER_SECONDS = 1.0  # the live panels are rendered at most this often, for everyone
SPACE_SECRETS = (
    "`OPENAI_KEY` and/or `ANTHROPIC_KEY` (your provider keys, comma-separated for several), "
    "`PROXY_KEY` (one password for all your friends) or `ADMIN_KEY` (to hand out personal "
    "user tokens from the Admin tab)"
)

CSS = """
.form-row { align-items: flex-end !important; }
.form-row > button { flex-grow: 0 !important; align-self: flex-end; min-height: 42px; margin-bottom: 6px; }
#proxy-header h1 { margin-bottom: 0.2rem; }
#proxy-header p { margin: 0.1rem 0; }
.service-card {
  border: 1px solid var(--border-color-primary);
  border-radius: var(--radius-lg);
  padding: var(--spacing-lg);
  background: var(--block-background-fill);
}
.muted, .muted p { color: var(--body-text-color-subdued); }
.note { border-left: 3px solid var(--color-accent); padding-left: var(--spacing-lg); }
[id^="share-url-"] input { font-family: var(--font-mono); }
.steps ol { padding-left: 1.4em; }
.steps pre, .steps pre code { white-space: pre-wrap !important; word-break: break-all; }
/* Phones: rows stack, nothing is wider than the screen, tables keep their first columns in view. */
@media (max-width: 640px) {
  .form-row { flex-direction: column !important; align-items: stretch !important; }
  .form-row > * { min-width: 0 !important; width: 100% !important; }
  .form-row > button { align-self: stretch; margin-bottom: 0; }
  .plots { flex-direction: column !important; }
  .plots > * { flex: none !important; width: 100% !important; }
  .service-card { padding: var(--spacing-md); }
  #main-tabs .tab-container button { padding-left: 8px; padding-right: 8px; }
  .table-wrap td, .table-wrap th { padding: 4px 6px !important; }
}
"""


def build_theme() -> gr.themes.Base:
    """A calm theme with system fonts (no requests to font CDNs)."""
    return gr.themes.Soft(
        primary_hue="indigo",
        secondary_hue="violet",
        neutral_hue="slate",
        radius_size="md",
        font=["ui-sans-serif", "system-ui", "-apple-system", "Segoe UI", "sans-serif"],
        font_mono=["ui-monospace", "SFMono-Regular", "Menlo", "Consolas", "monospace"],
    )


def header_markdown(ctx: UIContext, snapshot: dict) -> str:
    """Title, who may use it, what it serves, uptime and users active; everything escaped."""
    title = esc(snapshot.get("title") or ctx.title or "OAI Reverse Proxy")
    mode = str(snapshot.get("gatekeeper") or ctx.auth_mode)
    services = ", ".join(esc(service_label(s)) for s in ctx.services) or "nothing yet (no keys configured)"
    uptime = snapshot.get("uptime_s")
    uptime_text = fmt_duration(float(uptime)) if isinstance(uptime, (int, float)) else "—"
    usage = snapshot.get("usage") if isinstance(snapshot.get("usage"), dict) else {}
    active = usage.get("active_users_1m")
    users = f" · {int(active)} user{'s' if active != 1 else ''} in the last minute" if isinstance(active, int) else ""
    text = f"# {title}\n{esc(auth_hint(mode))}  \nServing: {services} · up {uptime_text}{users}"
    if snapshot.get("prompt_logging"):  # every visitor must see it (PROMPT_LOGGING=true)
        text += f"\n\n**⚠ {esc(str(snapshot.get('notice') or 'Prompts are logged by the owner.'))}**"
    return text


def locked_snapshot(snapshot: dict) -> dict:
    """What strangers see while SERVICE_INFO_PASSWORD hides the status and usage."""
    shown = ("uptime_s", "title", "gatekeeper", "prompt_logging", "notice")  # the prompt-log notice too
    return {k: snapshot[k] for k in shown if k in snapshot} | {"locked": True}


def space_note(ctx: UIContext) -> str:
    return (
        f"**Want your own?** Duplicate this Space, then in its Settings → *Variables and secrets* add {SPACE_SECRETS}."
    )


def build_ui(ctx: UIContext) -> gr.Blocks:
    """Build the whole page. Every event is private (not an API endpoint); anything
    privileged is decided by the proxy over HTTP with the credential the visitor typed."""
    with gr.Blocks(title=ctx.title or "OAI Reverse Proxy", analytics_enabled=False, delete_cache=(600, 900)) as demo:
        header = gr.Markdown(header_markdown(ctx, {"title": ctx.title}), elem_id="proxy-header")
        if ctx.greeting.strip():
            gr.Markdown(safe_markdown(ctx.greeting), elem_id="greeting", elem_classes=["note"])
        if ctx.space_id:
            with gr.Row(equal_height=True, elem_id="space-note"):
                gr.DuplicateButton(scale=0, elem_id="duplicate-button")
                gr.Markdown(space_note(ctx))
        info_ok = gr.State(ctx.info_check is None)  # server-side: set only by a checked password
        if ctx.info_check is not None:
            with gr.Row(elem_classes=["form-row"], elem_id="info-row"):
                info_password = gr.Textbox(
                    label="Service info password (status and usage)",
                    type="password",
                    value="",
                    scale=4,
                    elem_id="info-password",
                )
                info_button = gr.Button("Show status", scale=1, min_width=160, elem_id="info-show")
        with gr.Tabs(elem_id="main-tabs", overflow_behavior="wrap"):
            with gr.Tab("Connect", id="connect"):
                connect = ConnectPanel(ctx)
            with gr.Tab("Keys", id="keys"):
                keys = KeysPanel(ctx)
            with gr.Tab("Usage", id="usage"):
                usage = UsagePanel(ctx)
            with gr.Tab("Test chat", id="chat"):
                chat = ChatPanel(ctx)
            # Personal tokens exist only in user_token mode; the Admin tab only with an ADMIN_KEY.
            with gr.Tab("My usage", id="me", visible=ctx.auth_mode == "user_token"):
                me = MePanel(ctx)
            pow_info = safe_status(ctx).get("proof_of_work")
            pow_panel = None
            if isinstance(pow_info, dict):  # CAPTCHA_MODE=proof_of_work (ui/pow.py)
                with gr.Tab("Get a token", id="pow"):
                    pow_panel = PowPanel(ctx, pow_info)
            with gr.Tab("Admin", id="admin", visible=ctx.admin_enabled):
                admin = AdminPanel(ctx)

        rendered: dict[bool, tuple[float, list]] = {}  # per lock state: when, and the outputs then

        def refresh(unlocked: bool = ctx.info_check is None) -> list:
            # Rendered at most once a second for all visitors, however many poll the page.
            now = time.monotonic()
            last = rendered.get(unlocked)
            if last is not None and now - last[0] < REFRESH_RENDER_SECONDS:
                return last[1]
            snapshot = safe_status(ctx)
            if not unlocked:
                snapshot = locked_snapshot(snapshot)
            outputs = [header_markdown(ctx, snapshot), *keys.values(snapshot), *usage.values(snapshot)]
            rendered[unlocked] = (now, outputs)
            return outputs

        live_outputs = [header, *keys.outputs(), *usage.outputs()]
        timer = gr.Timer(REFRESH_SECONDS)
        for trigger in (demo.load, timer.tick):
            trigger(
                refresh,
                inputs=[info_ok],
                outputs=live_outputs,
                api_visibility="private",
                # One refresh at a time for all visitors: a crowd polling the page queues up in
                # Gradio's queue instead of crowding the event loop the proxy's requests share.
                concurrency_limit=1,
                concurrency_id="live-refresh",
                show_progress="hidden",
            )
        if ctx.info_check is not None:
            check = ctx.info_check

            def unlock(password: str, request: gr.Request) -> list:
                unlocked = bool(check(password, request))
                return [unlocked, *refresh(unlocked)]

            for trigger in (info_button.click, info_password.submit):
                trigger(
                    unlock,
                    inputs=[info_password],
                    outputs=[info_ok, *live_outputs],
                    api_visibility="private",
                    concurrency_limit=None,
                )
        connect.wire(demo)
        chat.wire(demo)
        me.wire()
        admin.wire()
        if pow_panel is not None:
            pow_panel.wire()
    return demo
