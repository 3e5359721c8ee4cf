#!/usr/bin/env python3
"""Heavy history queries against live prices: what worst-case /bars and /history add to price latency.

    .venv/bin/python bench/heavy_queries.py [--trades 2000000] [--pairs 3] [--seconds 10] [--hammers 4]

1. Fills a SQLite tick history (``bench/out/heavy-history/``, reused when it already holds
   ``--trades`` trades) with ``--trades`` trades of one symbol, ``HEAVY``, spread over the week
   before now (the issue's case: 1.9 M rows over a week).
2. Runs bench/fanout.py's ``light`` scenario (a 1,000 ticks/s FMP-protocol upstream, the relay,
   10 WebSocket clients x 10 of 500 symbols in a separate process) with that history, and
   ``--clock app``: a price's latency is the client's own receive time minus the upstream's send
   time, i.e. what the client sees after its receive queue.
3. Pairs of runs: a baseline (no queries) and a loaded run, in which ``--hammers`` threads of
   this process send worst-case requests back to back for the whole run: ``/bars/HEAVY`` with
   ``interval=1h`` over the whole week (every stored trade is a candidate: the page ends on the
   relay's row/time budget) and ``/history/HEAVY`` with ``limit=10000``, alternately.

Prints per-run lines, a table (medians and ranges over the pairs) and, as the last line, one JSON
object; raw results go to ``bench/results/heavy_queries-<stamp>.json``.
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(ROOT))

from trio_relay.history import SqliteBackend  # noqa: E402
from trio_relay.model import Update  # noqa: E402

WEEK_MS = 7 * 86_400_000
SYMBOL = "HEAVY"


def say(msg: str) -> None:
    print(f"[heavy] {msg}", file=sys.stderr, flush=True)


def fill(data_dir: Path, trades: int) -> tuple[int, int]:
    """The history holds ``trades`` trades of HEAVY over the week before now; (start, end) in ms."""
    marker = data_dir / "filled.json"
    if marker.exists():
        info = json.loads(marker.read_text())
        if info["trades"] == trades:
            return info["start"], info["end"]
        for p in data_dir.iterdir():
            p.unlink()
    end = time.time_ns() // 1_000_000
    start = end - WEEK_MS
    step = WEEK_MS / trades
    conn = SqliteBackend(data_dir).connect()
    t0 = time.monotonic()
    try:
        batch = 50_000
        for first in range(0, trades, batch):
            rows = [
                (
                    Update(
                        SYMBOL,
                        "T",
                        start + int(i * step),
                        last_price=100.0 + (i * 7919 % 1000) / 100,
                        last_size=float(1 + i % 9),
                    ),
                    0,
                    None,
                )
                for i in range(first, min(trades, first + batch))
            ]
            conn.write(rows)
    finally:
        conn.close()
    marker.write_text(json.dumps({"trades": trades, "start": start, "end": end}))
    say(f"filled {trades:,} trades in {time.monotonic() - t0:.1f}s")
    return start, end


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Hammer:
    """Threads sending worst-case history requests back to back until stopped."""

    def __init__(self, port: int, threads: int, start: int, end: int) -> None:
        base = f"http://127.0.0.1:{port}/api/v2/realtime"
        self.urls = [
            f"{base}/bars/{SYMBOL}?interval=1h&start={start}&end={end}&limit=10000",
            f"{base}/history/{SYMBOL}?start={start}&end={end}&limit=10000",
        ]
        self.threads = [threading.Thread(target=self._run, args=(k,), daemon=True) for k in range(threads)]
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.results: list[dict] = []  # one per answered request

    def _run(self, k: int) -> None:
        n = k
        while not self.stop.is_set():
            url = self.urls[n % 2]
            n += 1
            t0 = time.monotonic()
            try:
                with urllib.request.urlopen(url, timeout=60) as r:
                    body = json.loads(r.read())
                    status = r.status
            except urllib.error.HTTPError as e:
                status, body = e.code, {}
            except OSError:
                time.sleep(0.2)  # the relay is not up yet (or is going away)
                continue
            with self.lock:
                self.results.append(
                    {
                        "path": "bars" if "/bars/" in url else "history",
                        "status": status,
                        "s": round(time.monotonic() - t0, 3),
                        "count": body.get("count"),
                        "truncated": body.get("truncated"),
                    }
                )

    def __enter__(self) -> Hammer:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(70)


def run_fanout(port: int, data_dir: Path, seconds: float, out: Path, relay_bin: str | None) -> dict:
    cmd = [
        sys.executable,
        str(BENCH / "fanout.py"),
        "--preset",
        "light",
        "--seconds",
        str(seconds),
        *(["--relay-bin", relay_bin] if relay_bin else []),
        "--relay-port",
        str(port),
        "--clock",
        "app",
        "--relay-env",
        "TRIO_RELAY_HISTORY_BACKEND=sqlite",
        "--relay-env",
        f"TRIO_RELAY_HISTORY_DATA_DIR={data_dir}",
        "--relay-env",
        "TRIO_RELAY_HISTORY_RETENTION_DAYS=0",
        "--relay-env",
        "TRIO_RELAY_LIMITS_REST_PER_SECOND=1000",
        "--relay-env",
        "TRIO_RELAY_LIMITS_REST_BURST=1000",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600)
    (out.with_suffix(".stderr")).write_text(proc.stderr)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"fanout.py failed ({proc.returncode}); see {out.with_suffix('.stderr')}")
    result = json.loads(lines[-1])
    out.write_text(json.dumps(result, indent=1))
    return result


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trades", type=int, default=2_000_000)
    p.add_argument("--pairs", type=int, default=3, help="baseline + loaded runs")
    p.add_argument("--seconds", type=float, default=10.0, help="measurement window of each run")
    p.add_argument("--hammers", type=int, default=4, help="threads sending heavy requests in a loaded run")
    p.add_argument("--relay-bin", default=None, help="another checkout's trio-relay (an A/B against older code)")
    args = p.parse_args()

    data_dir = BENCH / "out" / "heavy-history"
    data_dir.mkdir(parents=True, exist_ok=True)
    start, end = fill(data_dir, args.trades)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out_dir = BENCH / "out" / f"{stamp}-heavy"
    out_dir.mkdir(parents=True, exist_ok=True)

    runs: list[dict] = []
    for pair in range(args.pairs):
        for loaded in (False, True):
            port = free_port()
            label = f"{'loaded' if loaded else 'baseline'}-{pair}"
            if loaded:
                with Hammer(port, args.hammers, start, end) as hammer:
                    result = run_fanout(port, data_dir, args.seconds, out_dir / f"{label}.json", args.relay_bin)
                requests = hammer.results
            else:
                result = run_fanout(port, data_dir, args.seconds, out_dir / f"{label}.json", args.relay_bin)
                requests = []
            lat = result["latency_ms"]
            bars = [r for r in requests if r["path"] == "bars" and r["status"] == 200]
            hist = [r for r in requests if r["path"] == "history" and r["status"] == 200]
            run = {
                "label": label,
                "loaded": loaded,
                "latency_ms": lat,
                "delivered_ratio": result.get("delivered_ratio"),
                "relay_cpu_pct": result.get("relay_cpu_pct"),
                "relay_rss_mb": result.get("relay_rss_mb"),
                "bars_requests": len(bars),
                "bars_s_median": statistics.median([r["s"] for r in bars]) if bars else None,
                "bars_truncated": sum(1 for r in bars if r["truncated"]),
                "history_requests": len(hist),
                "history_s_median": statistics.median([r["s"] for r in hist]) if hist else None,
                "other_statuses": sorted({r["status"] for r in requests} - {200}),
            }
            runs.append(run)
            say(
                f"{label}: latency p50 {lat['p50']} p99 {lat['p99']} max {lat['max']} ms; "
                f"bars {run['bars_requests']} (median {run['bars_s_median']} s, {run['bars_truncated']} truncated), "
                f"history {run['history_requests']}; relay CPU {run['relay_cpu_pct']}%, RSS {run['relay_rss_mb']} MB"
            )

    def spread(key: str, loaded: bool) -> tuple[float, float, float]:
        vals = [r["latency_ms"][key] for r in runs if r["loaded"] is loaded]
        return statistics.median(vals), min(vals), max(vals)

    added = [lo["latency_ms"]["p99"] - base["latency_ms"]["p99"] for base, lo in zip(runs[0::2], runs[1::2])]
    print(
        f"{args.trades:,} stored trades, {args.hammers} threads of worst-case /bars and /history, "
        f"{args.pairs} pairs of {args.seconds:g} s runs (median [min..max])"
    )
    print(f"{'':10} {'p50 ms':>22} {'p99 ms':>22} {'max ms':>22}")
    for loaded in (False, True):
        cells = [f"{m:.2f} [{lo:.2f}..{hi:.2f}]" for m, lo, hi in (spread(k, loaded) for k in ("p50", "p99", "max"))]
        print(f"{'loaded' if loaded else 'baseline':10} " + " ".join(f"{c:>22}" for c in cells))
    print(
        f"p99 added by the queries, per pair: {', '.join(f'{a:+.2f}' for a in added)} ms "
        f"(median {statistics.median(added):+.2f} ms)"
    )
    summary = {
        "trades": args.trades,
        "hammers": args.hammers,
        "relay_bin": args.relay_bin,
        "pairs": args.pairs,
        "seconds": args.seconds,
        "p99_added_ms": added,
        "p99_added_ms_median": statistics.median(added),
        "runs": runs,
        "revision": subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT
        ).stdout.strip(),
    }
    results = BENCH / "results"
    results.mkdir(exist_ok=True)
    (results / f"heavy_queries-{stamp}.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
