"""Configuration: read once from the environment (and .env), validated, never showing a secret."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from proxy.config import ConfigError, Settings, load_settings

KEY_A = "sk-config-aaaaaaaaaaaaaaaa"
KEY_B = "sk-config-bbbbbbbbbbbbbbbb"
KEY_C = "sk-config-cccccccccccccccc"


def settings(**env: str) -> Settings:
    """Settings from exactly these variables: no process environment, no .env file."""
    return load_settings(env, env_file=None)


@pytest.mark.parametrize(
    "raw",
    [
        f"{KEY_A},{KEY_B},{KEY_C}",
        f"{KEY_A} {KEY_B}  {KEY_C}",
        f"{KEY_A}\n{KEY_B}\r\n{KEY_C}\n",
        f" {KEY_A}, {KEY_B},\n\t{KEY_C} ,",
    ],
    ids=["commas", "spaces", "newlines", "mixed"],
)
def test_openai_key_holds_several_keys_split_by_commas_spaces_or_newlines(raw: str) -> None:
    assert settings(OPENAI_KEY=raw).openai_keys == [KEY_A, KEY_B, KEY_C]


def test_a_key_listed_twice_is_used_once() -> None:
    assert settings(OPENAI_KEY=f"{KEY_A},{KEY_B},{KEY_A}").openai_keys == [KEY_A, KEY_B]


def test_no_openai_key_is_a_valid_configuration() -> None:
    assert settings().openai_keys == []


def test_openai_base_url_defaults_to_openai() -> None:
    assert settings().openai_base_url == "https://api.openai.com/v1"


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("http://localhost:11434/v1", "http://localhost:11434/v1"),
        ("http://10.0.0.5:8000/v1/", "http://10.0.0.5:8000/v1"),
        ("https://llm.example.org/openai/v1", "https://llm.example.org/openai/v1"),
    ],
)
def test_openai_base_url_can_point_at_any_openai_compatible_server(raw: str, expected: str) -> None:
    assert settings(OPENAI_BASE_URL=raw).openai_base_url == expected


@pytest.mark.parametrize(
    ("env", "port"),
    [
        ({}, 7860),
        ({"GRADIO_SERVER_PORT": "7000"}, 7000),
        ({"PORT": "8080", "GRADIO_SERVER_PORT": "7000"}, 8080),
        ({"PORT": "", "GRADIO_SERVER_PORT": "7000"}, 7000),
        ({"PORT": "8080"}, 8080),
    ],
)
def test_port_comes_from_port_else_gradio_server_port_else_7860(env: dict[str, str], port: int) -> None:
    assert settings(**env).port == port


@pytest.mark.parametrize(
    ("env", "host"),
    [
        ({}, "0.0.0.0"),
        ({"GRADIO_SERVER_NAME": "127.0.0.1"}, "127.0.0.1"),
        ({"HOST": "::", "GRADIO_SERVER_NAME": "127.0.0.1"}, "::"),
    ],
)
def test_host_comes_from_host_else_gradio_server_name_else_all_interfaces(env: dict[str, str], host: str) -> None:
    assert settings(**env).host == host


def test_max_body_bytes_is_read_from_the_environment() -> None:
    assert settings().max_body_bytes == 10_000_000
    assert settings(MAX_BODY_BYTES="2048").max_body_bytes == 2048


@pytest.mark.parametrize(
    ("env", "variable"),
    [
        ({"PORT": "eighty"}, "PORT"),
        ({"PORT": "70000"}, "PORT"),
        ({"GRADIO_SERVER_PORT": "eighty"}, "GRADIO_SERVER_PORT"),
        ({"MAX_BODY_BYTES": "10MB"}, "MAX_BODY_BYTES"),
        ({"MAX_BODY_BYTES": "0"}, "MAX_BODY_BYTES"),
        ({"OPENAI_BASE_URL": "api.openai.com/v1"}, "OPENAI_BASE_URL"),
        ({"OPENAI_BASE_URL": "ftp://example.org"}, "OPENAI_BASE_URL"),
        ({"UPSTREAM_READ_TIMEOUT": "-1"}, "UPSTREAM_READ_TIMEOUT"),
        ({"LOG_LEVEL": "loud"}, "LOG_LEVEL"),
        ({"GATEKEEPER": "proxy_key"}, "PROXY_KEY"),
    ],
)
def test_a_bad_value_stops_the_start_with_a_message_naming_the_variable(env: dict[str, str], variable: str) -> None:
    with pytest.raises(ConfigError) as caught:
        settings(**env)
    assert variable in str(caught.value)


def test_a_configuration_error_never_shows_a_key() -> None:
    with pytest.raises(ConfigError) as caught:
        settings(OPENAI_KEY=KEY_A, PROXY_KEY="pk-config-secret", PORT="nope")
    assert KEY_A not in str(caught.value)
    assert "pk-config-secret" not in str(caught.value)
    assert caught.value.__cause__ is None and caught.value.__suppress_context__


def test_repr_of_the_settings_holds_no_secret() -> None:
    loaded = settings(
        OPENAI_KEY=f"{KEY_A},{KEY_B}",
        ANTHROPIC_KEY="sk-ant-config-0123456789",
        PROXY_KEY="pk-config-secret",
        ADMIN_KEY="admin-config-secret",
        HF_TOKEN="hf_configsecret0123456789",
        STATE_REPO="someone/state",
    )
    for shown in (repr(loaded), str(loaded)):
        for secret in (KEY_A, KEY_B, "sk-ant-config-0123456789", "pk-config-secret", "admin-config-secret"):
            assert secret not in shown
        assert "hf_configsecret0123456789" not in shown
    assert loaded.openai_keys == [KEY_A, KEY_B]


def test_a_dotenv_file_is_read_when_present(tmp_path: Path) -> None:
    env_file = tmp_path / ".env"
    env_file.write_text(
        "# keys for the proxy\n"
        f'OPENAI_KEY="{KEY_A},{KEY_B}"\n'
        "\n"
        "export PORT=9001\n"
        "OPENAI_BASE_URL='http://127.0.0.1:11434/v1'\n",
        encoding="utf-8",
    )
    loaded = load_settings({}, env_file=env_file)
    assert loaded.openai_keys == [KEY_A, KEY_B]
    assert loaded.port == 9001
    assert loaded.openai_base_url == "http://127.0.0.1:11434/v1"


def test_a_dotenv_file_in_the_working_directory_is_read_by_default(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / ".env").write_text(f"OPENAI_KEY={KEY_A}\nMAX_BODY_BYTES=4096\n", encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    loaded = load_settings({})
    assert loaded.openai_keys == [KEY_A]
    assert loaded.max_body_bytes == 4096


def test_the_environment_wins_over_the_dotenv_file(tmp_path: Path) -> None:
    env_file = tmp_path / ".env"
    env_file.write_text(f"OPENAI_KEY={KEY_A}\nPORT=9001\n", encoding="utf-8")
    loaded = load_settings({"OPENAI_KEY": KEY_C}, env_file=env_file)
    assert loaded.openai_keys == [KEY_C]
    assert loaded.port == 9001


def test_a_comment_after_a_value_in_the_dotenv_file_is_not_part_of_the_value(tmp_path: Path) -> None:
    env_file = tmp_path / ".env"
    env_file.write_text(
        "PORT=9001  # where the proxy listens\n"
        f"OPENAI_KEY={KEY_A},{KEY_B} # two keys\n"
        'SERVER_TITLE="Friends\' #1 proxy"  # quoted: the hash is part of the title\n',
        encoding="utf-8",
    )
    loaded = load_settings({}, env_file=env_file)
    assert loaded.port == 9001
    assert loaded.openai_keys == [KEY_A, KEY_B]
    assert loaded.title == "Friends' #1 proxy"


def test_a_missing_dotenv_file_is_not_an_error(tmp_path: Path) -> None:
    assert load_settings({"PORT": "9002"}, env_file=tmp_path / "absent.env").port == 9002


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("PORT", "eighty"),
        ("GRADIO_SERVER_PORT", "eighty"),
    ],
)
def test_the_app_refuses_to_start_on_a_bad_value_and_names_the_variable(
    tmp_path: Path, variable: str, value: str
) -> None:
    root = Path(__file__).resolve().parent.parent
    env = {
        "PATH": os.environ.get("PATH", ""),
        "HOME": str(tmp_path),
        "PYTHONPATH": str(root),
        "OPENAI_KEY": KEY_A,
        variable: value,
    }
    done = subprocess.run(
        [sys.executable, str(root / "app.py")], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode != 0
    assert variable in done.stderr
    assert "Traceback" not in done.stderr
    assert KEY_A not in done.stdout + done.stderr


def test_every_setting_is_in_env_example() -> None:
    """Each variable Settings reads is documented in .env.example (CUSTOM_KEYS is not a variable:
    it gathers the <NAME>_KEY of each CUSTOM_UPSTREAMS entry; nor is TOKEN_QUOTA: it gathers the
    TOKEN_QUOTA_<FAMILY> variables, documented by that name)."""
    import re

    text = (Path(__file__).resolve().parent.parent / ".env.example").read_text()
    documented = set(re.findall(r"^([A-Z][A-Z0-9_]+)=", text, re.M))
    documented |= set(re.findall(r"[A-Z][A-Z_]+", text.split("Set by Hugging Face")[1]))
    missing = {name.upper() for name in Settings.model_fields} - documented - {"CUSTOM_KEYS", "TOKEN_QUOTA"}
    assert missing == set()
    assert "TOKEN_QUOTA_<FAMILY>" in text
