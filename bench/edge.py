#!/usr/bin/env python3
"""The HTTP edge: REST requests per second, and a real client's first price under a socket flood.

    .venv/bin/python bench/edge.py rest  [--relay-bin PATH] [--runs 3] [--conns 16] [--seconds 5]
    .venv/bin/python bench/edge.py flood [--relay-bin PATH] [--runs 3] [--sockets 10000] [--addresses 1]

``rest``: the relay (simulator upstream) pinned to CPU 0; a load process pinned to CPU 1 keeps
``--conns`` kept-alive connections each sending ``GET /api/v2/realtime/health/live`` (open, not
rate limited) one after another for ``--seconds``; prints requests/s and latency per run, then
the median and range.

``flood``: the relay started with the soft open-file limit most systems give a service (1,024;
``--relay-nofile``), then ``--sockets`` TCP connections opened from ``--addresses`` loopback
addresses (127.0.0.2, 127.0.1.x...) that send nothing; then a real client from 127.0.0.1
connects, subscribes and times its first ``price_update`` (10 s at most). Prints, per run, how
many idle sockets connected and the time to the first price, then the median and range.

``--relay-bin`` benchmarks another checkout's ``trio-relay`` (A/B). Every line of output is also
written, with the raw per-run figures as JSON, to ``--out`` when given. Linux only.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
LIVE = "/api/v2/realtime/health/live"
WS_PATH = "/api/v2/realtime/ws/prices"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_relay(
    relay_bin: str, port: int, cpu: int | None, nofile: int | None, env_extra: dict[str, str]
) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRIO_RELAY_") and k != "FMP_API_KEY"}
    env.update(env_extra)

    def prepare() -> None:
        if cpu is not None:
            os.sched_setaffinity(0, {cpu})
        if nofile is not None:
            hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
            resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, hard))

    # History and alerts off: this measures the edge, not SQLite; a fresh directory per run.
    env.update({"TRIO_RELAY_HISTORY_BACKEND": "off", "TRIO_RELAY_ALERTS_ENABLED": "false"})
    workdir = tempfile.mkdtemp(prefix="edge-bench-")
    log = open(os.path.join(workdir, "relay.log"), "wb")
    proc = subprocess.Popen(
        [relay_bin, "serve", "--port", str(port), "--provider", "sim"],
        env=env,
        cwd=workdir,
        stdout=log,
        stderr=log,
        preexec_fn=prepare,
    )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{LIVE}", timeout=1) as r:
                if r.status == 200:
                    return proc
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise SystemExit(f"the relay did not start; see {workdir}/relay.log")


def cpu_seconds(pid: int) -> float:
    """user + system CPU seconds of process ``pid`` so far (/proc/<pid>/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def summary(values: list[float]) -> str:
    return f"median {statistics.median(values):,.1f} (range {min(values):,.1f} .. {max(values):,.1f})"


# ------------------------------------------------------------------------------------ rest


def rest_load(port: int, conns: int, seconds: float) -> dict[str, float]:
    """Run in the load process: ``conns`` kept-alive connections, one request at a time each."""
    import trio

    request = f"GET {LIVE} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode()
    latencies: list[float] = []
    errors = 0

    async def one(stop_at: float) -> None:
        nonlocal errors
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        buf = b""
        async with stream:
            while trio.current_time() < stop_at:
                t0 = time.perf_counter()
                await stream.send_all(request)
                while b"\r\n\r\n" not in buf:
                    chunk = await stream.receive_some(65536)
                    if not chunk:
                        errors += 1
                        return
                    buf += chunk
                head, _, buf = buf.partition(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n")[1:]:
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value)
                while len(buf) < length:
                    buf += await stream.receive_some(65536)
                buf = buf[length:]
                if not head.startswith(b"HTTP/1.1 200"):
                    errors += 1
                latencies.append(time.perf_counter() - t0)

    async def main() -> float:
        start = trio.current_time()
        async with trio.open_nursery() as nursery:
            for _ in range(conns):
                nursery.start_soon(one, start + seconds)
        return trio.current_time() - start

    elapsed = trio.run(main)
    latencies.sort()
    return {
        "requests": len(latencies),
        "req_per_s": len(latencies) / elapsed,
        "p50_ms": latencies[len(latencies) // 2] * 1000,
        "p99_ms": latencies[int(len(latencies) * 0.99)] * 1000,
        "errors": errors,
    }


def run_rest(args: argparse.Namespace) -> list[dict[str, float]]:
    results = []
    for run in range(args.runs):
        port = free_port()
        relay = start_relay(args.relay_bin, port, 0, None, {"TRIO_RELAY_LIMITS_CONNECTIONS_PER_IP": "0"})
        try:
            cpu0 = cpu_seconds(relay.pid)
            out = subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "_restload",
                    "--port",
                    str(port),
                    "--conns",
                    str(args.conns),
                    "--seconds",
                    str(args.seconds),
                ],
                capture_output=True,
                check=True,
                preexec_fn=lambda: os.sched_setaffinity(0, {1}),
            )
            result = json.loads(out.stdout.decode().strip().splitlines()[-1])
            # CPU time per request: what the edge costs, whatever else the machine is doing
            # (requests/s on a shared machine follow its other load as much as the relay).
            result["relay_cpu_us_per_req"] = (cpu_seconds(relay.pid) - cpu0) / max(1, result["requests"]) * 1e6
        finally:
            stop(relay)
        say(
            args,
            f"rest run {run + 1}: {result['relay_cpu_us_per_req']:,.0f} us of relay CPU per request; "
            f"{result['req_per_s']:,.0f} req/s, p50 {result['p50_ms']:.2f} ms, "
            f"p99 {result['p99_ms']:.2f} ms, {result['errors']} errors",
        )
        results.append(result)
    say(args, f"relay CPU us/request: {summary([r['relay_cpu_us_per_req'] for r in results])}")
    say(
        args,
        f"rest req/s: {summary([r['req_per_s'] for r in results])}; p50 ms: {summary([r['p50_ms'] for r in results])}",
    )
    return results


# ------------------------------------------------------------------------------------ flood


def flood_once(port: int, sockets: int, addresses: int) -> dict[str, float | int | None]:
    import trio
    import trio_websocket

    held: list[trio.SocketStream] = []
    failed = 0

    def local(i: int) -> str:
        if addresses == 1:
            return "127.0.0.2"
        return f"127.0.{1 + (i % addresses) // 250}.{1 + (i % addresses) % 250}"

    async def opener(indexes: range) -> None:
        nonlocal failed
        for i in indexes:
            try:
                with trio.fail_after(2):
                    held.append(await trio.open_tcp_stream("127.0.0.1", port, local_address=local(i)))
            except (OSError, trio.TooSlowError):
                failed += 1

    async def main() -> dict[str, float | int | None]:
        t0 = trio.current_time()
        async with trio.open_nursery() as nursery:
            step = max(1, sockets // 100)
            for start in range(0, sockets, step):
                nursery.start_soon(opener, range(start, min(sockets, start + step)))
        opened_in = trio.current_time() - t0
        first: float | None = None
        t1 = trio.current_time()
        with trio.move_on_after(10):
            async with trio_websocket.open_websocket_url(f"ws://127.0.0.1:{port}{WS_PATH}") as ws:
                await ws.send_message('{"action":"subscribe","symbols":["AAPL"]}')
                while first is None:
                    if json.loads(await ws.get_message()).get("type") == "price_update":
                        first = trio.current_time() - t1
        for stream in held:
            stream.socket.close()
        return {
            "connected": len(held),
            "failed": failed,
            "open_s": round(opened_in, 2),
            "first_price_s": None if first is None else round(first, 4),
        }

    return trio.run(main)


def run_flood(args: argparse.Namespace) -> list[dict[str, float | int | None]]:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < args.sockets + 256:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, args.sockets + 256), hard))
    results = []
    for run in range(args.runs):
        port = free_port()
        relay = start_relay(args.relay_bin, port, 0, args.relay_nofile, {})
        try:
            result = flood_once(port, args.sockets, args.addresses)
        finally:
            stop(relay)
        shown = (
            "no price within 10 s"
            if result["first_price_s"] is None
            else f"first price after {result['first_price_s'] * 1000:.0f} ms"
        )
        say(
            args,
            f"flood run {run + 1}: {result['connected']:,} idle sockets open ({result['failed']} failed, "
            f"{result['open_s']} s), then a real client: {shown}",
        )
        results.append(result)
    firsts = [r["first_price_s"] for r in results]
    if all(f is not None for f in firsts):
        say(args, f"time to first price (ms): {summary([float(f) * 1000 for f in firsts if f is not None])}")
    else:
        say(args, f"time to first price: {sum(f is None for f in firsts)}/{len(firsts)} runs got none within 10 s")
    return results


# ------------------------------------------------------------------------------------ main

LINES: list[str] = []


def say(args: argparse.Namespace, line: str) -> None:
    print(line, flush=True)
    LINES.append(line)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("mode", choices=["rest", "flood", "_restload"])
    p.add_argument("--relay-bin", default=str(ROOT / ".venv" / "bin" / "trio-relay"))
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--conns", type=int, default=16)
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--port", type=int)
    p.add_argument("--sockets", type=int, default=10_000)
    p.add_argument("--addresses", type=int, default=1)
    p.add_argument("--relay-nofile", type=int, default=1024, help="the relay's soft RLIMIT_NOFILE at start")
    p.add_argument("--out", help="also write the lines and raw results (JSON) here")
    args = p.parse_args()
    if args.mode == "_restload":
        print(json.dumps(rest_load(args.port, args.conns, args.seconds)))
        return
    results: object = run_rest(args) if args.mode == "rest" else run_flood(args)
    record = {"mode": args.mode, "relay_bin": args.relay_bin, "args": vars(args), "lines": LINES, "runs": results}
    if args.out:
        Path(args.out).write_text(json.dumps(record, indent=1) + "\n")
    print(json.dumps(record))


if __name__ == "__main__":
    main()
