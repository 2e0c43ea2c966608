"""WORKERS > 1: several worker processes serving one port, each a whole app.

The parent binds one listening socket per worker, all on the same port with SO_REUSEPORT, then
starts each worker as `python -m proxy.workers <fd>` holding its own socket. The kernel spreads
new connections evenly over the sockets (by a hash of each connection's addresses): with one
shared socket, whichever worker woke first took a burst of connections (64 opened at once split
22/42), and the busier worker capped the whole. A worker that dies is started again on the same
socket, which the parent keeps open: connections that arrive meanwhile wait in its backlog
instead of being refused. Each worker builds its app from the same settings and serves with the
same uvicorn configuration as a single process (the connection guard included). SIGTERM or SIGINT
stops them all. The parent imports nothing heavy (no Gradio). Where SO_REUSEPORT is missing, all
workers share one socket."""

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
    sockets = listening_sockets(host, port, count)
    children: list[subprocess.Popen] = []
    stopping = False

    def start(i: int) -> subprocess.Popen:
        fd = sockets[i % len(sockets)].fileno()
        return subprocess.Popen([sys.executable, "-m", "proxy.workers", str(fd)], pass_fds=[fd], env=env)

    def stop(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True

    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, stop)
    children = [start(i) for i in range(count)]
    try:
        while not stopping:
            time.sleep(0.2)
            for i, child in enumerate(children):
                if child.poll() is not None and not stopping:
                    print(f"worker {child.pid} exited ({child.returncode}); starting another", file=sys.stderr)
                    time.sleep(RESTART_PAUSE_S)
                    children[i] = start(i)
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
        for sock in sockets:
            sock.close()
    return 0


def listening_sockets(host: str, port: int, count: int) -> list[socket.socket]:
    """`count` sockets listening on host:port with SO_REUSEPORT (the kernel balances connections
    between them), or one shared socket where the option is missing. Binding them all here makes
    a port taken by another program fail the start once, before any worker runs."""
    reuse_port = getattr(socket, "SO_REUSEPORT", None)
    sockets: list[socket.socket] = []
    try:
        for _ in range(count if reuse_port is not None else 1):
            sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if reuse_port is not None:
                sock.setsockopt(socket.SOL_SOCKET, reuse_port, 1)
            sock.bind((host, port))
            sock.listen(2048)
            sock.set_inheritable(True)
    except OSError:
        for sock in sockets:
            sock.close()
        raise
    return sockets


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
