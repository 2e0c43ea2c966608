"""A 15-second run of bench/soak.py: mixed traffic (streams, abandoned streams, the Claude door,
bad inputs, wrong keys, slow clients) from several addresses against `python app.py`, then a
kill -9 and a restart. The 10-minute run is `python bench/soak.py` (figures in bench/README.md)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

from soak import run_soak  # noqa: E402

# Lone surrogates still get a 500 (issue 9 item 15, another change): the full soak sends them and
# reports it; this test leaves them out until that lands, and checks everything else strictly.
PENDING_ELSEWHERE = frozenset({"surrogate"})


def test_mixed_hostile_traffic_leaves_the_proxy_answering_and_nothing_uncounted() -> None:
    # Fewer workers than the full soak, and /health judged by its p99 under 250 ms: CI shares two
    # cores with the rest of the suite. bench/soak.py holds the 10-minute run to 50 ms at most.
    report = run_soak(duration=15, workers=6, slow=16, pause=0.05, health_ms=250, exclude=PENDING_ELSEWHERE)
    checks = report["checks"]
    assert checks["no unexpected outcome"], report["unexpected"]
    assert checks["every acknowledged request counted"], (report["acknowledged"], report["ledger_requests"])
    assert checks["nothing lost on kill -9"], (report["ledger_requests"], report["ledger_after_kill"])
    assert report["health_failures"] == 0 and report["health_p99_ms"] <= 250, report
    assert checks["rss flat"], (report["rss_first_quarter_mb"], report["rss_last_quarter_mb"])
    assert report["acknowledged"] >= 100, report["outcomes"]
    assert report["slow_connections_closed_by_server"] > 0
