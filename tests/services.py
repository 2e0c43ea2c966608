"""Real Postgres and Redis servers on loopback, in a temporary directory, for the scale-out tests.

They are Debian's `postgresql` and `redis-server` (`.ci/run` installs them). Where a binary is
missing, the tests that need it are skipped with a message saying what to install."""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _pg_bin() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"))
    return Path(found[-1]).parent if found else None


def _as_owner(owner: str | None, argv: list[str]) -> list[str]:
    """Postgres refuses to run as root: run its tools as `owner` (the postgres user) then."""
    return ["runuser", "-u", owner, "--", *argv] if owner else argv


@dataclass
class RedisServer:
    port: int
    process: subprocess.Popen
    directory: Path

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)

    def start(self) -> None:
        """Start again on the same port (after `stop`), with empty memory like a restarted cache."""
        self.process = _spawn_redis(self.port, self.directory)


def _spawn_redis(port: int, directory: Path) -> subprocess.Popen:
    binary = shutil.which("redis-server")
    assert binary is not None
    process = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
         "--dir", str(directory), "--protected-mode", "yes", "--loglevel", "warning"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2) as sock:
                sock.sendall(b"PING\r\n")
                if sock.recv(16).startswith(b"+PONG"):
                    return process
        except OSError:
            time.sleep(0.05)
    process.kill()
    raise RuntimeError("redis-server did not start")


@contextmanager
def redis_server() -> Iterator[RedisServer]:
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed (apt-get install redis-server; .ci/run does it)")
    directory = Path(tempfile.mkdtemp(prefix="proxy-redis-"))
    port = free_port()
    server = RedisServer(port, _spawn_redis(port, directory), directory)
    try:
        yield server
    finally:
        server.stop()
        shutil.rmtree(directory, ignore_errors=True)


@dataclass
class PostgresServer:
    port: int
    directory: Path
    bin: Path
    owner: str | None

    @property
    def url(self) -> str:
        return f"postgresql://proxy@127.0.0.1:{self.port}/proxy"

    def database(self, name: str) -> str:
        """A fresh, empty database on this server; its URL."""
        self._psql(f'CREATE DATABASE "{name}" OWNER proxy')
        return f"postgresql://proxy@127.0.0.1:{self.port}/{name}"

    def _psql(self, sql: str) -> None:
        subprocess.run(
            _as_owner(self.owner, [str(self.bin / "psql"), "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres",
                                   "-d", "postgres", "-v", "ON_ERROR_STOP=1", "-qc", sql]),
            check=True, capture_output=True,
        )  # fmt: skip

    def pg_ctl(self, *args: str) -> None:
        subprocess.run(
            _as_owner(self.owner, [str(self.bin / "pg_ctl"), "-D", str(self.directory / "data"), "-w", "-t", "30",
                                   *args]),
            check=True, capture_output=True,
        )  # fmt: skip


@contextmanager
def postgres_server() -> Iterator[PostgresServer]:
    bin_dir = _pg_bin()
    if bin_dir is None:
        pytest.skip("PostgreSQL is not installed (apt-get install postgresql; .ci/run does it)")
    owner = None
    if os.geteuid() == 0:
        try:
            owner = pwd.getpwnam("postgres").pw_name
        except KeyError:
            pytest.skip("running as root without a 'postgres' user to run PostgreSQL as")
    directory = Path(tempfile.mkdtemp(prefix="proxy-pg-"))
    if owner:
        shutil.chown(directory, owner)
    port = free_port()
    server = PostgresServer(port, directory, bin_dir, owner)
    data = directory / "data"
    subprocess.run(
        _as_owner(owner, [str(bin_dir / "initdb"), "-D", str(data), "-U", "postgres", "-A", "trust",
                          "--no-sync", "-E", "UTF8"]),
        check=True, capture_output=True,
    )  # fmt: skip
    options = f"-p {port} -c listen_addresses=127.0.0.1 -k {directory} -c fsync=off -c max_connections=200"
    server.pg_ctl("-o", options, "-l", str(directory / "log"), "start")
    try:
        server._psql("CREATE ROLE proxy LOGIN")
        server._psql("CREATE DATABASE proxy OWNER proxy")
        yield server
    finally:
        try:
            server.pg_ctl("-m", "immediate", "stop")
        finally:
            shutil.rmtree(directory, ignore_errors=True)
