"""Whole proxy instances as separate processes (`python app.py`), for the scale-out tests."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from tests.services import free_port

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Instance:
    process: subprocess.Popen
    port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def proxy(self, service: str = "openai") -> str:
        return f"{self.url}/proxy/{service}/v1"

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Kill the instance and every worker it started."""
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, sig)
            self.process.wait(20)

    def workers(self) -> list[int]:
        """The worker processes uvicorn started under this instance."""
        path = Path(f"/proc/{self.process.pid}/task/{self.process.pid}/children")
        children = [int(p) for p in path.read_text().split()] if path.exists() else []
        return [pid for pid in children if b"proxy.workers" in _cmdline(pid)]


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def start_instance(env: dict[str, str], cwd: Path, timeout: float = 90) -> Instance:
    """`python app.py` with exactly `env` (plus PATH), in its own process group, once /health says ok."""
    port = free_port()
    full_env = {
        "PATH": os.environ.get("PATH", ""), "HOME": str(cwd), "PYTHONPATH": str(ROOT),
        "HOST": "127.0.0.1", "PORT": str(port), "CHECK_KEYS": "false", "LOG_LEVEL": "warning",
        "DATA_DIR": str(cwd / "data"), **env,
    }  # fmt: skip
    log = open(cwd / f"instance-{port}.log", "wb")  # noqa: SIM115 - kept open for the process's life
    process = subprocess.Popen(
        [sys.executable, str(ROOT / "app.py")], cwd=cwd, env=full_env, stdout=log, stderr=subprocess.STDOUT,
        start_new_session=True,
    )  # fmt: skip
    instance = Instance(process, port)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"app.py exited: {(cwd / f'instance-{port}.log').read_text()[-2000:]}")
        try:
            if httpx.get(f"{instance.url}/health", timeout=1).status_code == 200:
                return instance
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    instance.kill()
    raise RuntimeError(f"app.py did not start within {timeout} s")
