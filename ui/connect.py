"""Connect panel: the URLs to share and ready-to-paste set-up for common clients."""

from __future__ import annotations

from dataclasses import dataclass

import gradio as gr

from ui.common import KNOWN_SERVICES, UIContext, public_base_url, service_label, service_path

EXAMPLE_MODELS = {
    "openai": "gpt-4o-mini",
    "anthropic": "claude-3-5-haiku-latest",
    "google-ai": "gemini-2.5-flash",
    "deepseek": "deepseek-chat",
    "xai": "grok-4",
    "mistral-ai": "mistral-small-latest",
    "openrouter": "openai/gpt-4o-mini",
    "groq": "llama-3.3-70b-versatile",
}
FIRST_PARTY = ("openai", "anthropic", "google-ai")  # any other service is OpenAI-compatible


@dataclass(frozen=True)
class Snippet:
    title: str
    language: str  # a gr.Code language
    code: str


def share_urls(base: str, services: tuple[str, ...]) -> dict[str, str]:
    """The OpenAI-style base URL of each configured service, e.g. `<base>/proxy/openai/v1`."""
    base = base.rstrip("/")
    return {service: base + service_path(service) for service in services}


def credential_placeholder(auth_mode: str) -> str:
    """What to write where a client wants an API key; never the real secret."""
    return {"proxy_key": "YOUR_PROXY_KEY", "user_token": "YOUR_USER_TOKEN"}.get(auth_mode, "anything")


def sillytavern_steps(service: str, url: str, auth_mode: str) -> str:
    password = {
        "proxy_key": "the proxy key",
        "user_token": "your user token",
    }.get(auth_mode, "anything (no password is needed)")
    if service not in FIRST_PARTY:
        return (
            "SillyTavern → API Connections (plug icon)\n"
            "  API:                     Chat Completion\n"
            "  Chat Completion Source:  Custom (OpenAI-compatible)\n"
            f"  Custom Endpoint (Base URL):  {url}\n"
            f"  Custom API Key:              {password}\n"
            "Then press Connect and pick a model."
        )
    source = {"anthropic": "Claude", "google-ai": "Google AI Studio"}.get(service, "OpenAI")
    if service == "google-ai":
        url = url.removesuffix("/v1")  # SillyTavern adds /v1beta/models/... itself
    return (
        "SillyTavern → API Connections (plug icon)\n"
        "  API:                     Chat Completion\n"
        f"  Chat Completion Source:  {source}\n"
        f"  Reverse Proxy → Proxy Server URL:  {url}\n"
        f"  Reverse Proxy → Proxy Password:    {password}\n"
        "Then press Connect and pick a model."
    )


def snippets(service: str, base: str, auth_mode: str) -> list[Snippet]:
    """Set-up text for one service, built around the public base URL."""
    base = base.rstrip("/")
    url = base + service_path(service)
    key = credential_placeholder(auth_mode)
    model = EXAMPLE_MODELS.get(service, "MODEL_NAME")
    openai_sdk = (
        "from openai import OpenAI\n\n"
        f'client = OpenAI(base_url="{url}", api_key="{key}")\n'
        "reply = client.chat.completions.create(\n"
        f'    model="{model}",\n'
        '    messages=[{"role": "user", "content": "Hello!"}],\n'
        ")\n"
        "print(reply.choices[0].message.content)\n"
    )
    items = [Snippet("SillyTavern", "shell", sillytavern_steps(service, url, auth_mode))]
    if service == "anthropic":
        items.append(
            Snippet(
                "Anthropic SDK",
                "python",
                "import anthropic\n\n"
                f'client = anthropic.Anthropic(base_url="{base}/proxy/anthropic", api_key="{key}")\n'
                "message = client.messages.create(\n"
                f'    model="{model}",\n'
                "    max_tokens=512,\n"
                '    messages=[{"role": "user", "content": "Hello!"}],\n'
                ")\n"
                "print(message.content[0].text)\n",
            )
        )
        items.append(Snippet("OpenAI SDK (OpenAI format)", "python", openai_sdk))
        items.append(
            Snippet(
                "curl",
                "shell",
                f"curl {url}/messages \\\n"
                f'  -H "x-api-key: {key}" \\\n'
                '  -H "anthropic-version: 2023-06-01" \\\n'
                '  -H "content-type: application/json" \\\n'
                f'  -d \'{{"model": "{model}", "max_tokens": 256, '
                '"messages": [{"role": "user", "content": "Hello!"}]}\'\n',
            )
        )
    elif service == "google-ai":
        items.append(
            Snippet(
                "Google Gen AI SDK",
                "python",
                "from google import genai\n\n"
                f'client = genai.Client(api_key="{key}", http_options={{"base_url": "{base}/proxy/google-ai"}})\n'
                f'reply = client.models.generate_content(model="{model}", contents="Hello!")\n'
                "print(reply.text)\n",
            )
        )
        items.append(Snippet("OpenAI SDK (OpenAI format)", "python", openai_sdk))
        items.append(
            Snippet(
                "curl",
                "shell",
                f"curl {base}/proxy/google-ai/v1beta/models/{model}:generateContent \\\n"
                f'  -H "x-goog-api-key: {key}" \\\n'
                '  -H "content-type: application/json" \\\n'
                '  -d \'{"contents": [{"parts": [{"text": "Hello!"}]}]}\'\n',
            )
        )
    else:
        items.append(Snippet("OpenAI SDK (Python)", "python", openai_sdk))
        items.append(
            Snippet(
                "curl",
                "shell",
                f"curl {url}/chat/completions \\\n"
                f'  -H "Authorization: Bearer {key}" \\\n'
                '  -H "Content-Type: application/json" \\\n'
                f'  -d \'{{"model": "{model}", '
                '"messages": [{"role": "user", "content": "Hello!"}]}\'\n',
            )
        )
    return items


def missing_service_note(service: str) -> str:
    env = {"openai": "OPENAI_KEY", "anthropic": "ANTHROPIC_KEY"}.get(service, f"{service.upper()}_KEY")
    return (
        f"**{service_label(service)}: no key configured.** To enable it, add `{env}` "
        "(one key, or several separated by commas) as a **Space secret** (Settings → "
        "Variables and secrets) or to the `.env` file next to `app.py`, then restart."
    )


class ConnectPanel:
    """Builds the Connect tab; `wire(demo)` fills the URLs from the page's own request."""

    def __init__(self, ctx: UIContext) -> None:
        self.ctx = ctx
        self.url_boxes: dict[str, gr.Textbox] = {}
        self.code_boxes: dict[str, list[gr.Code]] = {}
        services = tuple(ctx.services)
        gr.Markdown(
            "Share the base URL below with your friends. Clients talk to it exactly as they "
            "would talk to the provider; the real keys never leave this server.",
            elem_classes=["muted"],
        )
        if not services:
            gr.Markdown("No provider keys are configured yet, so there is nothing to connect to.")
        for service in services:
            with gr.Column(elem_classes=["service-card"]):
                self.url_boxes[service] = gr.Textbox(
                    label=f"{service_label(service)} base URL",
                    value="",
                    placeholder="loading…",
                    interactive=False,
                    buttons=["copy"],
                    elem_id=f"share-url-{service}",
                )
                with gr.Accordion("Set-up instructions", open=service == services[0]):
                    boxes = []
                    with gr.Tabs():
                        for snippet in snippets(service, "https://example", ctx.auth_mode):
                            with gr.Tab(snippet.title):
                                boxes.append(
                                    gr.Code(
                                        value="",
                                        language=snippet.language,  # type: ignore[arg-type]
                                        interactive=False,
                                        show_label=False,
                                        lines=4,
                                        wrap_lines=True,
                                        show_line_numbers=False,
                                        buttons=["copy"],
                                    )
                                )
                    self.code_boxes[service] = boxes
        for service in KNOWN_SERVICES:
            if service not in services:
                gr.Markdown(missing_service_note(service), elem_classes=["note"])

    def outputs(self) -> list[gr.components.Component]:
        out: list[gr.components.Component] = []
        for service, box in self.url_boxes.items():
            out.append(box)
            out.extend(self.code_boxes[service])
        return out

    def values(self, request: gr.Request | None = None) -> list[str]:
        base = public_base_url(self.ctx, request)
        urls = share_urls(base, tuple(self.url_boxes))
        values: list[str] = []
        for service in self.url_boxes:
            values.append(urls[service])
            values.extend(s.code for s in snippets(service, base, self.ctx.auth_mode))
        return values

    def wire(self, demo: gr.Blocks) -> None:
        if not self.url_boxes:
            return

        def fill(request: gr.Request) -> list[str]:
            return self.values(request)

        demo.load(
            fill,
            inputs=None,
            outputs=self.outputs(),
            api_visibility="private",
            concurrency_limit=None,
            show_progress="hidden",
        )
