"""Scale-out settings: where state lives, how many processes, and the combinations refused."""

from __future__ import annotations

from pathlib import Path

import pytest

from proxy.config import ConfigError, Settings, load_settings

PG = "postgresql://proxy:pg-secret-pass@127.0.0.1:5432/proxy"
REDIS = "redis://:redis-secret-pass@127.0.0.1:6379/0"


def settings(**env: str) -> Settings:
    return load_settings(env, env_file=None)


def test_by_default_one_process_keeps_its_state_in_sqlite_in_the_data_dir(tmp_path: Path) -> None:
    loaded = settings(DATA_DIR=str(tmp_path))
    assert loaded.database_kind == "sqlite"
    assert loaded.sqlite_path == tmp_path / "proxy.sqlite3"
    assert loaded.workers == 1 and not loaded.shared_state


@pytest.mark.parametrize(
    ("url", "path"),
    [("sqlite:///state/proxy.db", Path("state/proxy.db")), ("sqlite:////srv/proxy.db", Path("/srv/proxy.db"))],
)
def test_database_url_may_name_the_sqlite_file(url: str, path: Path) -> None:
    assert settings(DATABASE_URL=url).sqlite_path == path


def test_postgres_and_redis_urls_are_accepted_and_their_passwords_are_redacted() -> None:
    loaded = settings(DATABASE_URL=PG, REDIS_URL=REDIS, WORKERS="2")
    assert loaded.database_kind == "postgres" and loaded.shared_state and loaded.workers == 2
    assert {"pg-secret-pass", "redis-secret-pass"} <= set(loaded.secrets)
    assert "pg-secret-pass" not in repr(loaded) and "redis-secret-pass" not in repr(loaded)


@pytest.mark.parametrize(
    "env",
    [
        {"WORKERS": "2"},
        {"WORKERS": "2", "REDIS_URL": REDIS},
        {"WORKERS": "2", "DATABASE_URL": PG},
        {"WORKERS": "3", "REDIS_URL": REDIS, "DATABASE_URL": "sqlite:///shared.db"},
    ],
    ids=["nothing-shared", "sqlite-with-redis", "postgres-without-redis", "explicit-sqlite"],
)
def test_several_workers_without_shared_state_are_refused_with_the_reason(env: dict[str, str]) -> None:
    with pytest.raises(ConfigError) as caught:
        settings(**env)
    message = str(caught.value)
    assert "WORKERS" in message and "REDIS_URL" in message and "postgresql://" in message
    assert "own limits" in message  # says why: the state would split


@pytest.mark.parametrize(
    ("env", "variable"),
    [
        ({"DATABASE_URL": "mysql://x@y/z"}, "DATABASE_URL"),
        ({"REDIS_URL": "http://127.0.0.1:6379"}, "REDIS_URL"),
        ({"WORKERS": "0"}, "WORKERS"),
        ({"DATABASE_URL": PG, "STATE_REPO": "me/state", "HF_TOKEN": "hf_x0123456789"}, "STATE_REPO"),
    ],
)
def test_a_bad_scale_setting_is_refused_naming_it(env: dict[str, str], variable: str) -> None:
    with pytest.raises(ConfigError) as caught:
        settings(**env)
    assert variable in str(caught.value)
    assert "pg-secret-pass" not in str(caught.value)


def test_the_metrics_key_is_a_secret() -> None:
    loaded = settings(METRICS_KEY="metrics-secret-123")
    assert "metrics-secret-123" in loaded.secrets and "metrics-secret-123" not in repr(loaded)


@pytest.mark.parametrize(
    "env",
    [
        {"OPENAI_BASE_URL": "https://bob:pw-in-url-1234@up.example/v1"},
        {"CUSTOM_UPSTREAMS": "lab=http://bob:pw-in-url-1234@10.0.0.5:8000/v1"},
    ],
    ids=["service", "custom"],
)
def test_an_upstream_url_holding_a_password_is_refused_without_echoing_it(env: dict[str, str]) -> None:
    # aiohttp would send the URL's credentials as a second Authorization header and refuse every
    # request; and the URL would be a secret the proxy shows in /status and the page.
    with pytest.raises(ConfigError) as refused:
        settings(**env)
    message = str(refused.value)
    assert "user name or password" in message
    assert "pw-in-url-1234" not in message and "bob" not in message
