"""Error shapes per client dialect, and redaction of anything secret."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from enum import StrEnum

from proxy import jsonx


class Kind(StrEnum):
    """What went wrong, independent of the API shape it is reported in."""

    INVALID_REQUEST = "invalid_request"
    AUTHENTICATION = "authentication"
    PERMISSION = "permission"
    NOT_FOUND = "not_found"
    TOO_LARGE = "too_large"
    RATE_LIMIT = "rate_limit"
    QUOTA = "quota"
    UPSTREAM = "upstream"
    TIMEOUT = "timeout"
    UNAVAILABLE = "unavailable"


# The error code of a 503 for a database or shared state that is down (/health says which).
DEPENDENCY_DOWN = "dependency_unavailable"


class ProxyError(Exception):
    """An error answered by the proxy itself, rendered in the client's API shape."""

    def __init__(
        self, status: int, message: str, kind: Kind, *, headers: dict[str, str] | None = None, code: str | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.kind = kind
        self.headers = headers or {}
        self.code = code


_OPENAI_TYPES = {
    Kind.INVALID_REQUEST: "invalid_request_error",
    Kind.AUTHENTICATION: "invalid_request_error",
    Kind.PERMISSION: "permission_error",
    Kind.NOT_FOUND: "invalid_request_error",
    Kind.TOO_LARGE: "invalid_request_error",
    Kind.RATE_LIMIT: "rate_limit_error",
    Kind.QUOTA: "quota_exceeded",
    Kind.UPSTREAM: "upstream_error",
    Kind.TIMEOUT: "timeout_error",
    Kind.UNAVAILABLE: "service_unavailable",
}
_OPENAI_CODES = {
    Kind.AUTHENTICATION: "invalid_api_key",
    Kind.NOT_FOUND: "unknown_url",
    Kind.TOO_LARGE: "request_too_large",
    Kind.RATE_LIMIT: "rate_limit_exceeded",
    Kind.QUOTA: "quota_exceeded",
}
_ANTHROPIC_TYPES = {
    Kind.INVALID_REQUEST: "invalid_request_error",
    Kind.AUTHENTICATION: "authentication_error",
    Kind.PERMISSION: "permission_error",
    Kind.NOT_FOUND: "not_found_error",
    Kind.TOO_LARGE: "request_too_large",
    Kind.RATE_LIMIT: "rate_limit_error",
    Kind.QUOTA: "billing_error",  # Anthropic's own type for 402: SDKs do not retry it
    Kind.UPSTREAM: "api_error",
    Kind.TIMEOUT: "api_error",
    Kind.UNAVAILABLE: "overloaded_error",
}


def openai_error(message: str, kind: Kind, code: str | None = None) -> dict:
    """OpenAI's error body: {"error": {"message", "type", "param", "code"}}."""
    return {
        "error": {
            "message": message,
            "type": _OPENAI_TYPES[kind],
            "param": None,
            "code": code or _OPENAI_CODES.get(kind),
        }
    }


def anthropic_error(message: str, kind: Kind, code: str | None = None) -> dict:
    """Anthropic's error body: {"type": "error", "error": {"type", "message"}}."""
    return {"type": "error", "error": {"type": _ANTHROPIC_TYPES[kind], "message": message}}


_GOOGLE_STATUS = {
    Kind.INVALID_REQUEST: (400, "INVALID_ARGUMENT"),
    Kind.AUTHENTICATION: (401, "UNAUTHENTICATED"),
    Kind.PERMISSION: (403, "PERMISSION_DENIED"),
    Kind.NOT_FOUND: (404, "NOT_FOUND"),
    Kind.TOO_LARGE: (400, "INVALID_ARGUMENT"),
    Kind.RATE_LIMIT: (429, "RESOURCE_EXHAUSTED"),
    Kind.QUOTA: (429, "RESOURCE_EXHAUSTED"),
    Kind.UPSTREAM: (502, "UNAVAILABLE"),
    Kind.TIMEOUT: (504, "DEADLINE_EXCEEDED"),
    Kind.UNAVAILABLE: (503, "UNAVAILABLE"),
}


def google_error(message: str, kind: Kind, code: str | None = None) -> dict:
    """Google's error body: {"error": {"code": <HTTP status>, "message", "status"}}."""
    number, status = _GOOGLE_STATUS[kind]
    return {"error": {"code": number, "message": message, "status": status}}


SHAPES = {"openai": openai_error, "anthropic": anthropic_error, "google": google_error}

MARK = "[redacted]"

# Tokens that look like provider secrets, whether or not they are configured here. Not preceded by
# a letter or digit ("task-force-2024", "flask-sqlalchemy" are words, not keys) unless that is an
# escape such as `\n`, and an `sk-` token holds a digit somewhere (every real key does;
# "sk-learn-pipeline" does not).
# The digit is looked for in the matched token (`_mark_key`), not by a lookahead: a lookahead
# from every "sk-" of a long digitless run ("sk-sk-sk-...") would scan the run once per "sk-".
_BOUNDARY = r"(?:(?<![A-Za-z0-9])|(?<=\\[nrtbf]))"
# Google OAuth access tokens (`ya29.`: the ones minted for Vertex from a service account) too.
_OTHER_KEYS = r"hf_[A-Za-z0-9]{16,}|AIza[0-9A-Za-z_\-]{30,}|ya29\.[0-9A-Za-z_\-]{20,}"
_KEY_SHAPED = _BOUNDARY + r"(?:sk-[A-Za-z0-9_\-]{8,}|" + _OTHER_KEYS + ")"
_SECRET_PATTERN = re.compile(_KEY_SHAPED)
_OTHER_PATTERN = re.compile(_BOUNDARY + "(?:" + _OTHER_KEYS + ")")
_DIGIT = re.compile(r"[0-9]")


# Opaque blobs an upstream signs or encrypts and a client must send back byte for byte (Claude's
# thinking signatures and redacted thinking, the Responses API's encrypted reasoning, Gemini's
# thought signatures): base64 whose random runs can look like a key ("/AIza" + 35 characters;
# "-sk-..." in URL-safe base64, about 1 in 1,300 blobs of 4 KB). Redacting such a look-alike
# breaks the conversation's next turn, so only the configured secrets are redacted in them.
# (the dict's "type", the field) pairs; a type of None: the field under any type.
OPAQUE_FIELDS = frozenset(
    {("thinking", "signature"), ("signature_delta", "signature"), ("redacted_thinking", "data"),
     ("reasoning", "encrypted_content"), (None, "thoughtSignature"), (None, "thought_signature")}
)  # fmt: skip
_OPAQUE_NAMES = frozenset(name for _, name in OPAQUE_FIELDS)


def _opaque(kind: object, name: object) -> bool:
    if name not in _OPAQUE_NAMES:
        return False
    return (None, name) in OPAQUE_FIELDS or (isinstance(kind, str) and (kind, name) in OPAQUE_FIELDS)


def _mark_key(match: re.Match[str]) -> str:
    token = match.group(0)
    if not token.startswith("sk-") or _DIGIT.search(token, 3) is not None:
        return MARK
    return _OTHER_PATTERN.sub(MARK, token)  # a word, not a key; but another kind of key may sit inside


# A superset of _KEY_SHAPED (no boundary: in raw JSON a key may follow an escape such as `\n`).
_KEY_SHAPED_HINT = r"sk-[A-Za-z0-9_\-]{8}|hf_[A-Za-z0-9]{16}|AIza[0-9A-Za-z_\-]{30}|ya29\.[0-9A-Za-z_\-]{20}"
# The first, cheapest look: each a regex with a literal first character (the rarer one of its
# anchor), which `re` scans for in a tight loop. A combined alternation is slower: it makes `re`
# test a character set at every position.
_QUICK_KEY_SHAPED = (r"k(?<=sk)-", r"_(?<=hf_)", r"z(?<=AIz)a", r"9(?<=ya29)\.")
# Characters a key-shaped token is made of: a JSON `\uXXXX` escape of one of them (or of a
# character of a configured secret) may hide a secret from a plain text search.
_KEY_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-.")


def _trie_regex(words: Iterable[str]) -> str:
    """An alternation of literal `words`, prefix-factored (one branch per distinct next character),
    so that `re` does not try every word at every position."""
    trie: dict = {}
    for word in words:
        node = trie
        for char in word:
            node = node.setdefault(char, {})
        node[""] = {}

    def emit(node: dict) -> str:
        ends = "" in node
        branches = [re.escape(char) + emit(child) for char, child in sorted(node.items()) if char]
        if not branches:
            return ""
        body = branches[0] if len(branches) == 1 else "(?:" + "|".join(branches) + ")"
        if ends:
            return f"(?:{body})?"
        return body

    return emit(trie)


def _hex_escape_regex(chars: Iterable[str]) -> str:
    """A `\\uXXXX` escape (hex digits in either case) of any of `chars`."""
    return r"\\u(?i:" + _trie_regex(f"{ord(c):04x}" for c in chars) + ")"


def _json_spellings(secret: str) -> set[str]:
    """The ways JSON may spell `secret` without `\\u` escapes: `\\"`, `\\\\` and `\\/`."""
    escaped = secret.replace("\\", "\\\\").replace('"', '\\"')
    return {secret, escaped, escaped.replace("/", "\\/")}


class Redactor:
    """Replaces every configured secret, and anything shaped like a provider key, with a marker.

    Text, JSON values, reply bodies, headers and stream events all go through one cheap check
    first (`suspicious`: a few literal scans); only what may hold a secret costs more.
    """

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        self._secrets: set[str] = set()
        self._compile()
        self.add(secrets)

    def add(self, secrets: Iterable[str]) -> None:
        self._secrets.update(s for s in secrets if s and len(s) >= 4)
        self._compile()

    def _compile(self) -> None:
        spellings = {spelling for s in self._secrets for spelling in _json_spellings(s)}
        # Characters whose `\u` escape may hide a secret; never `"`, `\` or control characters,
        # which `_unescape` must not turn back into raw characters.
        chars = (_KEY_CHARS | {c for s in self._secrets for c in s}) - {'"', "\\"}
        chars = {c for c in chars if ord(c) >= 0x20 and not 0xD800 <= ord(c) <= 0xDFFF}
        escape = _hex_escape_regex(chars)
        unescape = r"(?<!\\)((?:\\\\)*)\\(?:u([0-9a-fA-F]{4})" + ("|(/)" if "/" in chars else "") + ")"
        # Two looks, both cheap: `_quick` (a few literal scans: "sk-", "hf_", "AIza", a `\u00`
        # escape, and the configured secrets those do not find) rules out almost everything; what
        # is left is looked at by `_hint`, precise enough that only a likely secret costs more.
        quick_escape = r"\\u00" if all(ord(c) < 0x80 for c in chars) else r"\\u"
        generic = [*_QUICK_KEY_SHAPED, quick_escape]
        generic_re = [re.compile(p) for p in generic]
        own = sorted(s for s in spellings if not any(p.search(s) for p in generic_re))
        quick = generic + [re.escape(s) for s in own]
        self._quick = tuple(re.compile(p).search for p in quick)
        self._quick_bytes = tuple(re.compile(p.encode()).search for p in quick)
        # A spelling holding a key-shaped token is found by _KEY_SHAPED_HINT already: the hint
        # needs only the others (it was the whole trie, compiled twice more: 0.4 s at 1,000 keys).
        shaped = re.compile(_KEY_SHAPED_HINT)
        unshaped = [s for s in spellings if shaped.search(s) is None]
        hint = "|".join(filter(None, [_trie_regex(unshaped) if unshaped else "", _KEY_SHAPED_HINT, escape]))
        secrets = _trie_regex(spellings) if spellings else None
        self._hint = re.compile(hint)
        self._hint_bytes = re.compile(hint.encode())
        self._escape = re.compile(escape)
        self._unescape = re.compile(unescape)
        self._unescape_chars = frozenset(chars)
        self._pattern = re.compile(secrets) if secrets else None
        self.longest = max(map(len, spellings), default=0)  # the longest configured secret, as spelled in JSON

    # The cheap check -----------------------------------------------------------------------
    def suspicious(self, data: str | bytes) -> bool:
        """Whether `data` may hold a secret: a configured one (as is or JSON-escaped), a key-shaped
        token, or a `\\u` escape that could hide one. A few literal scans when nothing is there;
        a false positive only costs the slower look that follows."""
        if isinstance(data, bytes):
            for search in self._quick_bytes:
                if search(data) is not None:
                    return self._hint_bytes.search(data) is not None
            return False
        for search in self._quick:
            if search(data) is not None:
                return self._hint.search(data) is not None
        return False

    # Text ------------------------------------------------------------------------------------
    def __call__(self, text: str) -> str:
        """`text` with every secret replaced; the very same string when it holds none."""
        if not self.suspicious(text):
            return text
        cleaned = self._text(text)
        return text if cleaned == text else cleaned

    def _text(self, text: str, shapes: bool = True) -> str:
        """`text` redacted: configured secrets, and with `shapes` anything shaped like a key."""
        out = self._plain(text, shapes)
        if self._escape.search(out) is not None:
            # A secret spelled with `\u` escapes reads as the secret once the escapes are decoded
            # (by a JSON parser, or by a reader): decode the escapes of key characters and look again.
            decoded = self._unescape.sub(self._decode_escape, out)
            if decoded != out:
                cleaned = self._plain(decoded, shapes)
                if cleaned != decoded:
                    return cleaned
        return out

    def _plain(self, text: str, shapes: bool = True) -> str:
        if self._pattern is not None:
            text = self._pattern.sub(MARK, text)
        return _SECRET_PATTERN.sub(_mark_key, text) if shapes else text

    def _opaque_blob(self, text: str) -> str:
        """An opaque blob (see OPAQUE_FIELDS) with the configured secrets redacted, nothing else."""
        if self._pattern is None or not self.suspicious(text):
            return text
        cleaned = self._text(text, shapes=False)
        return text if cleaned == text else cleaned

    def _decode_escape(self, match: re.Match[str]) -> str:
        backslashes, code, slash = match.group(1), match.group(2), match.group(3) if match.re.groups > 2 else None
        if slash:
            return backslashes + "/"
        char = chr(int(code, 16))
        return backslashes + char if char in self._unescape_chars else match.group(0)

    # JSON values -----------------------------------------------------------------------------
    def scrub(self, value: object) -> object:
        """Redact every string inside a JSON-like value, dict keys included."""
        return self._scrub(value)[0]

    def _scrub(self, value: object) -> tuple[object, bool]:
        """(a redacted copy of `value`, whether anything changed). Iterative: any depth a JSON
        parser accepts is walked without recursion."""
        changed = False
        work: list[tuple[dict | list, dict | list]] = []

        def convert(item: object, opaque: bool = False) -> object:
            nonlocal changed
            if isinstance(item, str):
                cleaned = self._opaque_blob(item) if opaque else self(item)
                if cleaned is not item and cleaned != item:
                    changed = True
                return cleaned
            if isinstance(item, dict):
                shell: dict | list = {}
            elif isinstance(item, list):
                shell = []
            else:
                return item
            work.append((item, shell))
            return shell

        result = convert(value)
        while work:
            source, shell = work.pop()
            if isinstance(source, dict):
                kind = source.get("type")
                for key, item in source.items():
                    shell[convert(key)] = convert(item, _opaque(kind, key))  # type: ignore[index]
            else:
                shell.extend([convert(item) for item in source])  # type: ignore[union-attr]
        return result, changed

    def payload(self, text: str) -> str:
        """A str that may be JSON (an SSE event's data): JSON is parsed, scrubbed (keys and values)
        and re-serialised; anything else is redacted as text. Unchanged when it holds no secret."""
        if not self.suspicious(text):
            return text
        cleaned = self._json(text)
        if cleaned is None:
            return self._text(text)
        return cleaned.decode() if isinstance(cleaned, bytes) else text

    def body(self, raw: bytes) -> bytes:
        """A reply body: the same bytes (a few literal scans) when nothing in it looks secret; else
        JSON is parsed, scrubbed (keys and values) and re-serialised, and anything else is
        redacted as text."""
        if not self.suspicious(raw):
            return raw
        cleaned = self._json(raw)
        if cleaned is None:
            text = raw.decode("utf-8", errors="replace")
            redacted = self._text(text)
            return raw if redacted == text else redacted.encode()
        return cleaned if isinstance(cleaned, bytes) else raw

    def _json(self, data: str | bytes) -> bytes | bool | None:
        """Scrubbed JSON bytes; False when it is JSON holding no secret; None when it is not JSON
        (or too deeply nested to walk)."""
        try:
            cleaned, changed = self._scrub(jsonx.loads(data))
            return jsonx.dumps(cleaned) if changed else False
        except (ValueError, TypeError, RecursionError):
            return None

    def headers(self, mapping: Mapping[str, str]) -> dict[str, str]:
        """Response headers with every value redacted (names are allow-listed, values are not)."""
        return {name: self(value) for name, value in mapping.items()}
