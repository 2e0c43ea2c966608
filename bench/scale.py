"""Scale-out figures: WORKERS=1 on SQLite vs WORKERS=2 on Redis + Postgres, beside an nginx hop;
and what 1,000 keys and 10,000 users cost per request and at start.

    python bench/scale.py                    # both parts, about 3 minutes
    python bench/scale.py --part throughput  # WORKERS=1 (SQLite) vs WORKERS=2 (Redis + Postgres)
    python bench/scale.py --part cost        # 1 key / proxy key vs 1,000 keys / 10,000 users
    python bench/scale.py --part cost --baseline /tmp/old   # and an older checkout's rows, same run

Every proxy is `python app.py` as an owner runs it (the whole app, Gradio page mounted), started
with the settings of its row; the fake upstream is nginx answering a fixed chat completion; the
reference hop is nginx `proxy_pass`. Postgres and Redis are Debian's, started on loopback in a
temporary directory (tests/services.py). wrk (one thread, POST JSON) measures req/s at 64
connections and p50/p99 at 1 connection; rows are measured round-robin (`--repeat`), medians
shown. CPU/req counts every process of the row (the proxy's workers; for WORKERS=2 also the
Postgres and Redis servers, shown apart). Nothing is pinned: WORKERS=2 needs both cores, which
wrk and the upstream share with it; figures are ratios measured in one run.
"""

from __future__ import annotations

import argparse
import os
import secrets
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import harness  # noqa: E402
import upstream  # noqa: E402

PROXY_KEY = "pk-bench-scale-proxy-key"
ADMIN_KEY = "admin-bench-scale-0123456789"
PROXIED = "/proxy/openai/v1/chat/completions"


@dataclass
class Row:
    name: str
    url: str
    token: str | None
    proc: str | None = None  # the Procs name of the server, for CPU per request
    extra_pids: list[int] = field(default_factory=list)  # state servers (Postgres, Redis)
    ready_s: float = 0.0
    pids: list[int] = field(default_factory=list)
    runs64: list[harness.WrkResult] = field(default_factory=list)
    runs1: list[harness.WrkResult] = field(default_factory=list)
    state_cpu: list[float] = field(default_factory=list)


def keys(n: int) -> str:
    return ",".join(f"sk-bench-{i:05d}-{'0123456789abcdef' * 2}" for i in range(n))


def make_users(data_dir: Path, n: int) -> str:
    """A SQLite database in `data_dir` holding `n` users; the token of the first (who sends)."""
    data_dir.mkdir(parents=True, exist_ok=True)
    sys.path.insert(0, str(harness.REPO))
    from proxy.store import SQLiteStore

    store = SQLiteStore.open(data_dir)
    now = time.time()
    records = [
        {"token": secrets.token_urlsafe(24), "nickname": f"user{i}", "type": "normal", "created_at": now,
         "counts_since": now, "token_limits": {}, "token_counts": {}, "lifetime_token_counts": {}}
        for i in range(n)
    ]  # fmt: skip
    store.save_users(records)
    store.close()
    return records[0]["token"]


def start_app(procs: harness.Procs, name: str, env: dict[str, str], repo: Path | None = None) -> tuple[int, float]:
    """`python app.py` (of `repo`; this tree by default) with `env`; its port and how long it took
    to serve (answer /health). The page follows later (app.LatePage): how long it took is printed,
    and the run waits for it."""
    port = harness.free_port()
    full = {
        "PATH": os.environ.get("PATH", ""), "HOME": os.environ.get("HOME", "/tmp"), "HOST": "127.0.0.1",
        "PORT": str(port), "CHECK_KEYS": "false", "LOG_LEVEL": "warning", **env,
    }  # fmt: skip
    started = time.monotonic()
    proc = procs.start(name, [*harness.pin(None), sys.executable, str((repo or harness.REPO) / "app.py")], env=full)
    harness.wait_http(f"http://127.0.0.1:{port}/health", timeout=120, proc=proc)
    ready = time.monotonic() - started
    harness.wait_ok(f"http://127.0.0.1:{port}/", timeout=120)  # the measured rows serve the page too
    print(f"{name}: serving after {ready:.2f} s, page after {time.monotonic() - started:.2f} s", file=sys.stderr)
    return port, ready


def state_pids(pg: object, redis: object) -> list[int]:
    pids = [redis.process.pid]  # type: ignore[attr-defined]
    postmaster = Path(pg.directory) / "data" / "postmaster.pid"  # type: ignore[attr-defined]
    root = int(postmaster.read_text().split()[0])
    pids.append(root)
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                stat = Path(f"/proc/{entry.name}/stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == root:
                pids.append(int(entry.name))
    return pids


def build_rows(args: argparse.Namespace, procs: harness.Procs, workdir: Path, services: list) -> list[Row]:
    up_port, stream_port, hop_port = harness.free_port(), harness.free_port(), harness.free_port()
    conf = workdir / "upstream.conf"
    conf.write_text(upstream.nginx_upstream_conf(workdir, up_port, stream_port))
    procs.start("upstream", [*harness.pin(None), "nginx", "-p", str(workdir), "-c", str(conf)])
    hop = workdir / "hop.conf"
    hop.write_text(upstream.nginx_hop_conf(workdir, hop_port, up_port))
    procs.start("nginx-hop", [*harness.pin(None), "nginx", "-p", str(workdir), "-c", str(hop)])
    base = f"http://127.0.0.1:{up_port}/v1"
    chat = "/v1/chat/completions"
    rows = [
        Row("direct (wrk → upstream)", f"http://127.0.0.1:{up_port}{chat}", None, "upstream"),
        Row("nginx hop (proxy_pass)", f"http://127.0.0.1:{hop_port}{chat}", None, "nginx-hop"),
    ]
    one = {"OPENAI_KEY": keys(1), "OPENAI_BASE_URL": base, "PROXY_KEY": PROXY_KEY}
    if args.rate_limit:  # the limits on the path: in memory with one process, on Redis with two
        one["TEXT_MODEL_RATE_LIMIT"] = str(args.rate_limit)
    if args.part in ("throughput", "all"):
        from tests.services import postgres_server, redis_server

        pg_ctx, redis_ctx = postgres_server(), redis_server()
        pg, redis = pg_ctx.__enter__(), redis_ctx.__enter__()
        services += [pg_ctx, redis_ctx]
        port, ready = start_app(procs, "w1-sqlite", {**one, "DATA_DIR": str(workdir / "w1")})
        rows.append(Row("proxy WORKERS=1, SQLite", f"http://127.0.0.1:{port}{PROXIED}", PROXY_KEY, "w1-sqlite",
                        ready_s=ready))  # fmt: skip
        env2 = {**one, "WORKERS": "2", "DATABASE_URL": pg.url, "REDIS_URL": redis.url, "DATA_DIR": str(workdir / "w2")}
        port, ready = start_app(procs, "w2-shared", env2)
        rows.append(Row("proxy WORKERS=2, Redis + Postgres", f"http://127.0.0.1:{port}{PROXIED}", PROXY_KEY,
                        "w2-shared", state_pids(pg, redis), ready))  # fmt: skip
    if args.part in ("cost", "all"):
        cases = [
            ("1 key, proxy key", {**one}, 0),
            ("1,000 keys, proxy key", {**one, "OPENAI_KEY": keys(1000)}, 0),
            ("1 key, user_token, 1 user", {**one, "GATEKEEPER": "user_token", "ADMIN_KEY": ADMIN_KEY}, 1),
            ("1,000 keys, user_token, 10,000 users",
             {**one, "OPENAI_KEY": keys(1000), "GATEKEEPER": "user_token", "ADMIN_KEY": ADMIN_KEY}, 10_000),
        ]  # fmt: skip
        trees = [("", None)] + ([(" (baseline)", args.baseline)] if args.baseline else [])
        for suffix, repo in trees:  # the baseline's rows after this tree's, measured round-robin with them
            for i, (label, env, users) in enumerate(cases):
                name = f"cost{i}{'b' if repo else ''}"
                data = workdir / name
                token = make_users(data, users) if users else PROXY_KEY
                port, ready = start_app(procs, name, {**env, "DATA_DIR": str(data)}, repo)
                rows.append(Row(label + suffix, f"http://127.0.0.1:{port}{PROXIED}", token, name, ready_s=ready))
    for row in rows:
        status, body = harness.post(row.url, harness.REQUEST, row.token)
        if status != 200 or b"chat.completion" not in body:
            raise RuntimeError(f"{row.name}: {status} {body[:300]!r}")
        row.pids = procs.descendants(row.proc)
    return rows


def measure(args: argparse.Namespace, rows: list[Row], procs: harness.Procs) -> None:
    for row in rows:
        harness.run_wrk(row.url, 64, 1, harness.REQUEST, row.token, procs, None, row.pids)
    for rep in range(args.repeat):
        for row in rows:
            before = harness.cpu_ns(row.extra_pids)
            r64 = harness.run_wrk(row.url, 64, args.duration, harness.REQUEST, row.token, procs, None, row.pids)
            state = (harness.cpu_ns(row.extra_pids) - before) / 1000 / max(r64.requests, 1)
            r1 = harness.run_wrk(row.url, 1, args.latency_duration, harness.REQUEST, row.token, procs, None, row.pids)
            row.runs64.append(r64)
            row.runs1.append(r1)
            row.state_cpu.append(state)
            print(f"[{rep + 1}/{args.repeat}] {row.name:40s} {r64.rps:8.0f} req/s @64  p50 {r1.p50_ms:.3f} ms  "
                  f"{r64.server_cpu_us:5.0f} µs/req (+{state:.0f} state)  other load {r64.other_cpu:.2f}",
                  file=sys.stderr, flush=True)  # fmt: skip


def table(rows: list[Row], args: argparse.Namespace) -> str:
    med = harness.median
    p50 = {row.name: med([r.p50_ms for r in row.runs1]) for row in rows}
    ref = p50[rows[0].name]
    lines = [
        "| row | req/s @64 | p50 @1 (ms) | p99 @1 (ms) | added p50 (ms) | CPU/req (µs) | state CPU/req (µs) "
        "| ready (s) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        rps = [r.rps for r in row.runs64]
        errors = sum(r.non2xx + r.socket_errors for r in row.runs64 + row.runs1)
        lines.append(
            f"| {row.name}{f' ({errors} errors)' if errors else ''} | {med(rps):,.0f} | {p50[row.name]:.3f} | "
            f"{med([r.p99_ms for r in row.runs1]):.3f} | "
            f"{'—' if row is rows[0] else f'{p50[row.name] - ref:+.3f}'} | "
            f"{med([r.server_cpu_us for r in row.runs64]):.0f} | "
            f"{med(row.state_cpu) if row.extra_pids else 0:.0f} | {row.ready_s:.1f} |"
        )
    other = med([max(r.other_cpu for r in row.runs64) for row in rows])
    lines.append(
        f"\nMedians of {args.repeat} runs, {args.duration:g} s at 64 connections, "
        f"{args.latency_duration:g} s at 1; background load from other processes: {other:.2f} cores."
    )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=["throughput", "cost", "all"], default="all")
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--duration", type=float, default=5)
    parser.add_argument("--latency-duration", type=float, default=3)
    parser.add_argument(
        "--baseline", type=Path, help="--part cost: also the rows of another checkout (say an older commit, "
        "`git archive`d and unpacked there), measured in the same run"
    )
    parser.add_argument("--rate-limit", type=int, default=0, help="TEXT_MODEL_RATE_LIMIT of every proxy row")
    args = parser.parse_args()
    harness.need("wrk")
    harness.need("nginx")
    services: list = []
    with tempfile.TemporaryDirectory(prefix="proxy-scale-") as tmp:
        procs = harness.Procs(Path(tmp))
        try:
            rows = build_rows(args, procs, Path(tmp), services)
            measure(args, rows, procs)
        except Exception:
            for name, _ in procs.children:
                tail = procs.log_of(name).strip()[-600:]
                if tail:
                    print(f"--- {name} ---\n{tail}", file=sys.stderr)
            raise
        finally:
            procs.close()
            for ctx in reversed(services):
                ctx.__exit__(None, None, None)
    print(table(rows, args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
