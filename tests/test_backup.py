"""Backups to a Hugging Face dataset repo, against a fake Hub served on loopback.

The fake implements only what `proxy.backup` uses, the way the Hub answers it: repo creation,
`preupload` (binary files are "lfs"), the LFS batch API and its PUT, the NDJSON commit, and
`resolve` (HEAD and GET) for downloads."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import logging
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse

from proxy.access import build_access
from proxy.backup import Backup
from proxy.store import DB_FILENAME, SQLiteStore
from proxy.usage import UsageEvent
from tests.conftest import make_settings, serve

# huggingface_hub's LFS upload passes a file as `data=`, which httpx2 deprecates; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:Use 'content=<...>':DeprecationWarning")

HF_TOKEN = "hf_FakeHubToken0123456789abcdef"
REPO = "friend/proxy-state"


class FakeHub:
    """Dataset repos in memory. `calls` lists "METHOD path" of every request received."""

    def __init__(self) -> None:
        self.repos: dict[str, dict[str, bytes]] = {}
        self.private: dict[str, bool] = {}
        self.blobs: dict[str, bytes] = {}
        self.commits = 0
        self.calls: list[str] = []
        self.auth_headers: list[str | None] = []
        self.commit_delay = 0.0
        self.app = self._build()

    def _build(self) -> FastAPI:
        app = FastAPI()

        @app.middleware("http")
        async def check_auth(request: Request, call_next):  # type: ignore[no-untyped-def]
            self.calls.append(f"{request.method} {request.url.path}")
            auth = request.headers.get("authorization")
            self.auth_headers.append(auth)
            if not request.url.path.startswith("/lfs-storage/") and auth != f"Bearer {HF_TOKEN}":
                return JSONResponse({"error": "Invalid credentials"}, status_code=401)
            return await call_next(request)

        @app.post("/api/repos/create")
        async def create(request: Request) -> Response:
            body = await request.json()
            repo_id = f"{body['organization']}/{body['name']}"
            assert body.get("type") == "dataset"
            if repo_id in self.repos:
                return JSONResponse({"error": "You already created this dataset repo"}, status_code=409)
            self.repos[repo_id] = {}
            self.private[repo_id] = body.get("visibility") == "private" or body.get("private") is True
            return JSONResponse({"url": f"{request.base_url}datasets/{repo_id}", "name": repo_id})

        @app.post("/api/datasets/{ns}/{name}/preupload/{revision}")
        async def preupload(ns: str, name: str, revision: str, request: Request) -> Response:
            if f"{ns}/{name}" not in self.repos:
                return _hub_error(404, "RepoNotFound")
            files = (await request.json())["files"]
            modes = []
            for f in files:
                sample = base64.b64decode(f["sample"])
                mode = "lfs" if b"\x00" in sample else "regular"
                modes.append({"path": f["path"], "uploadMode": mode, "shouldIgnore": False, "oid": None})
            return JSONResponse({"files": modes})

        @app.post("/datasets/{ns}/{name}.git/info/lfs/objects/batch")
        async def lfs_batch(ns: str, name: str, request: Request) -> Response:
            body = await request.json()
            objects = [
                {
                    "oid": o["oid"],
                    "size": o["size"],
                    "actions": {"upload": {"href": f"{request.base_url}lfs-storage/{o['oid']}"}},
                }
                for o in body["objects"]
            ]
            return JSONResponse({"transfer": "basic", "objects": objects})

        @app.put("/lfs-storage/{oid}")
        async def lfs_put(oid: str, request: Request) -> Response:
            data = await request.body()
            assert hashlib.sha256(data).hexdigest() == oid
            self.blobs[oid] = data
            return Response(status_code=200)

        @app.post("/api/datasets/{ns}/{name}/commit/{revision}")
        async def commit(ns: str, name: str, revision: str, request: Request) -> Response:
            files = self.repos.get(f"{ns}/{name}")
            if files is None:
                return _hub_error(404, "RepoNotFound")
            await asyncio.sleep(self.commit_delay)
            for line in (await request.body()).splitlines():
                item = json.loads(line)
                if item["key"] == "file":
                    files[item["value"]["path"]] = base64.b64decode(item["value"]["content"])
                elif item["key"] == "lfsFile":
                    files[item["value"]["path"]] = self.blobs[item["value"]["oid"]]
            self.commits += 1
            oid = hashlib.sha1(str(self.commits).encode()).hexdigest()
            url = f"{request.base_url}datasets/{ns}/{name}/commit/{oid}"
            return JSONResponse({"commitUrl": url, "commitOid": oid, "success": True})

        @app.api_route("/datasets/{ns}/{name}/resolve/{revision}/{path:path}", methods=["GET", "HEAD"])
        async def resolve(ns: str, name: str, revision: str, path: str) -> Response:
            files = self.repos.get(f"{ns}/{name}")
            if files is None:
                return _hub_error(404, "RepoNotFound")
            if path not in files:
                return _hub_error(404, "EntryNotFound")
            data = files[path]
            commit = hashlib.sha1(str(self.commits).encode()).hexdigest()
            etag = f'"{hashlib.sha256(data).hexdigest()}"'
            return Response(data, headers={"ETag": etag, "X-Repo-Commit": commit})

        return app


def _hub_error(status: int, code: str) -> Response:
    return JSONResponse({"error": code}, status_code=status, headers={"X-Error-Code": code})


@pytest.fixture
def hub() -> Iterator[tuple[FakeHub, str]]:
    fake = FakeHub()
    with serve(fake.app, None) as served:  # type: ignore[arg-type]
        yield fake, served.url


def _settings(tmp_path: Path, data: str = "data", **env: str):
    return make_settings(
        {
            "DATA_DIR": str(tmp_path / data),
            "HF_TOKEN": HF_TOKEN,
            "STATE_REPO": REPO,
            "GATEKEEPER": "user_token",
            "ADMIN_KEY": "admin-key-for-tests-123",
            **env,
        }
    )


def _event(family: str = "gpt-4o", tokens_in: int = 10, tokens_out: int = 5) -> UsageEvent:
    return UsageEvent(1.0, "openai", "gpt-4o", family, False, tokens_in, tokens_out, 1.0, 200, key_id="oai-1")


def test_backup_then_restore_round_trips_users_and_usage(hub: tuple[FakeHub, str], tmp_path: Path) -> None:
    fake, url = hub
    first = build_access(_settings(tmp_path, "first"), hub_endpoint=url)
    alice = first.users.create(nickname="alice", token_limits={"gpt-4o": 1000})
    first.users.charge(alice, "gpt-4o", 120)
    first.store.add_usage(_event())
    first.store.save_key_state("openai", "oai-1", {"state": "ok"})
    assert first.backup is not None and first.backup.backup_now() is True
    first.store.close()

    assert fake.private[REPO] is True
    assert f"PUT /lfs-storage/{hashlib.sha256(fake.repos[REPO][DB_FILENAME]).hexdigest()}" in fake.calls

    second = build_access(_settings(tmp_path, "second"), hub_endpoint=url)  # an empty disk: restored
    restored = second.users.find(alice.token)
    assert restored is not None and restored.nickname == "alice"
    assert restored.token_counts == {"gpt-4o": 120} and restored.prompt_count == 1
    assert second.store.usage_totals()[0] == {"gpt-4o": {"requests": 1, "tokens_in": 10, "tokens_out": 5}}
    assert second.store.load_key_states("openai") == {"oai-1": {"state": "ok"}}
    second.store.close()


def test_upload_goes_over_plain_http_not_xet(hub: tuple[FakeHub, str], tmp_path: Path) -> None:
    fake, url = hub
    access = build_access(_settings(tmp_path), hub_endpoint=url)
    assert access.backup is not None and access.backup.backup_now()
    access.store.close()
    paths = [call.split(" ", 1)[1] for call in fake.calls]
    assert "/api/datasets/friend/proxy-state/preupload/main" in paths
    assert "/datasets/friend/proxy-state.git/info/lfs/objects/batch" in paths
    assert not any("xet" in path for path in paths)


def test_an_unchanged_database_is_not_uploaded_again(hub: tuple[FakeHub, str], tmp_path: Path) -> None:
    fake, url = hub
    access = build_access(_settings(tmp_path), hub_endpoint=url)
    assert access.backup is not None
    assert access.backup.backup_now() is True
    assert access.backup.backup_now() is False
    access.users.create(nickname="bob")
    assert access.backup.backup_now() is True
    assert fake.commits == 2
    access.store.close()


def test_start_without_a_backup_yet_begins_empty_and_backs_up_later(hub: tuple[FakeHub, str], tmp_path: Path) -> None:
    fake, url = hub
    access = build_access(_settings(tmp_path), hub_endpoint=url)
    assert len(access.users) == 0 and access.backup is not None and access.backup.enabled
    access.users.create(nickname="carol")
    assert access.backup.backup_now()
    access.store.close()
    assert DB_FILENAME in fake.repos[REPO]


def test_an_existing_local_database_is_never_overwritten_by_a_restore(hub: tuple[FakeHub, str], tmp_path: Path) -> None:
    fake, url = hub
    first = build_access(_settings(tmp_path, "first"), hub_endpoint=url)
    first.users.create(nickname="remote")
    assert first.backup is not None and first.backup.backup_now()
    first.store.close()

    local = SQLiteStore.open(tmp_path / "local")
    local.save_user({"token": "local-token-0123456789", "nickname": "local"})
    local.close()
    access = build_access(_settings(tmp_path, "local"), hub_endpoint=url)
    assert [u.nickname for u in access.users.all()] == ["local"]
    access.store.close()


def test_a_failed_restore_turns_backups_off_so_the_good_backup_survives(
    hub: tuple[FakeHub, str], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    fake, url = hub
    fake.repos[REPO] = {DB_FILENAME: b"this is not a database" + b"\x00" * 100}
    with caplog.at_level(logging.INFO):
        access = build_access(_settings(tmp_path), hub_endpoint=url)
    assert access.backup is not None and access.backup.enabled is False
    access.users.create(nickname="new")
    assert access.backup.backup_now() is False
    assert fake.repos[REPO][DB_FILENAME].startswith(b"this is not a database")
    assert "backups are off" in caplog.text
    access.store.close()


def test_run_backs_up_on_its_interval_and_once_more_at_shutdown(hub: tuple[FakeHub, str], tmp_path: Path) -> None:
    fake, url = hub
    access = build_access(_settings(tmp_path, BACKUP_INTERVAL="0.2"), hub_endpoint=url)
    backup = access.backup
    assert backup is not None

    async def scenario() -> None:
        access.start()
        access.users.create(nickname="early")
        for _ in range(100):
            if fake.commits:
                break
            await asyncio.sleep(0.05)
        assert fake.commits == 1
        access.users.create(nickname="late")
        backup.interval = 3600  # only the shutdown backup can carry "late" now
        await asyncio.sleep(0.3)
        await access.aclose()

    asyncio.run(scenario())
    restored_path = tmp_path / "check.sqlite3"
    restored_path.write_bytes(fake.repos[REPO][DB_FILENAME])
    conn = sqlite3.connect(restored_path)
    nicknames = {json.loads(data)["nickname"] for (data,) in conn.execute("SELECT data FROM users")}
    conn.close()
    assert nicknames == {"early", "late"}


def test_an_unreachable_hub_at_start_turns_backups_off(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # huggingface_hub retries for ~23 s first (1+2+4+8+8 s); the test skips the waiting.
    monkeypatch.setattr("huggingface_hub.utils._http.time.sleep", lambda seconds: None)
    access = build_access(_settings(tmp_path), hub_endpoint="http://127.0.0.1:9")  # nothing listens there
    assert access.backup is not None and access.backup.enabled is False
    access.users.create(nickname="works anyway")
    assert access.backup.backup_now() is False
    access.store.close()


def test_a_hub_that_hangs_does_not_hang_shutdown(hub: tuple[FakeHub, str], tmp_path: Path) -> None:
    fake, url = hub
    access = build_access(_settings(tmp_path), hub_endpoint=url)
    assert access.backup is not None
    access.backup.final_timeout = 0.5
    fake.commit_delay = 5.0

    async def scenario() -> float:
        access.start()
        access.users.create(nickname="pending")
        started = time.monotonic()
        await access.aclose()
        return time.monotonic() - started

    started = time.monotonic()
    assert asyncio.run(scenario()) < 3.0
    assert time.monotonic() - started < 3.0  # nor does the upload thread hold up the loop's exit
    assert access.backup.last_error == "TimeoutError"


def test_the_hf_token_never_appears_in_logs(
    hub: tuple[FakeHub, str], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    fake, url = hub
    access = build_access(_settings(tmp_path), hub_endpoint=url)
    assert access.backup is not None
    access.backup._api.token = "hf_WrongToken0123456789abcdefgh"  # the Hub refuses it
    access.users.create(nickname="x")

    async def one_round() -> None:
        stop = asyncio.Event()
        task = asyncio.create_task(access.backup.run(stop))  # type: ignore[union-attr]
        await asyncio.sleep(0.05)
        stop.set()  # the shutdown backup runs, and fails
        await task

    with caplog.at_level(logging.DEBUG):
        asyncio.run(one_round())
    access.store.close()
    assert HF_TOKEN not in caplog.text and "hf_WrongToken" not in caplog.text
    assert "backup: upload to friend/proxy-state failed" in caplog.text


def test_backup_is_off_without_state_repo(tmp_path: Path) -> None:
    settings = make_settings({"DATA_DIR": str(tmp_path / "d")})
    assert Backup.from_settings(settings) is None
    access = build_access(settings)
    assert access.backup is None
    access.store.close()
