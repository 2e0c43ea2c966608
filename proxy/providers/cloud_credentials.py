"""Reading cloud credentials from settings (pure; no SDK is imported here).

Each entry is one key of its service's pool: its `secret` is the string the pool holds (the key
id is a hash of it) and `secrets` are the parts the redactor must know, alone: a resource,
deployment, region or account name is not secret and must not be scrubbed from replies.
Errors name an entry by its position, never by its content.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

_SPLIT = re.compile(r"[\s,]+")
_AZURE_RESOURCE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9-]{0,62}$")
_AZURE_DEPLOYMENT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_AWS_ACCESS = re.compile(r"^[A-Z0-9]{16,128}$")
_REGION = re.compile(r"^[a-z0-9][a-z0-9-]{1,39}$")
MAX_CREDENTIAL_FILE = 64 * 1024


@dataclass(frozen=True)
class AzureEntry:
    resource: str
    deployment: str
    key: str = field(repr=False)

    @property
    def secret(self) -> str:
        return f"{self.resource}:{self.deployment}:{self.key}"

    @property
    def secrets(self) -> list[str]:
        return [self.key]


@dataclass(frozen=True)
class AwsEntry:
    access_key: str = field(repr=False)
    secret_key: str = field(repr=False)
    region: str

    @property
    def secret(self) -> str:
        return f"{self.access_key}:{self.secret_key}:{self.region}"

    @property
    def secrets(self) -> list[str]:
        return [self.access_key, self.secret_key]


@dataclass(frozen=True)
class GcpEntry:
    """A service account: project, e-mail, private key; `region` from the JSON's own field, if any."""

    info: dict = field(repr=False)

    @property
    def project(self) -> str:
        return str(self.info["project_id"])

    @property
    def region(self) -> str | None:
        region = self.info.get("region")
        return str(region) if region else None

    @property
    def secret(self) -> str:
        return json.dumps(self.info, separators=(",", ":"), sort_keys=True)

    @property
    def secrets(self) -> list[str]:
        """The key's id and each line of the private key's body: a leak of the key (as PEM, or
        JSON-escaped with `\\n`) holds those lines, and a redactor pattern per line stays small."""
        lines = [line.strip() for line in str(self.info.get("private_key") or "").splitlines()]
        body = [line for line in lines if len(line) >= 16 and not line.startswith("-----")]
        return [str(self.info["private_key_id"])] * bool(self.info.get("private_key_id")) + body


def parse_azure(raw: str) -> list[AzureEntry]:
    """`resource:deployment:key` entries separated by commas or white space."""
    out: dict[str, AzureEntry] = {}
    for n, part in enumerate((p for p in _SPLIT.split(raw or "") if p), 1):
        resource, _, rest = part.partition(":")
        deployment, _, key = rest.partition(":")
        if not (_AZURE_RESOURCE.match(resource) and _AZURE_DEPLOYMENT.match(deployment) and key):
            raise ValueError(f"entry {n} is not resource:deployment:key")
        entry = AzureEntry(resource, deployment, key)
        out.setdefault(entry.secret, entry)
    return list(out.values())


def parse_aws(raw: str) -> list[AwsEntry]:
    """`access_key:secret_key:region` entries separated by commas or white space."""
    out: dict[str, AwsEntry] = {}
    for n, part in enumerate((p for p in _SPLIT.split(raw or "") if p), 1):
        pieces = part.split(":")
        if len(pieces) != 3 or not _AWS_ACCESS.match(pieces[0]) or not pieces[1] or not _REGION.match(pieces[2]):
            raise ValueError(f"entry {n} is not access_key:secret_key:region")
        entry = AwsEntry(*pieces)
        out.setdefault(entry.secret, entry)
    return list(out.values())


def parse_gcp(raw: str) -> list[GcpEntry]:
    """Service-account JSON: inline (an object, or a list of them), base64 of it, or a file path;
    several base64 values or paths may be separated by commas."""
    raw = (raw or "").strip()
    if not raw:
        return []
    if raw[0] in "{[":
        documents = [_json(raw, 1)]
    else:
        documents = [_json(_decode_or_read(part, n), n) for n, part in enumerate(_SPLIT.split(raw), 1) if part]
    out: dict[str, GcpEntry] = {}
    n = 0
    for document in documents:
        for info in document if isinstance(document, list) else [document]:
            n += 1
            if not isinstance(info, dict):
                raise ValueError(f"service account {n} is not a JSON object")
            missing = [k for k in ("project_id", "client_email", "private_key") if not isinstance(info.get(k), str)]
            if missing:
                raise ValueError(f"service account {n} lacks {', '.join(missing)}")
            if info.get("region") is not None and not _REGION.match(str(info["region"])):
                raise ValueError(f"service account {n} has an invalid region")
            entry = GcpEntry(info)
            out.setdefault(entry.secret, entry)
    return list(out.values())


def _decode_or_read(part: str, n: int) -> str:
    """Base64 of a JSON document, else a file path. Errors never carry the value itself."""
    try:
        text = base64.b64decode(part + "=" * (-len(part) % 4), validate=True).decode("utf-8")
        if text.lstrip()[:1] in ("{", "["):
            return text
    except (binascii.Error, UnicodeDecodeError, ValueError):
        pass
    try:
        path = Path(part).expanduser()
        if path.is_file():
            if path.stat().st_size > MAX_CREDENTIAL_FILE:
                raise ValueError(f"credential file {n} is too large to be a service account")
            return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        raise ValueError(f"credential file {n} could not be read") from None
    raise ValueError(f"entry {n} is neither a file nor base64 of a service-account JSON")


def _json(text: str, n: int) -> object:
    try:
        return json.loads(text)
    except ValueError:
        raise ValueError(f"entry {n} is not valid service-account JSON") from None


PARSERS: dict[str, Callable[[str], list]] = {
    "azure_credentials": parse_azure,
    "aws_credentials": parse_aws,
    "gcp_credentials": parse_gcp,
}
