"""Connect panel: the URLs to share and ready-to-paste set-up for common clients."""

from __future__ import annotations

from dataclasses import dataclass

import gradio as gr

from ui.common import (
    KNOWN_SERVICES,
    UIContext,
    preferred_model,
    public_base_url,
    served_models,
    service_label,
    service_path,
)

# Named only while no live key has listed its models yet (the snippets then say so).
FALLBACK_MODELS = {
    "openai": "gpt-4o-mini",
    "anthropic": "claude-haiku-4-5",
    "google-ai": "gemini-2.5-flash",
    "deepseek": "deepseek-chat",
    "xai": "grok-4",
    "mistral-ai": "mistral-small-latest",
    "openrouter": "openai/gpt-4o-mini",
    "groq": "llama-3.3-70b-versatile",
    "azure": "gpt-4o",
    "aws": "claude-sonnet-4-5",
    "gcp": "claude-sonnet-4-5",
}
CLAUDE_SERVICES = ("anthropic", "aws", "gcp")  # Anthropic's API (and the OpenAI door)
FIRST_PARTY = ("openai", "anthropic", "google-ai", "aws", "gcp")  # any other service is OpenAI-compatible
NATIVE_CLIENTS = "Anthropic SDK, LangChain, litellm anthropic/, llm-anthropic"


@dataclass(frozen=True)
class Snippet:
    title: str
    language: str  # a gr.Code language, or "markdown" for steps rendered as text
    code: str


def native_url(base: str, service: str) -> str:
    """The base URL for clients that add `/v1/...` themselves (the Anthropic SDK and friends)."""
    return base.rstrip("/") + service_path(service).removesuffix("/v1")


def example_model(ctx: UIContext, service: str) -> str:
    """A model the live keys serve, for the snippets; a common one while none is known yet."""
    return preferred_model(served_models(ctx, service)) or FALLBACK_MODELS.get(service, "MODEL_NAME")


def share_urls(base: str, services: tuple[str, ...]) -> dict[str, str]:
    """The OpenAI-style base URL of each configured service, e.g. `<base>/proxy/openai/v1`."""
    base = base.rstrip("/")
    return {service: base + service_path(service) for service in services}


def credential_placeholder(auth_mode: str) -> str:
    """What to write where a client wants an API key; never the real secret."""
    return {"proxy_key": "YOUR_PROXY_KEY", "user_token": "YOUR_USER_TOKEN"}.get(auth_mode, "anything")


def sillytavern_steps(service: str, url: str, auth_mode: str, model: str = "") -> str:
    """Numbered steps (Markdown): they keep their shape at any width."""
    password = {
        "proxy_key": "the proxy key",
        "user_token": "your user token",
    }.get(auth_mode, "anything (no password is needed)")
    pick = f"pick **{model}** (a model this proxy serves)" if model else "pick a model"
    if service not in FIRST_PARTY:
        return (
            "In SillyTavern, open **API Connections** (the plug icon), then:\n\n"
            "1. **API**: Chat Completion\n"
            "2. **Chat Completion Source**: Custom (OpenAI-compatible)\n"
            "3. **Custom Endpoint (Base URL)**:\n\n"
            f"   ```text\n   {url}\n   ```\n"
            f"4. **Custom API Key**: {password}\n"
            f"5. Press **Connect**, then {pick}.\n"
        )
    source = {"google-ai": "Google AI Studio"}.get(service, "Claude" if service in CLAUDE_SERVICES else "OpenAI")
    if service == "google-ai":
        url = url.removesuffix("/v1")  # SillyTavern adds /v1beta/models/... itself
    return (
        "In SillyTavern, open **API Connections** (the plug icon), then:\n\n"
        "1. **API**: Chat Completion\n"
        f"2. **Chat Completion Source**: {source}\n"
        "3. **Reverse Proxy → Proxy Server URL**:\n\n"
        f"   ```text\n   {url}\n   ```\n"
        f"4. **Reverse Proxy → Proxy Password**: {password}\n"
        f"5. Press **Connect**, then {pick}.\n"
    )


def snippets(service: str, base: str, auth_mode: str, model: str | None = None) -> list[Snippet]:
    """Set-up text for one service, built around the public base URL and a served model."""
    base = base.rstrip("/")
    url = base + service_path(service)
    key = credential_placeholder(auth_mode)
    model = model or FALLBACK_MODELS.get(service, "MODEL_NAME")
    openai_sdk = (
        "from openai import OpenAI\n\n"
        f'client = OpenAI(base_url="{url}", api_key="{key}")\n'
        "reply = client.chat.completions.create(\n"
        f'    model="{model}",\n'
        '    messages=[{"role": "user", "content": "Hello!"}],\n'
        ")\n"
        "print(reply.choices[0].message.content)\n"
    )
    items = [Snippet("SillyTavern", "markdown", sillytavern_steps(service, url, auth_mode, model))]
    if service in CLAUDE_SERVICES:
        items.append(
            Snippet(
                "Anthropic SDK",
                "python",
                "import anthropic\n\n"
                "# The SDK adds /v1/messages itself: the base URL has no /v1.\n"
                f'client = anthropic.Anthropic(base_url="{native_url(base, service)}", api_key="{key}")\n'
                "message = client.messages.create(\n"
                f'    model="{model}",\n'
                "    max_tokens=512,\n"
                '    messages=[{"role": "user", "content": "Hello!"}],\n'
                ")\n"
                "print(message.content[0].text)\n",
            )
        )
        native = native_url(base, service)
        items.append(
            Snippet(
                "LangChain / litellm",
                "python",
                "# Both add /v1/messages themselves: the base URL has no /v1.\n"
                "from langchain_anthropic import ChatAnthropic\n\n"
                f'llm = ChatAnthropic(model="{model}", base_url="{native}", api_key="{key}")\n'
                'print(llm.invoke("Hello!").content)\n\n'
                "import litellm\n\n"
                "reply = litellm.completion(\n"
                f'    model="anthropic/{model}",\n'
                f'    api_base="{native}",\n'
                f'    api_key="{key}",\n'
                '    messages=[{"role": "user", "content": "Hello!"}],\n'
                ")\n",
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
    """Builds the Connect tab; `wire(demo)` fills the URLs from the page's own request, and the
    snippets with a model the live keys serve (again when that model changes)."""

    def __init__(self, ctx: UIContext) -> None:
        self.ctx = ctx
        self.url_boxes: dict[str, list[gr.Textbox]] = {}
        self.code_boxes: dict[str, list[gr.Code | gr.Markdown]] = {}
        services = tuple(ctx.services)
        self.shown_models = gr.State(None)  # the models the snippets name; refreshed when it changes
        gr.Markdown(
            "Share the base URL below with your friends. Clients talk to it exactly as they "
            "would talk to the provider; the real keys never leave this server.",
            elem_classes=["muted"],
        )
        if not services:
            gr.Markdown("No provider keys are configured yet, so there is nothing to connect to.")
        for service in services:
            with gr.Column(elem_classes=["service-card"]):
                boxes = [
                    gr.Textbox(
                        label=f"{service_label(service)} base URL"
                        + (" — SillyTavern, OpenAI SDK, curl" if service in CLAUDE_SERVICES else ""),
                        value="",
                        placeholder="loading…",
                        interactive=False,
                        buttons=["copy"],
                        elem_id=f"share-url-{service}",
                    )
                ]
                if service in CLAUDE_SERVICES:
                    boxes.append(
                        gr.Textbox(
                            label=f"{service_label(service)} base URL — {NATIVE_CLIENTS} (no /v1: they add it)",
                            value="",
                            placeholder="loading…",
                            interactive=False,
                            buttons=["copy"],
                            elem_id=f"share-url-{service}-native",
                        )
                    )
                self.url_boxes[service] = boxes
                with gr.Accordion("Set-up instructions", open=service == services[0]):
                    codes: list[gr.Code | gr.Markdown] = []
                    with gr.Tabs(overflow_behavior="wrap"):
                        for snippet in snippets(service, "https://example", ctx.auth_mode):
                            with gr.Tab(snippet.title):
                                if snippet.language == "markdown":
                                    codes.append(gr.Markdown("", elem_classes=["steps"]))
                                    continue
                                codes.append(
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
                    self.code_boxes[service] = codes
        for service in KNOWN_SERVICES:
            if service not in services:
                gr.Markdown(missing_service_note(service), elem_classes=["note"])

    def outputs(self) -> list[gr.components.Component]:
        out: list[gr.components.Component] = []
        for service, boxes in self.url_boxes.items():
            out.extend(boxes)
            out.extend(self.code_boxes[service])
        return out

    def models(self) -> dict[str, str]:
        return {service: example_model(self.ctx, service) for service in self.url_boxes}

    def values(self, request: gr.Request | None = None, models: dict[str, str] | None = None) -> list[str]:
        base = public_base_url(self.ctx, request)
        urls = share_urls(base, tuple(self.url_boxes))
        models = models or self.models()
        values: list[str] = []
        for service in self.url_boxes:
            values.append(urls[service])
            if service in CLAUDE_SERVICES:
                values.append(native_url(base, service))
            values.extend(s.code for s in snippets(service, base, self.ctx.auth_mode, models[service]))
        return values

    def wire(self, demo: gr.Blocks) -> None:
        if not self.url_boxes:
            return
        outputs = [*self.outputs(), self.shown_models]

        def fill(shown: dict | None, request: gr.Request) -> list:
            models = self.models()
            if models == shown:
                return [gr.skip()] * len(outputs)
            return [*self.values(request, models), models]

        timer = gr.Timer(10)
        for trigger in (demo.load, timer.tick):
            trigger(
                fill,
                inputs=[self.shown_models],
                outputs=outputs,
                api_visibility="private",
                concurrency_limit=None,
                show_progress="hidden",
            )
