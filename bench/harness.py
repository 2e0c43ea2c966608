"""What the benchmark scripts share: free ports, child processes, nginx, wrk, CPU accounting.

Everything listens on 127.0.0.1 only, and every process started here is stopped by `Procs.close`
(also on Ctrl-C), by its own pid.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import random
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
POST_LUA = BENCH / "post.lua"
HZ = os.sysconf("SC_CLK_TCK")
NCPU = os.cpu_count() or 1

REQUEST = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Say hi"}], "max_tokens": 16}
STREAM_REQUEST = {**REQUEST, "stream": True}


def free_port() -> int:
    """A free port below the kernel's ephemeral range, so that other programs' clients and
    OS-assigned listeners (say, a test suite running meanwhile) do not take it before we bind it."""
    for _ in range(200):
        port = random.randrange(20000, 32000)
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port in 20000-32000")


def listening_socket() -> socket.socket:
    """A socket already bound and listening on 127.0.0.1, to hand to a child (no race for the port)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(4096)
    sock.set_inheritable(True)
    return sock


# Where the processes run (taskset -c). The proxy and wrk share core 0 and the upstream has core 1:
# on this 2-vCPU VM that measured faster and steadier than wrk beside the upstream on core 1,
# which makes every hop of a request a wake-up across cores (see bench/README.md).
PROXY_CORES, UPSTREAM_CORES, WRK_CORES = "0", "1", "0"

# Niceness of every process started here: as root, ahead of whatever else runs on the machine
# (a test suite, an editor), so that it disturbs the figures less. Set from the command line.
PRIORITY = -15 if os.geteuid() == 0 else 0


def pin(cores: str | None) -> list[str]:
    """A `nice -n PRIORITY taskset -c CORES` prefix: the parts that apply (none when both are off)."""
    prefix = ["nice", "-n", str(PRIORITY)] if PRIORITY and shutil.which("nice") else []
    if cores and NCPU >= 2 and shutil.which("taskset") is not None:
        prefix += ["taskset", "-c", cores]
    return prefix


def _die_with_parent() -> None:
    """In the child, before exec: get SIGTERM if the benchmark dies, even by SIGKILL (Linux)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class Procs:
    """The child processes of one benchmark run; `close` stops them all, by pid."""

    def __init__(self, logdir: Path) -> None:
        self.logdir = logdir
        self.children: list[tuple[str, subprocess.Popen]] = []
        self._old_term = signal.getsignal(signal.SIGTERM)
        signal.signal(signal.SIGTERM, self._on_signal)

    def _on_signal(self, signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    def start(
        self, name: str, argv: Sequence[str], env: dict[str, str] | None = None, pass_fds: Sequence[int] = ()
    ) -> subprocess.Popen:
        log = open(self.logdir / f"{name}.log", "wb")  # noqa: SIM115 - closed with the process
        proc = subprocess.Popen(
            list(argv),
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            cwd=REPO,
            pass_fds=tuple(pass_fds),
            preexec_fn=_die_with_parent,
        )
        log.close()
        self.children.append((name, proc))
        return proc

    def log_of(self, name: str) -> str:
        path = self.logdir / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def close(self) -> None:
        for _, proc in reversed(self.children):
            if proc.poll() is None:
                proc.terminate()  # nginx: fast shutdown; uvicorn: graceful
        deadline = time.monotonic() + 5
        for _, proc in reversed(self.children):
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(2)
        self.children.clear()
        signal.signal(signal.SIGTERM, self._old_term)

    def descendants(self, name: str | None = None) -> list[int]:
        """Pids of every live process started here (or only the one called `name`) and their children."""
        parents: dict[int, list[int]] = {}
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            try:
                stat = Path(f"/proc/{entry.name}/stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            parents.setdefault(ppid, []).append(int(entry.name))
        out: list[int] = []
        todo = [p.pid for n, p in self.children if p.poll() is None and name in (None, n)]
        while todo:
            pid = todo.pop()
            out.append(pid)
            todo.extend(parents.get(pid, ()))
        return out


def start_proxy(
    procs: Procs,
    name: str,
    upstream_url: str,
    *,
    log_level: str = "warning",
    app: str = "proxy",
    repo: str | Path = REPO,
    cores: str | None = None,
    access_log: str = "on",
    extra: Sequence[str] = (),
) -> tuple[subprocess.Popen, int]:
    """Start bench/proxy_server.py on a socket bound here (so no other program can take its port)."""
    sock = listening_socket()
    port = sock.getsockname()[1]
    argv = [*pin(cores), sys.executable, str(BENCH / "proxy_server.py"), "--fd", str(sock.fileno()),
            "--upstream", upstream_url, "--log-level", log_level, "--app", app, "--repo", str(repo),
            "--access-log", access_log, "--data-dir", str(procs.logdir / f"{name}-data"), *extra]  # fmt: skip
    try:
        proc = procs.start(name, argv, pass_fds=[sock.fileno()])
    finally:
        sock.close()
    return proc, port


def wait_http(url: str, timeout: float = 30.0, proc: subprocess.Popen | None = None) -> None:
    """Wait until `url` answers anything over HTTP, and `proc` (the server behind it) still runs."""
    deadline = time.monotonic() + timeout
    while True:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{url}: the server exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=1):
                break
        except urllib.error.HTTPError:
            break
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{url} did not come up in {timeout:.0f}s") from None
            time.sleep(0.05)
    time.sleep(0.1)
    if proc is not None and proc.poll() is not None:  # something else answered on its port
        raise RuntimeError(f"{url}: the server exited with {proc.returncode}")


def wait_ok(url: str, timeout: float) -> None:
    """Wait until `url` answers 200 (the page: 503 while it is being built)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except (urllib.error.HTTPError, OSError):
            if time.monotonic() > deadline:
                raise RuntimeError(f"{url} did not answer 200 in {timeout:.0f} s") from None
            time.sleep(0.05)


def post(url: str, body: dict, token: str | None = None) -> tuple[int, bytes]:
    headers = {"content-type": "application/json"}
    if token:
        headers["authorization"] = f"Bearer {token}"
    req = urllib.request.Request(url, json.dumps(body).encode(), headers, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def cpu_jiffies(pids: Sequence[int]) -> int:
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime + stime
    return total


def cpu_ns(pids: Sequence[int]) -> int:
    """CPU time (ns) that these processes, all their threads, have run: precise, unlike jiffies."""
    total = 0
    for pid in pids:
        try:
            tasks = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        for tid in tasks:
            try:
                total += int(Path(f"/proc/{pid}/task/{tid}/schedstat").read_text().split()[0])
            except (OSError, ValueError, IndexError):
                continue
    return total


def busy_jiffies() -> int:
    """Non-idle CPU time of the whole machine."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return sum(fields[:8]) - idle


def children_jiffies() -> int:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return round((usage.ru_utime + usage.ru_stime) * HZ)


@dataclass
class WrkResult:
    requests: int
    seconds: float
    non2xx: int
    socket_errors: int
    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    other_cpu: float  # cores used by processes not started here, during the run
    server_cpu_us: float  # CPU time of the server under test per request (µs), when asked for

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0


def run_wrk(
    url: str,
    connections: int,
    seconds: float,
    body: dict,
    token: str | None,
    procs: Procs,
    cores: str | None = None,
    server: Sequence[int] = (),
) -> WrkResult:
    """One wrk run (one thread) POSTing `body`.

    Also measures how busy the rest of the machine was, and the CPU time the `server` pids spent:
    CPU per request hardly depends on background load, unlike req/s and latency."""
    env = {**os.environ, "BENCH_BODY": json.dumps(body, separators=(",", ":")), "BENCH_AUTH": token or ""}
    argv = [
        *pin(cores),
        "wrk",
        "-t1",
        f"-c{connections}",
        f"-d{max(1, round(seconds))}s",
        "--timeout",
        "10s",
        "-s",
        str(POST_LUA),
        url,
    ]
    pids = procs.descendants()
    server0 = cpu_ns(server)
    ours0, busy0, kids0, t0 = cpu_jiffies(pids), busy_jiffies(), children_jiffies(), time.monotonic()
    out = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=seconds + 30, check=False)
    ours1, busy1, kids1, t1 = cpu_jiffies(pids), busy_jiffies(), children_jiffies(), time.monotonic()
    server1 = cpu_ns(server)
    line = next((ln for ln in out.stdout.splitlines() if ln.startswith("BENCH_RESULT ")), None)
    if out.returncode != 0 or line is None:
        raise RuntimeError(f"wrk failed ({out.returncode}): {out.stdout[-500:]} {out.stderr[-500:]}")
    data = json.loads(line.removeprefix("BENCH_RESULT "))
    ours = (ours1 - ours0) + (kids1 - kids0)
    other = max(0.0, ((busy1 - busy0) - ours) / HZ / (t1 - t0))
    return WrkResult(
        requests=data["requests"],
        seconds=data["duration_us"] / 1e6,
        non2xx=data["non2xx"],
        socket_errors=data["connect"] + data["read"] + data["write"] + data["timeout"],
        p50_ms=data["p50_us"] / 1000,
        p90_ms=data["p90_us"] / 1000,
        p99_ms=data["p99_us"] / 1000,
        mean_ms=data["mean_us"] / 1000,
        other_cpu=other,
        server_cpu_us=(server1 - server0) / 1000 / data["requests"] if server and data["requests"] else 0.0,
    )


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def need(tool: str) -> None:
    if shutil.which(tool) is None:
        sys.exit(f"bench needs `{tool}` on PATH (Debian: apt-get install {tool if tool != 'nginx' else 'nginx-light'})")
