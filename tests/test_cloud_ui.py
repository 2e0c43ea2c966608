"""The page's cards and the /status rows for the cloud services (Azure, Bedrock, Vertex)."""

from __future__ import annotations

import httpx

from tests.conftest import PROXY_KEY, make_settings, serve
from ui.common import service_label
from ui.connect import share_urls, snippets


def test_cloud_claude_cards_point_the_anthropic_sdk_and_sillytavern_at_the_claude_route() -> None:
    for service in ("aws", "gcp"):
        items = {s.title: s.code for s in snippets(service, "https://space.example", "proxy_key")}
        assert "**Chat Completion Source**: Claude" in items["SillyTavern"]
        assert f"   https://space.example/proxy/{service}/claude/v1\n" in items["SillyTavern"]
        assert f'base_url="https://space.example/proxy/{service}/claude"' in items["LangChain / litellm"]
        assert f'base_url="https://space.example/proxy/{service}/claude"' in items["Anthropic SDK"]
        assert f'base_url="https://space.example/proxy/{service}/claude/v1"' in items["OpenAI SDK (OpenAI format)"]
        assert f"curl https://space.example/proxy/{service}/claude/v1/messages" in items["curl"]
    assert service_label("aws") == "AWS Bedrock (Claude)" and service_label("gcp") == "Google Vertex AI (Claude)"


def test_the_azure_card_is_an_openai_compatible_one_on_its_openai_route() -> None:
    steps = snippets("azure", "https://space.example", "none")[0].code
    assert "Custom (OpenAI-compatible)" in steps and "https://space.example/proxy/azure/openai/v1" in steps
    assert share_urls("https://h", ("azure", "aws")) == {
        "azure": "https://h/proxy/azure/openai/v1", "aws": "https://h/proxy/aws/claude/v1",
    }  # fmt: skip


def test_status_rows_name_each_cloud_route_and_hold_no_credential(tmp_path) -> None:
    from proxy.server import create_app

    secret_key = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
    env = {
        "AZURE_CREDENTIALS": "res:dep:0123456789abcdef0123456789abcdef",
        "AWS_CREDENTIALS": f"AKIAIOSFODNN7EXAMPLE:{secret_key}:us-east-1",
        "PROXY_KEY": PROXY_KEY,
    }
    settings = make_settings(env, tmp_path)
    with serve(create_app(settings), settings) as served:
        status = httpx.get(served.url + "/status", timeout=10)
    body = status.json()
    assert body["endpoints"]["azure"] == f"{served.url}/proxy/azure/openai/v1"
    assert body["endpoints"]["aws"] == f"{served.url}/proxy/aws/claude/v1"
    assert [k["id"][:4] for k in body["keys"]["aws"]["keys"]] == ["aws-"]
    assert body["keys"]["azure"]["total"] == 1
    for secret in ("0123456789abcdef0123456789abcdef", "AKIAIOSFODNN7EXAMPLE", secret_key):
        assert secret not in status.text
