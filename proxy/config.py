"""Settings: the only code that reads the environment. Validated once, at start."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Literal

from pydantic import (
    AliasChoices,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

_KEY_SPLIT = re.compile(r"[\s,]+")
_INLINE_COMMENT = re.compile(r"\s+#")


class ConfigError(Exception):
    """A configuration value is missing or invalid; the message names the variable."""


def split_keys(raw: str) -> list[str]:
    """Split a list of keys separated by commas, spaces or newlines; drop blanks and repeats."""
    seen: dict[str, None] = {}
    for part in _KEY_SPLIT.split(raw or ""):
        if part:
            seen.setdefault(part, None)
    return list(seen)


# Proof-of-work difficulty levels: the expected number of argon2id hashes (as the Node original).
POW_LEVELS = {"low": 200, "medium": 900, "high": 1900, "extreme": 4000}


def parse_phrases(raw: str) -> list[str]:
    """REJECT_PHRASES: a JSON list of regular expressions, or a comma-separated list of them."""
    raw = raw.strip()
    if raw.startswith("["):
        import json

        try:
            items = json.loads(raw)
        except ValueError:
            raise ValueError("looks like a JSON list but is not valid JSON") from None
        return [str(item) for item in items if str(item).strip()]
    return [part.strip() for part in raw.split(",") if part.strip()]


class Settings(BaseModel):
    """Every configuration variable, with its default. See `.env.example` for their meaning."""

    model_config = ConfigDict(extra="ignore", frozen=True, populate_by_name=True)

    # Upstreams
    openai_key: str = Field("", repr=False)
    openai_base_url: str = "https://api.openai.com/v1"
    anthropic_key: str = Field("", repr=False)
    anthropic_base_url: str = "https://api.anthropic.com/v1"
    upstream_connect_timeout: float = Field(10.0, gt=0)
    upstream_read_timeout: float = Field(300.0, gt=0)
    retry_time_budget: float = Field(30.0, gt=0)
    anthropic_default_max_tokens: int = Field(4096, gt=0)
    openai_responses_store: bool = False
    google_ai_key: str = Field("", repr=False)
    google_ai_base_url: str = "https://generativelanguage.googleapis.com"
    deepseek_key: str = Field("", repr=False)
    deepseek_base_url: str = "https://api.deepseek.com/v1"
    xai_key: str = Field("", repr=False)
    xai_base_url: str = "https://api.x.ai/v1"
    mistral_ai_key: str = Field("", repr=False)
    mistral_ai_base_url: str = "https://api.mistral.ai/v1"
    openrouter_key: str = Field("", repr=False)
    openrouter_base_url: str = "https://openrouter.ai/api/v1"
    groq_key: str = Field("", repr=False)
    groq_base_url: str = "https://api.groq.com/openai/v1"
    custom_upstreams: str = ""
    # <NAME>_KEY of each CUSTOM_UPSTREAMS entry, by name; filled by load_settings, not a variable.
    custom_keys: dict[str, str] = Field(default_factory=dict, repr=False)
    upstream_max_connections: int = Field(512, gt=0)
    # Cloud-hosted models (proxy/providers/azure, aws, gcp)
    azure_credentials: str = Field("", repr=False)
    azure_api_version: str = Field("2024-10-21", pattern=r"^\d{4}-\d{2}-\d{2}(-preview)?$")
    azure_endpoint_template: str = "https://{resource}.openai.azure.com"
    aws_credentials: str = Field("", repr=False)
    aws_endpoint_url: str = ""
    allow_aws_logging: bool = False
    gcp_credentials: str = Field("", repr=False)
    gcp_region: str = Field("us-east5", pattern=r"^[a-z0-9-]{1,40}$")
    gcp_vertex_base_url: str = "https://{region}-aiplatform.googleapis.com"
    gcp_token_url: str = "https://oauth2.googleapis.com/token"

    # Server
    host: str = Field("0.0.0.0", validation_alias=AliasChoices("HOST", "GRADIO_SERVER_NAME"))
    port: int = Field(7860, ge=0, le=65535, validation_alias=AliasChoices("PORT", "GRADIO_SERVER_PORT"))
    max_body_bytes: int = Field(10_000_000, gt=0)
    server_title: str = ""
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    max_messages: int = Field(10_000, gt=0)
    max_content_parts: int = Field(1_000, gt=0)
    max_tools: int = Field(512, gt=0)
    max_json_depth: int = Field(100, ge=8, le=250)
    max_reply_bytes: int = Field(64_000_000, gt=0)
    header_timeout: float = Field(10.0, gt=0)
    max_header_bytes: int = Field(65536, ge=1024)
    body_min_rate: int = Field(1024, ge=0)
    body_rate_window: float = Field(10.0, gt=0)
    max_connections_per_ip: int | None = Field(None, ge=0)
    page_max_body_bytes: int = Field(4_000_000, gt=0)
    status_cache_seconds: float = Field(1.0, ge=0)

    # Access
    gatekeeper: Literal["none", "proxy_key", "user_token", ""] = ""
    proxy_key: str = Field("", repr=False)
    admin_key: str = Field("", repr=False)
    max_ips_per_user: int = Field(0, ge=0)
    max_ips_auto_ban: bool = False
    text_model_rate_limit: int = Field(0, ge=0)
    quota_refresh_period: str = ""
    errors_as_chat: bool = False
    trusted_proxies: str = ""
    max_ips_window_hours: float = Field(24.0, gt=0)
    user_concurrency_limit: int = Field(0, ge=0)
    # TOKEN_QUOTA_<FAMILY>: default token limits for new users, by model family (see token_quota_env).
    token_quota: dict[str, int] = Field(default_factory=dict)

    # Owner controls (abuse, event log, prompt log, proof of work)
    ip_blacklist: str = ""
    admin_whitelist: str = ""
    blocked_origins: str = ""
    block_message: str = "This proxy does not accept requests from this website."
    reject_phrases: str = ""
    reject_message: str = "This content violates this proxy's acceptable use policy."
    allowed_vision_services: str = ""
    event_logging: bool = False
    event_log_days: int = Field(30, ge=0)
    prompt_logging: bool = False
    prompt_logging_repo: str = ""
    prompt_logging_interval: float = Field(60.0, gt=0)
    captcha_mode: Literal["none", "proof_of_work"] = "none"
    pow_difficulty_level: str = "low"
    pow_challenge_timeout: float = Field(30.0, gt=0)
    pow_token_hours: float = Field(24.0, gt=0)
    pow_token_max_ips: int = Field(2, ge=0)
    pow_token_purge_hours: float = Field(48.0, ge=0)
    argon2_time_cost: int = Field(8, ge=2, le=10)
    argon2_memory_kb: int = Field(65536, ge=8, le=1 << 21)
    max_context_tokens_openai: int = Field(0, ge=0)
    max_context_tokens_anthropic: int = Field(0, ge=0)
    max_context_tokens_google_ai: int = Field(0, ge=0)
    max_output_tokens: int = Field(0, ge=0)  # every service without its own MAX_OUTPUT_TOKENS_<SERVICE>
    max_output_tokens_openai: int = Field(0, ge=0)
    max_output_tokens_anthropic: int = Field(0, ge=0)
    max_output_tokens_google_ai: int = Field(0, ge=0)

    # Keys
    check_keys: bool = True
    key_check_interval: float = Field(4 * 3600.0, gt=0)
    key_check_concurrency: int = Field(16, gt=0)
    allowed_model_families: str = ""
    key_max_concurrency: int = Field(0, ge=0)

    # State
    data_dir: Path = Path("./data")
    hf_token: str = Field("", repr=False)
    state_repo: str = ""
    backup_interval: float = Field(600.0, gt=0)
    database_url: str = Field("", repr=False)  # may hold a password
    redis_url: str = Field("", repr=False)
    workers: int = Field(1, ge=1, le=64)
    metrics_key: str = Field("", repr=False)

    # The page
    greeting: str = Field("", max_length=20_000)
    service_info_password: str = Field("", repr=False)
    show_token_costs: bool = False
    token_prices: str = ""
    # Queue
    queue_timeout: float = Field(300.0, ge=0)
    max_queue_length: int = Field(1000, gt=0)
    heartbeat_interval: float = Field(10.0, ge=0)

    # Set by Hugging Face Spaces
    space_host: str = ""
    space_id: str = ""
    space_title: str = ""
    system: str = ""

    @field_validator(
        "openai_base_url", "anthropic_base_url", "google_ai_base_url", "deepseek_base_url", "xai_base_url",
        "mistral_ai_base_url", "openrouter_base_url", "groq_base_url",
    )  # fmt: skip
    @classmethod
    def _http_url(cls, value: str) -> str:
        return http_url(value)

    @field_validator("azure_endpoint_template", "gcp_vertex_base_url", "gcp_token_url")
    @classmethod
    def _cloud_url(cls, value: str) -> str:
        return http_url(value)

    @field_validator("aws_endpoint_url")
    @classmethod
    def _optional_url(cls, value: str) -> str:
        return http_url(value) if value.strip() else ""

    @field_validator("azure_credentials", "aws_credentials", "gcp_credentials")
    @classmethod
    def _cloud_credentials(cls, value: str, info: ValidationInfo) -> str:
        from proxy.providers.cloud_credentials import PARSERS

        PARSERS[info.field_name](value)  # raises ValueError naming the entry's position, never its secret
        return value

    @field_validator("custom_upstreams")
    @classmethod
    def _custom_upstreams(cls, value: str) -> str:
        parse_custom_upstreams(value)  # raises ValueError naming the bad entry
        return value

    @field_validator("token_prices")
    @classmethod
    def _prices(cls, value: str) -> str:
        from proxy.prices import parse_prices

        parse_prices(value)
        return value

    @field_validator("trusted_proxies")
    @classmethod
    def _trusted_proxies(cls, value: str) -> str:
        from proxy.access.client_ip import valid_setting

        return valid_setting(value)

    @field_validator("gatekeeper", "quota_refresh_period", "log_level", mode="before")
    @classmethod
    def _lower(cls, value: object) -> object:
        return value.strip().lower() if isinstance(value, str) else value

    @field_validator("ip_blacklist", "admin_whitelist")
    @classmethod
    def _cidrs(cls, value: str) -> str:
        from proxy.access.cidr import parse_cidrs, split_list

        parse_cidrs(split_list(value))
        return value

    @field_validator("reject_phrases")
    @classmethod
    def _patterns(cls, value: str) -> str:
        import regex

        for phrase in parse_phrases(value):
            try:
                regex.compile(phrase)
            except regex.error as exc:
                raise ValueError(f"'{phrase[:60]}' is not a valid regular expression ({exc})") from None
        return value

    @field_validator("quota_refresh_period")
    @classmethod
    def _refresh_period(cls, value: str) -> str:
        from proxy.access.refresh import check_period

        return check_period(value.strip())

    @field_validator("pow_difficulty_level")
    @classmethod
    def _difficulty(cls, value: str) -> str:
        value = value.strip().lower()
        if value not in POW_LEVELS and not (value.isdigit() and int(value) > 0):
            raise ValueError("must be low, medium, high, extreme or a positive number of iterations")
        return value

    @model_validator(mode="after")
    def _coherent(self) -> Settings:
        mode = self.auth_mode
        if mode == "proxy_key" and not self.proxy_key:
            raise ValueError("GATEKEEPER=proxy_key needs PROXY_KEY to be set")
        if mode == "user_token" and not self.admin_key:
            raise ValueError("GATEKEEPER=user_token needs ADMIN_KEY to be set")
        if self.state_repo and not self.hf_token:
            raise ValueError("STATE_REPO needs HF_TOKEN to be set")
        if self.captcha_mode == "proof_of_work" and mode != "user_token":
            raise ValueError("CAPTCHA_MODE=proof_of_work needs GATEKEEPER=user_token")
        if self.prompt_logging and not (self.prompt_logging_repo and self.hf_token):
            raise ValueError("PROMPT_LOGGING=true needs PROMPT_LOGGING_REPO and HF_TOKEN to be set")
        self._check_scale_out()
        return self

    def _check_scale_out(self) -> None:
        """Refuse combinations that would silently split the state between processes."""
        url = self.database_url.strip()
        if url and not url.startswith(("sqlite:///", "postgresql://", "postgres://")):
            raise ValueError("DATABASE_URL must start with sqlite:/// or postgresql://")
        if self.redis_url and not self.redis_url.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("REDIS_URL must start with redis://, rediss:// or unix://")
        if self.workers > 1 and not (self.redis_url and self.database_kind == "postgres"):
            raise ValueError(
                f"WORKERS={self.workers} needs REDIS_URL and a postgresql:// DATABASE_URL: each process would "
                "otherwise keep its own limits, quotas and lockouts (and SQLite admits one process only)"
            )
        if self.state_repo and self.database_kind == "postgres":
            raise ValueError("STATE_REPO backs up the SQLite database only; with Postgres, back the database up itself")

    # Derived values
    @property
    def auth_mode(self) -> Literal["none", "proxy_key", "user_token"]:
        if self.gatekeeper:
            return self.gatekeeper
        return "proxy_key" if self.proxy_key else "none"

    @property
    def database_kind(self) -> Literal["sqlite", "postgres"]:
        return "postgres" if self.database_url.startswith(("postgresql://", "postgres://")) else "sqlite"

    @property
    def sqlite_path(self) -> Path:
        """The SQLite file: DATABASE_URL's path (sqlite:///relative, sqlite:////absolute), else in DATA_DIR."""
        url = self.database_url.strip()
        if url.startswith("sqlite:///") and url != "sqlite:///":
            return Path(url.removeprefix("sqlite:///"))
        return self.data_dir / "proxy.sqlite3"

    @property
    def shared_state(self) -> bool:
        """Whether fast state (limits, reservations, lockouts) lives in Redis, shared by every instance."""
        return bool(self.redis_url)

    @property
    def openai_keys(self) -> list[str]:
        return split_keys(self.openai_key)

    @property
    def anthropic_keys(self) -> list[str]:
        return split_keys(self.anthropic_key)

    @property
    def secrets(self) -> list[str]:
        """Every configured secret, for redaction."""
        values = [self.proxy_key, self.admin_key, self.hf_token, self.service_info_password, self.metrics_key]
        values += [*_url_passwords(self.database_url, self.redis_url), *self.openai_keys, *self.anthropic_keys]
        for raw in (self.google_ai_key, self.deepseek_key, self.xai_key, self.mistral_ai_key, self.openrouter_key,
                    self.groq_key, *self.custom_keys.values()):  # fmt: skip
            values += split_keys(raw)
        values += self.cloud_secrets
        return [v for v in values if v]

    @property
    def cloud_secrets(self) -> list[str]:
        """The secret parts of cloud credentials alone (never a resource, region or account name)."""
        from proxy.providers.cloud_credentials import PARSERS

        out: list[str] = []
        for name in ("azure_credentials", "aws_credentials", "gcp_credentials"):
            for entry in PARSERS[name](getattr(self, name)):
                out += entry.secrets
        return out

    @property
    def custom_upstream_list(self) -> list[tuple[str, str]]:
        """CUSTOM_UPSTREAMS as (name, base URL) pairs, in the order given."""
        return parse_custom_upstreams(self.custom_upstreams)

    @property
    def on_space(self) -> bool:
        return self.system == "spaces" or bool(self.space_id)

    @property
    def public_host(self) -> str:
        """The Space's own host (first entry of SPACE_HOST), or '' when not on a Space."""
        return split_keys(self.space_host)[0] if self.space_host.strip() else ""

    @property
    def connections_per_ip(self) -> int:
        """MAX_CONNECTIONS_PER_IP, else 64; none on a Space or with TRUSTED_PROXIES set, where
        every visitor's connection comes from the front proxy (the cap counts socket peers)."""
        if self.max_connections_per_ip is not None:
            return self.max_connections_per_ip
        return 0 if self.on_space or self.trusted_proxies.strip() else 64

    @property
    def title(self) -> str:
        return self.server_title or self.space_title or "OAI Reverse Proxy"

    @property
    def vision_services(self) -> frozenset[str] | None:
        """Services that accept image inputs; None (unset) means every service does."""
        if not self.allowed_vision_services.strip():
            return None
        return frozenset(s.strip().lower() for s in self.allowed_vision_services.split(",") if s.strip())

    @property
    def origin_blocks(self) -> list[str]:
        return [o.strip().lower() for o in self.blocked_origins.split(",") if o.strip()]

    @property
    def reject_patterns(self) -> list[str]:
        return parse_phrases(self.reject_phrases)

    def context_cap(self, service: str) -> int:
        """MAX_CONTEXT_TOKENS_<SERVICE>; 0 (also for a service without the setting) means no cap."""
        return int(getattr(self, f"max_context_tokens_{service.replace('-', '_')}", 0) or 0)

    def output_cap(self, service: str) -> int:
        """MAX_OUTPUT_TOKENS_<SERVICE> (or MAX_OUTPUT_TOKENS for every service); 0 means no cap."""
        own = int(getattr(self, f"max_output_tokens_{service.replace('-', '_')}", 0) or 0)
        return own or self.max_output_tokens

    @property
    def pow_iterations(self) -> int:
        """The expected number of hashes a proof-of-work challenge takes."""
        level = self.pow_difficulty_level
        return POW_LEVELS[level] if level in POW_LEVELS else int(level)

    @property
    def model_family_filter(self) -> set[str]:
        return {f.strip().lower() for f in self.allowed_model_families.split(",") if f.strip()}


# Route names taken by built-in services (and /proxy/me): a custom upstream may not use them.
RESERVED_NAMES = frozenset(
    {"openai", "anthropic", "google-ai", "deepseek", "xai", "mistral-ai", "openrouter", "groq", "me"}
    | {"azure", "aws", "gcp"}
)
_NAME = re.compile(r"^[a-z][a-z0-9-]{0,31}$")


def http_url(value: str) -> str:
    value = value.strip().rstrip("/")
    if not re.match(r"^https?://[^/\s]+", value):
        raise ValueError("must be an http:// or https:// URL")
    if "@" in value.split("://", 1)[1].split("/", 1)[0]:  # never echoed: it would hold a password
        raise ValueError("must not hold a user name or password (user:password@host): the proxy sends the key itself")
    return value


def _setting_variables() -> frozenset[str]:
    """Every variable a setting is read from (ADMIN_KEY, PROXY_KEY...)."""
    names = set()
    for field_name, field in Settings.model_fields.items():
        alias = field.validation_alias
        names.add(field_name.upper())
        if isinstance(alias, AliasChoices):
            names.update(str(choice).upper() for choice in alias.choices)
    return frozenset(names)


def key_variable(name: str) -> str:
    """The variable holding a custom upstream's keys: `lab` -> LAB_KEY, `my-vllm` -> MY_VLLM_KEY."""
    return name.upper().replace("-", "_") + "_KEY"


def parse_custom_upstreams(raw: str) -> list[tuple[str, str]]:
    """`lab=http://10.0.0.5:8000/v1,home=http://127.0.0.1:11434/v1` -> [(name, url), ...]."""
    out: list[tuple[str, str]] = []
    for entry in (e.strip() for e in (raw or "").split(",")):
        if not entry:
            continue
        name, sep, url = entry.partition("=")
        name = name.strip().lower()
        if not sep or not _NAME.match(name):
            raise ValueError(f"'{entry[:60]}' is not name=url (a name is a-z, 0-9 and '-', starting with a letter)")
        if name in RESERVED_NAMES or any(name == n for n, _ in out):
            raise ValueError(f"the name '{name}' is taken")
        if key_variable(name) in _setting_variables():  # `admin` would send ADMIN_KEY upstream
            raise ValueError(f"the name '{name}' would read {key_variable(name)}, another setting, as its key")
        try:
            out.append((name, http_url(url)))
        except ValueError as exc:
            raise ValueError(f"the URL of '{name}' {exc}") from None
    return out


def _url_passwords(*urls: str) -> list[str]:
    """The passwords inside connection URLs, so that logs and errors never show them."""
    from urllib.parse import urlsplit

    out = []
    for url in urls:
        try:
            password = urlsplit(url).password if url else None
        except ValueError:
            password = None
        if password:
            out.append(password)
    return out


def load_settings(environ: Mapping[str, str] | None = None, env_file: str | Path | None = ".env") -> Settings:
    """Read settings from `environ` (default: the process environment) and an optional .env file.

    Raises ConfigError with the variable's name when a value is invalid.
    """
    source: dict[str, str] = {}
    if env_file is not None and Path(env_file).is_file():
        source.update(_read_env_file(Path(env_file)))
    source.update(os.environ if environ is None else environ)
    fields = Settings.model_fields
    names = {name.upper() for name in fields}
    for field in fields.values():
        alias = field.validation_alias
        if isinstance(alias, AliasChoices):
            names.update(str(choice).upper() for choice in alias.choices)
    names.discard("CUSTOM_KEYS")  # filled below from each custom upstream's own variable
    values = {k.upper(): v for k, v in source.items() if k.upper() in names}
    chosen = _by_field(values)
    upper = {k.upper(): v for k, v in source.items()}
    try:
        custom = parse_custom_upstreams(values.get("CUSTOM_UPSTREAMS", ""))
    except ValueError:
        custom = []  # reported by the validator below, with the variable's name
    custom_keys = {name: upper[key_variable(name)] for name, _ in custom if upper.get(key_variable(name))}
    chosen.pop("token_quota", None)  # set from the TOKEN_QUOTA_<FAMILY> variables only
    quotas = token_quota_env(source)
    try:
        return Settings(
            **{name: value for name, (_, value) in chosen.items()}, custom_keys=custom_keys, token_quota=quotas
        )
    except ValidationError as exc:
        raise ConfigError(_describe(exc, {name: variable for name, (variable, _) in chosen.items()})) from None


# The Node original's family names (TOKEN_QUOTA_GPT4O...), for the families they correspond to here.
_NODE_FAMILY_NAMES = {
    "TURBO": ("gpt-3.5-turbo",),
    "GPT4": ("gpt-4",),
    "GPT4_32K": ("gpt-4-32k",),
    "GPT4_TURBO": ("gpt-4-turbo",),
    "GPT4O": ("gpt-4o",),
    "O1": ("o-series",),
    "DALL_E": ("dall-e",),
    "CLAUDE": ("claude-sonnet", "claude-haiku", "claude"),
    "CLAUDE_OPUS": ("claude-opus",),
}
TOKEN_QUOTA_PREFIX = "TOKEN_QUOTA_"


def quota_variable(family: str) -> str:
    """The variable that sets `family`'s default quota: TOKEN_QUOTA_ + the name in capitals,
    dashes and dots as underscores (gpt-4.1-mini: TOKEN_QUOTA_GPT_4_1_MINI)."""
    return TOKEN_QUOTA_PREFIX + re.sub(r"[-.]", "_", family.upper())


def token_quota_env(source: Mapping[str, str]) -> dict[str, int]:
    """Default token limits per family from TOKEN_QUOTA_<FAMILY> variables (0 or empty: no limit).

    Our own family names and the Node original's (TOKEN_QUOTA_GPT4O, TOKEN_QUOTA_TURBO...) are
    both understood; our name wins when both are set. An unknown family stops the start."""
    from proxy.families import known_families

    ours = {quota_variable(f): f for f in known_families()}
    named: dict[str, int] = {}
    aliased: dict[str, int] = {}
    for raw_name, raw in source.items():
        name = raw_name.upper()
        if not name.startswith(TOKEN_QUOTA_PREFIX) or str(raw).strip() == "":
            continue
        value = str(raw).strip().replace("_", "")
        if not value.isdigit():
            raise ConfigError(f"Invalid configuration: {name}: must be a whole number of tokens, 0 or more")
        short = name[len(TOKEN_QUOTA_PREFIX) :]
        if short in _NODE_FAMILY_NAMES:  # TOKEN_QUOTA_CLAUDE: every Claude but Opus, as in the original
            for family in _NODE_FAMILY_NAMES[short]:
                aliased[family] = int(value)
        elif name in ours:
            named[ours[name]] = int(value)
        else:
            known = ", ".join(sorted(ours))
            raise ConfigError(f"Invalid configuration: {name}: unknown model family. Known: {known}")
    return {family: n for family, n in (aliased | named).items() if n > 0}


def _by_field(values: dict[str, str]) -> dict[str, tuple[str, str]]:
    """Map field names to (the variable that set it, its value), honouring aliases in their order."""
    out: dict[str, tuple[str, str]] = {}
    for name, field in Settings.model_fields.items():
        alias = field.validation_alias
        candidates = [str(c).upper() for c in alias.choices] if isinstance(alias, AliasChoices) else [name.upper()]
        for candidate in candidates:
            if candidate in values and values[candidate] != "":
                out[name] = (candidate, values[candidate])
                break
    return out


def _describe(exc: ValidationError, variables: Mapping[str, str]) -> str:
    """One line per problem, each naming the variable as the user set it (PORT or GRADIO_SERVER_PORT)."""
    lines = []
    for err in exc.errors():
        field = str(err["loc"][0]) if err["loc"] else ""
        name = variables.get(field) or field.upper() or "CONFIGURATION"
        lines.append(f"{name}: {err['msg']}")
    return "Invalid configuration: " + "; ".join(lines)


def _read_env_file(path: Path) -> dict[str, str]:
    """Parse KEY=VALUE lines; quotes are stripped; comments (whole-line or after a value) ignored."""
    out: dict[str, str] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        key, _, value = line.partition("=")
        key = key.strip().removeprefix("export ").strip()
        value = value.strip()
        # A quoted value ends at its closing quote; an unquoted one at " #" (a trailing comment).
        end = value.find(value[0], 1) if value[:1] in ("'", '"') else -1
        out[key] = value[1:end] if end > 0 else _INLINE_COMMENT.split(value, maxsplit=1)[0]
    return out
