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


def test_the_whole_app_shows_a_card_and_a_keys_table_per_cloud_and_no_credential(tmp_path) -> None:
    import json

    from tests.browser_util import serve_whole_app
    from tests.fakes_cloud import service_account

    info, _ = service_account("page@proj.iam.gserviceaccount.com", "proj")
    azure_key, aws_secret = "0123456789abcdef0123456789abcdef", "wJalrXUtnFEMI/K7MDENG/bPxRfiCYPAGEKEY"
    env = {
        "AZURE_CREDENTIALS": f"res:dep:{azure_key}", "AZURE_ENDPOINT_TEMPLATE": "http://127.0.0.1:9/{resource}",
        "AWS_CREDENTIALS": f"AKIAPAGEEXAMPLE00001:{aws_secret}:us-east-1", "AWS_ENDPOINT_URL": "http://127.0.0.1:9",
        "GCP_CREDENTIALS": json.dumps(info), "GCP_VERTEX_BASE_URL": "http://127.0.0.1:9",
        "GCP_TOKEN_URL": "http://127.0.0.1:9/token", "PROXY_KEY": PROXY_KEY,
    }  # fmt: skip
    settings = make_settings(env, tmp_path)
    with serve_whole_app(settings) as served, httpx.Client(base_url=served.url, trust_env=False) as client:
        config = client.get("/config").text
        status = client.get("/status").text
    for service in ("azure", "aws", "gcp"):
        assert f"share-url-{service}" in config and f"keys-table-{service}" in config
    assert "share-url-aws-native" in config and "AWS Bedrock (Claude)" in config
    pem_line = info["private_key"].splitlines()[1]
    secrets = [azure_key, "AKIAPAGEEXAMPLE00001", aws_secret, info["private_key_id"], pem_line]
    for secret in secrets:
        assert secret not in config and secret not in status
