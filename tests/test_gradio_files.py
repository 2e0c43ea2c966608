"""File paths sent to the Gradio page's events: the whole app (proxy + page) served on loopback,
driven over HTTP the way a crafted client would (queue/join + the SSE stream of queue/data).

`gr.mount_gradio_app` leaves `blocks.has_launched` False, and Gradio skips its file-path check
(`processing_utils._check_allowed`) for a Blocks that has not launched: any path named in an
event's input was copied into the cache and served back. These tests send such paths to every
event that takes the chatbot, and to the Admin tab's Import, and prove the files are never opened,
copied or served; that uploads are refused (the import is pasted JSON, issue 9 item 5); that
the export is handed over as text, leaving no file behind (item 18); and that a pasted import
still imports."""

from __future__ import annotations

import json
import os
import re
import sys
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from proxy.store import DB_FILENAME
from tests.browser_util import serve_whole_app
from tests.conftest import PROXY_KEY, Served, make_settings

ADMIN_KEY = "admin-key-for-gradio-file-tests-31"
ADMIN_AUTH = {"Authorization": f"Bearer {ADMIN_KEY}"}
FILE_URL = re.compile(r"/gradio_api/file=[^\"'\s)\\]+")

# ---------------------------------------------------------------- who opens what

# Every open() in this process of a watched path is recorded: Gradio copies a file to its cache
# with shutil (open), and the Admin tab reads an import with Path.read_text (open). The hook stays
# for the session (audit hooks cannot be removed); it only compares strings while a test watches.
_watch_lock = threading.Lock()
_watched: dict[str, list[str]] = {}


def _audit(event: str, args: tuple) -> None:
    if event != "open" or not _watched or not args or not isinstance(args[0], (str, bytes, os.PathLike)):
        return
    try:
        opened = os.path.realpath(os.fsdecode(args[0]))
    except (TypeError, ValueError):
        return
    with _watch_lock:
        if opened in _watched:
            _watched[opened].append(str(args[1] if len(args) > 1 else ""))


sys.addaudithook(_audit)


@pytest.fixture
def opened() -> Iterator[Any]:
    """opened(path) -> the list of modes the server (this process) opened `path` with, from now on."""

    def watch(path: str | Path) -> list[str]:
        with _watch_lock:
            return _watched.setdefault(os.path.realpath(path), [])

    yield watch
    with _watch_lock:
        _watched.clear()


# ---------------------------------------------------------------- the app and a Gradio client


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """The whole app (no provider keys needed: no event here reaches an upstream)."""
    settings = make_settings({"PROXY_KEY": PROXY_KEY, "ADMIN_KEY": ADMIN_KEY}, tmp_path_factory.mktemp("gfiles"))
    with serve_whole_app(settings) as app:
        yield app


@pytest.fixture(scope="module")
def page(served: Served) -> dict:
    return httpx.get(served.url + "/config", timeout=10).json()


def component_id(config: dict, *, elem_id: str | None = None, kind: str | None = None) -> int:
    found = [
        c["id"]
        for c in config["components"]
        if (elem_id is None or (c.get("props") or {}).get("elem_id") == elem_id) and (kind is None or c["type"] == kind)
    ]
    assert len(found) == 1, (elem_id, kind, found)
    return found[0]


def dependencies(config: dict, *, target: tuple[int, str] | None = None, input_id: int | None = None) -> list[dict]:
    """The page's events triggered by (component id, event name) and/or taking a component as input."""
    return [
        dep
        for dep in config["dependencies"]
        if (target is None or [target[0], target[1]] in [list(t) for t in dep["targets"]])
        and (input_id is None or input_id in dep["inputs"])
    ]


def run_event(served: Served, dep: dict, data: list, event_data: Any = None, timeout: float = 30) -> dict:
    """Call one event as the page does (POST queue/join, then the session's SSE stream) and return
    the final `process_completed` message (or the join's refusal)."""
    session = uuid.uuid4().hex[:12]
    trigger = next((t[0] for t in dep["targets"] if t[0] is not None), None)
    body = {
        "data": data,
        "fn_index": dep["id"],
        "session_hash": session,
        "event_data": event_data,
        "trigger_id": trigger,
    }
    with httpx.Client(base_url=served.url, timeout=timeout) as http:
        joined = http.post("/gradio_api/queue/join", json=body)
        if joined.status_code != 200:
            return {"msg": "join_refused", "status": joined.status_code, "text": joined.text}
        event_id = joined.json().get("event_id")
        with http.stream("GET", "/gradio_api/queue/data", params={"session_hash": session}) as stream:
            for line in stream.iter_lines():
                if not line.startswith("data:"):
                    continue
                message = json.loads(line[5:])
                if message.get("msg") == "process_completed" and message.get("event_id") in (None, event_id):
                    return message
                if message.get("msg") == "close_stream":
                    break
    raise AssertionError(f"event {dep['id']} never completed")


def file_data(path: str | Path, name: str = "x.txt") -> dict:
    return {"path": str(path), "orig_name": name, "meta": {"_type": "gradio.FileData"}}


def upload(served: Served, name: str, content: bytes) -> httpx.Response:
    return httpx.post(
        served.url + "/gradio_api/upload", files=[("files", (name, content, "application/json"))], timeout=60
    )


def upload_folder() -> Path:
    from gradio.utils import get_upload_folder

    return Path(get_upload_folder())


def cached_copies(needle: bytes) -> list[Path]:
    """Files in Gradio's cache/upload folder holding `needle`."""
    root = upload_folder()
    hits = []
    for path in root.rglob("*") if root.is_dir() else ():
        try:
            if path.is_file() and needle in path.read_bytes():
                hits.append(path)
        except OSError:
            continue
    return hits


def assert_not_served(served: Served, reply: dict, *needles: bytes) -> None:
    """Neither the reply nor any file URL it names holds a secret."""
    text = json.dumps(reply)
    for needle in needles:
        assert needle.decode() not in text, reply
    for url in set(FILE_URL.findall(text)):
        got = httpx.get(served.url + url, timeout=10)
        for needle in needles:
            assert needle not in got.content, (url, got.status_code)


def create_user(served: Served, nickname: str) -> str:
    response = httpx.post(served.url + "/admin/api/users", json={"nickname": nickname}, headers=ADMIN_AUTH, timeout=10)
    assert response.status_code in (200, 201), response.text
    return response.json()["token"]


def user_exists(served: Served, token: str) -> bool:
    response = httpx.get(f"{served.url}/admin/api/users/{token}", headers=ADMIN_AUTH, timeout=10)
    assert response.status_code in (200, 404), response.text
    return response.status_code == 200


def status_text(reply: dict) -> str:
    """Every string the event sent back, for matching the Admin tab's status line."""
    return json.dumps((reply.get("output") or {}).get("data"))


def chat_history(file: dict) -> list[dict]:
    """A history whose first message "attaches" a file: what the undo/retry/edit events take."""
    return [
        {"role": "user", "content": [{"type": "file", "file": file}], "metadata": None, "options": None},
        {"role": "assistant", "content": [{"type": "text", "text": "ok"}], "metadata": None, "options": None},
        {"role": "user", "content": [{"type": "text", "text": "again"}], "metadata": None, "options": None},
        {"role": "assistant", "content": [{"type": "text", "text": "ok2"}], "metadata": None, "options": None},
    ]


# ---------------------------------------------------------------- the chat's history


def test_a_path_crafted_into_the_chat_history_is_never_read_copied_or_served(
    served: Served, page: dict, tmp_path: Path, opened: Any
) -> None:
    marker = f"top-secret-{uuid.uuid4().hex}".encode()
    secret = tmp_path / "secret.txt"
    secret.write_bytes(b"line one\n" + marker + b"\n")
    # The app's own database: a user's token is in it (or in its write-ahead log).
    token = create_user(served, "victim")
    database = Path(served.settings.data_dir) / DB_FILENAME
    assert database.exists()
    targets = [secret, database, Path(f"{database}-wal")]
    opens = {str(t): opened(t) for t in targets}

    chatbot = component_id(page, elem_id="chat-box", kind="chatbot")
    events = dependencies(page, input_id=chatbot)
    undo = dependencies(page, target=(chatbot, "undo"))
    assert undo and undo[0] in events, "the chat's undo event takes the history"
    assert len(events) >= 3
    for target in targets:
        for dep in events:
            data = [chat_history(file_data(target)) if i == chatbot else None for i in dep["inputs"]]
            reply = run_event(served, dep, data, event_data={"index": 3, "value": "ok2"})
            assert_not_served(served, reply, marker, token.encode())
            if dep is undo[0]:
                assert reply.get("success") is False, reply  # refused, not merely unanswered

    assert opens == {str(t): [] for t in targets}, "the server opened a crafted path"
    assert cached_copies(marker) == [] and cached_copies(token.encode()) == []


def test_gradio_never_serves_the_database_or_a_temp_file_by_path(served: Served, tmp_path: Path) -> None:
    secret = tmp_path / "direct.txt"
    secret.write_text("direct secret")
    database = Path(served.settings.data_dir) / DB_FILENAME
    for path in (secret, database, Path("/etc/passwd")):
        response = httpx.get(f"{served.url}/gradio_api/file={path}", timeout=10)
        assert response.status_code in (403, 404), (path, response.status_code)


# ---------------------------------------------------------------- the Admin tab's import


def import_event(page: dict) -> tuple[dict, int, int]:
    button = component_id(page, elem_id="admin-import")
    (dep,) = dependencies(page, target=(button, "click"))
    key = component_id(page, elem_id="admin-key")
    (file_input,) = [i for i in dep["inputs"] if i != key]
    return dep, key, file_input


def call_import(served: Served, page: dict, admin_key: str, file: Any) -> dict:
    dep, key, file_input = import_event(page)
    data = [admin_key if i == key else file if i == file_input else None for i in dep["inputs"]]
    return run_event(served, dep, data)


@pytest.mark.parametrize("admin_key", ["", "wrong-admin-key-000", ADMIN_KEY], ids=["no-key", "wrong-key", "right-key"])
def test_a_path_crafted_into_the_admin_import_is_never_read(
    served: Served, page: dict, tmp_path: Path, opened: Any, admin_key: str
) -> None:
    planted = f"planted-{uuid.uuid4().hex}"
    secret = tmp_path / "users.json"
    secret.write_text(json.dumps({"users": [{"token": planted, "nickname": "planted"}]}))
    missing = tmp_path / "missing.json"
    opens = opened(secret)

    here = call_import(served, page, admin_key, file_data(secret, "users.json"))
    absent = call_import(served, page, admin_key, file_data(missing, "users.json"))

    assert opens == [], "the server opened a crafted import path"
    assert not user_exists(served, planted)
    assert cached_copies(planted.encode()) == []
    assert_not_served(served, here, planted.encode())

    # No existence oracle: an existing and a missing file get the same answer.
    def normalise(reply: dict) -> str:
        answer = {"success": reply.get("success"), "output": reply.get("output")}
        return json.dumps(answer).replace(str(secret), "P").replace(str(missing), "P")

    assert normalise(here) == normalise(absent)
    assert "Imported" not in status_text(here)


def test_a_pasted_import_with_a_wrong_key_is_refused_and_with_the_right_key_imports(
    served: Served, page: dict
) -> None:
    token = f"pasted-{uuid.uuid4().hex}"
    text = json.dumps({"users": [{"token": token, "nickname": "pasted"}]})

    refused = call_import(served, page, "wrong-admin-key-000", text)
    assert "Wrong admin key." in status_text(refused), refused
    assert not user_exists(served, token)

    done = call_import(served, page, ADMIN_KEY, text)
    assert "Imported 1 user(s)." in status_text(done), done
    assert user_exists(served, token)


# ---------------------------------------------------------------- no uploads (issue 9, item 5)


@pytest.mark.parametrize("size", [16, 30 * 1024 * 1024], ids=["small", "30MB"])
def test_uploads_to_the_page_are_refused_and_nothing_is_stored(served: Served, size: int) -> None:
    marker = f"upload-{uuid.uuid4().hex}".encode()
    before = {p for p in upload_folder().rglob("*")} if upload_folder().is_dir() else set()
    response = upload(served, "users.json", marker + b" " * max(0, size - len(marker)))
    assert response.status_code == 403, response.status_code
    after = {p for p in upload_folder().rglob("*")} if upload_folder().is_dir() else set()
    assert cached_copies(marker) == []
    assert after <= before, "the refused upload left files behind"


# ---------------------------------------------------------------- the fix keeps the page working


def test_the_mounted_page_checks_paths_and_blocks_the_data_directory(served: Served) -> None:
    from starlette.routing import Mount

    (mount,) = [r for r in served.app.routes if isinstance(r, Mount) and hasattr(r.app, "get_blocks")]
    blocks = mount.app.get_blocks()
    assert blocks.has_launched is True
    blocked = [Path(p) for p in blocks.blocked_paths]
    assert Path(served.settings.data_dir).resolve() in blocked
    assert Path(".env").resolve() in blocked


def test_the_admin_export_is_handed_over_once_as_text_and_leaves_no_file(served: Served, page: dict) -> None:
    import tempfile

    token = create_user(served, "exported")
    button = component_id(page, elem_id="admin-export")
    (dep,) = dependencies(page, target=(button, "click"))
    key = component_id(page, elem_id="admin-key")
    temp = Path(tempfile.gettempdir())
    before = set(temp.glob("proxy-export-*"))

    reply = run_event(served, dep, [ADMIN_KEY if i == key else None for i in dep["inputs"]])
    assert reply.get("success") is True, reply
    assert token in json.dumps(reply), "the export did not reach the admin"
    assert FILE_URL.findall(json.dumps(reply)) == [], "the export is served as a file"
    assert cached_copies(token.encode()) == [], "a copy of the export sits in Gradio's cache"
    assert set(temp.glob("proxy-export-*")) == before, "a plaintext copy was left in the temp directory"

    wrong = run_event(served, dep, ["wrong-admin-key-000" if i == key else None for i in dep["inputs"]])
    assert token not in json.dumps(wrong)


def test_the_admin_imports_pasted_json_in_the_browser(served: Served) -> None:
    from tests.browser_util import chromium_path, field, launch_chromium, open_tab

    chromium = chromium_path()
    if chromium is None:
        pytest.skip("Chromium is missing (apt-get install -y chromium)")
    from playwright.sync_api import expect, sync_playwright

    token = f"browser-import-{uuid.uuid4().hex}"
    export = json.dumps({"users": [{"token": token, "nickname": "from-browser"}]})
    with sync_playwright() as playwright:
        browser = launch_chromium(playwright, chromium)
        try:
            tab = browser.new_page()
            errors: list[str] = []
            tab.on("pageerror", lambda exc: errors.append(str(exc)))
            tab.goto(served.url + "/", wait_until="domcontentloaded")
            open_tab(tab, "Admin")
            field(tab, "admin-key").fill(ADMIN_KEY)
            tab.locator("#admin-unlock").click()
            expect(tab.locator("#admin-status")).to_contain_text("Unlocked", timeout=15_000)
            tab.get_by_text("Backup", exact=True).click()
            field(tab, "admin-import-text").fill(export)
            tab.locator("#admin-import").click()
            expect(tab.locator("#admin-status")).to_contain_text("Imported 1 user(s).", timeout=15_000)
            assert not errors, errors
        finally:
            browser.close()
    assert user_exists(served, token)
