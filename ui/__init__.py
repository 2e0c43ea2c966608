"""The Gradio web UI of OAI Reverse Proxy. `proxy/` never imports this package."""

from ui.blocks import CSS, build_theme, build_ui
from ui.common import UIContext

__all__ = ["CSS", "UIContext", "build_theme", "build_ui"]
