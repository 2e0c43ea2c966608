"""WORKERS > 1: one listening socket, several worker processes serving it, each a whole app.

The parent binds the socket, then starts each worker as `python -m proxy.workers <fd>` holding
the socket; a worker builds its app from the same settings and serves with the same uvicorn
configuration as a single process (the connection guard included). A worker that dies is started
again; SIGTERM or SIGINT stops them all. The parent imports nothing heavy (no Gradio)."""

from __future__ import annotations

import logging
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable

log = logging.getLogger("proxy")

RESTART_PAUSE_S = 1.0


def supervise(host: str, port: int, count: int, env: dict[str, str] | None = None) -> int:
    """Serve host:port with `count` worker processes until told to stop; the exit status."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.set_inheritable(True)
    fd = sock.fileno()
    argv = [sys.executable, "-m", "proxy.workers", str(fd)]
    children: list[subprocess.Popen] = []
    stopping = False

    def start() -> subprocess.Popen:
        return subprocess.Popen(argv, pass_fds=[fd], env=env)

    def stop(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True

    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, stop)
    children = [start() for _ in range(count)]
    try:
        while not stopping:
            time.sleep(0.2)
            for i, child in enumerate(children):
                if child.poll() is not None and not stopping:
                    print(f"worker {child.pid} exited ({child.returncode}); starting another", file=sys.stderr)
                    time.sleep(RESTART_PAUSE_S)
                    children[i] = start()
    finally:
        for child in children:
            if child.poll() is None:
                child.terminate()
        deadline = time.monotonic() + 15
        for child in children:
            try:
                child.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                child.kill()
        sock.close()
    return 0


def serve_worker(fd: int, build: Callable[[], tuple[object, object]]) -> None:
    """In a worker: build (app, settings) and serve the inherited socket like a single process."""
    import uvicorn

    from proxy.guard import server_config

    app, settings = build()
    sock = socket.socket(fileno=fd)
    uvicorn.Server(server_config(app, settings)).run(sockets=[sock])


if __name__ == "__main__":
    from app import worker_app

    serve_worker(int(sys.argv[1]), worker_app)
