#!/usr/bin/env python3
"""Fleet benchmark: delivered updates/s of N relay processes sharing one Redis versus one relay.

    .venv/bin/python bench/fleet.py                      # 1 relay (memory), then fleets of 2 and 3
    .venv/bin/python bench/fleet.py --preset heavy --fleets 1,2,3

The same load in every configuration: one bench/upstream.py at the same rate, one
bench/loadgen.py with the same clients and subscriptions. Configurations:

- ``single``: one ``trio-relay serve`` with ``engine.backend = memory`` (the relay holds the
  upstream itself; bench/fanout.py's set-up);
- ``fleet-N``: N ``trio-relay serve`` processes with ``engine.backend = redis`` on the local Redis
  (a prefix unique to the run, its keys deleted afterwards). One of them (elected) holds the
  upstream connection and publishes each update once through Redis; each relay delivers to its own
  clients. The load generator spreads the clients over the N relays in contiguous blocks (its
  ``--url`` given N times), so every relay's clients want the whole symbol set.

Reported per configuration: delivered updates/s (all clients), its share of the demand, latency
p50/p99 (upstream send → the relay's write to the client, see bench/README.md), the CPU of the
relays (sum, and each), of Redis (its /proc entry when its pid is visible, else ``INFO cpu``), of
the load generator and upstream, the rest of the machine, and the fleet's counters from each
relay's /status (batches received, duplicates dropped: must be 0, stale fencing tokens).

Nothing is pinned by default: on this 2-core machine the relays, Redis, the load generator and
the upstream share both cores, and pinning N relays to one core would decide the answer in
advance. ``--pin`` applies bench/fanout.py's split instead (relays on CPU 0, load generator and
upstream on CPU 1; Redis, a system service, is never pinned).

Tick history is off in every relay (``TRIO_RELAY_HISTORY_BACKEND=off``): with the default SQLite
each relay of a fleet would write every tick to its own file, which measures the disk, not the
fan-out. ``--relay-env KEY=VALUE`` sets anything else (every relay).

Logs and results go to bench/out/<timestamp>-fleet/ (git-ignored). Prints a table and, as the
LAST line of stdout, one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path
from urllib.parse import urlsplit

import fanout as fo  # the orchestrator's pieces: children, readers, sampler, /proc helpers

BENCH = fo.BENCH
ROOT = fo.ROOT
WS_PATH = fo.WS_PATH
CLK_TCK = fo.CLK_TCK

PRESETS: dict[str, dict] = {
    "default": dict(
        clients=1000,
        symbols_per_client=10,
        symbols=500,
        rate=5000,
        batch=False,
        warmup=3,
        seconds=8,
        about="1000 clients x 10 of 500 symbols, 5,000 ticks/s, one frame per update: 100,000 updates/s",
    ),
    "heavy": dict(
        clients=1000,
        symbols_per_client=10,
        symbols=500,
        rate=10000,
        batch=False,
        warmup=3,
        seconds=8,
        about="1000 clients x 10 of 500 symbols, 10,000 ticks/s, one frame per update: 200,000 updates/s",
    ),
}


# ---------------------------------------------------------------------------------------- Redis
class Redis:
    """Just enough of RESP for INFO, SCAN and DEL (the orchestrator needs no client library)."""

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        self.host, self.port = parts.hostname or "127.0.0.1", parts.port or 6379
        self.password = parts.password
        self.db = int(parts.path.lstrip("/") or 0)

    def call(self, *args: str) -> object:
        with socket.create_connection((self.host, self.port), timeout=5) as sock:
            stream = sock.makefile("rb")
            if self.password:
                self._send(sock, "AUTH", self.password)
                self._read(stream)
            if self.db:
                self._send(sock, "SELECT", str(self.db))
                self._read(stream)
            self._send(sock, *args)
            return self._read(stream)

    @staticmethod
    def _send(sock: socket.socket, *args: str) -> None:
        payload = f"*{len(args)}\r\n".encode()
        for a in args:
            raw = a.encode()
            payload += f"${len(raw)}\r\n".encode() + raw + b"\r\n"
        sock.sendall(payload)

    def _read(self, stream) -> object:
        line = stream.readline().rstrip(b"\r\n")
        kind, rest = line[:1], line[1:]
        if kind == b"+":
            return rest.decode()
        if kind == b"-":
            raise RuntimeError(f"Redis: {rest.decode()}")
        if kind == b":":
            return int(rest)
        if kind == b"$":
            n = int(rest)
            return None if n < 0 else stream.read(n + 2)[:-2].decode(errors="replace")
        if kind == b"*":
            n = int(rest)
            return None if n < 0 else [self._read(stream) for _ in range(n)]
        raise RuntimeError(f"Redis: unexpected reply {line[:60]!r}")

    def info(self, section: str) -> dict[str, str]:
        text = self.call("INFO", section)
        out = {}
        for line in str(text).splitlines():
            key, sep, value = line.partition(":")
            if sep:
                out[key] = value
        return out

    def cpu_seconds(self) -> float | None:
        try:
            info = self.info("cpu")
            return float(info["used_cpu_sys"]) + float(info["used_cpu_user"])
        except (OSError, RuntimeError, KeyError, ValueError):
            return None

    def pid(self) -> int | None:
        """redis-server's pid, if it is a process this machine's /proc shows (same namespace)."""
        try:
            pid = int(self.info("server")["process_id"])
            with open(f"/proc/{pid}/comm") as f:
                return pid if "redis" in f.read() else None
        except (OSError, RuntimeError, KeyError, ValueError):
            return None

    def delete_prefix(self, prefix: str) -> int:
        deleted, cursor = 0, "0"
        while True:
            cursor, keys = self.call("SCAN", cursor, "MATCH", prefix + ":*", "COUNT", "1000")  # type: ignore[misc]
            if keys:
                deleted += int(self.call("DEL", *keys))  # type: ignore[arg-type]
            if cursor == "0":
                return deleted


def irq_jiffies() -> int:
    """The whole machine's irq + softirq time (jiffies, /proc/stat): loopback delivery runs there."""
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()
        return int(fields[6]) + int(fields[7])
    except (OSError, IndexError, ValueError):
        return 0


# ---------------------------------------------------------------------------------------- one run
def run_config(n: int, backend: str, cfg: dict, args: argparse.Namespace, out_dir: Path, redis: Redis) -> dict:
    """Upstream + n relays + one load generator; the merged result of one configuration."""
    label = "single" if backend == "memory" else f"fleet-{n}"
    say = lambda msg: print(f"[fleet] {msg}", file=sys.stderr, flush=True)  # noqa: E731
    kids = fo.Children()
    notes: list[str] = []
    t_run0 = time.monotonic()
    relay_cpu, lg_cpu, up_cpu = ("0", "1", "1") if args.pin else ("", "", "")
    prefix = f"bench-fleet-{time.strftime('%Y%m%d%H%M%S')}-{uuid.uuid4().hex[:6]}"
    marks: dict[str, float | None] = {}  # Redis CPU and irq time at the window's edges
    try:
        # ---------------------------------------------------------------- upstream (paused)
        up_cmd = [
            sys.executable,
            str(BENCH / "upstream.py"),
            "--port",
            "0",
            "--rate",
            "0",
            "--stdin-control",
            "--print-every",
            "5",
        ]
        up = kids.start(
            "upstream",
            up_cmd,
            cpu=up_cpu,
            log=out_dir / f"upstream-{label}.log",
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        up_reader = fo.LineReader(up.stdout, "upstream-stdout", save=out_dir / f"upstream-{label}.jsonl")
        up_reader.start()
        hello = up_reader.wait_for("listening", 15)
        if hello is None:
            raise RuntimeError(f"upstream did not start; see {out_dir / f'upstream-{label}.log'}")
        up_port = hello["port"]
        # ---------------------------------------------------------------- relays
        relay_bin = args.relay_bin or str(ROOT / ".venv" / "bin" / "trio-relay")
        relays: list[tuple[str, subprocess.Popen, int]] = []
        for i in range(n):
            name = f"relay{i + 1}"
            port = fo.free_port()
            env = {k: v for k, v in os.environ.items() if not k.startswith("TRIO_RELAY_") and k != "FMP_API_KEY"}
            env["FMP_API_KEY"] = "bench"
            env["TRIO_RELAY_CLIENTS_MAX_SYMBOLS_PER_CLIENT"] = str(max(500, cfg["symbols_per_client"]))
            env["TRIO_RELAY_LIMITS_CONNECTIONS_PER_IP"] = "0"
            env["TRIO_RELAY_HISTORY_BACKEND"] = "off"
            env["TRIO_RELAY_ENGINE_BACKEND"] = backend
            if backend == "redis":
                env["TRIO_RELAY_ENGINE_REDIS_URL"] = args.redis_url
                env["TRIO_RELAY_ENGINE_PREFIX"] = prefix
                env["TRIO_RELAY_ENGINE_NODE_ID"] = name
            for item in args.relay_env or []:
                k, _, v = item.partition("=")
                env[k] = v
            cwd = out_dir / f"{label}-{name}"  # its own data_dir (alerts, portfolio)
            cwd.mkdir(parents=True, exist_ok=True)
            cmd = [
                relay_bin,
                "serve",
                "--port",
                str(port),
                "--provider",
                "fmp",
                "--upstream-url",
                f"ws://127.0.0.1:{up_port}",
                "--log-level",
                "INFO",
            ]
            proc = kids.start(name, cmd, cpu=relay_cpu, log=out_dir / f"{label}-{name}.log", env=env, cwd=cwd)
            relays.append((name, proc, port))
        bases = {name: f"http://127.0.0.1:{port}/api/v2/realtime" for name, _, port in relays}
        deadline = time.monotonic() + 30
        for name, proc, _ in relays:
            while True:
                code, body = fo.http_json(bases[name] + "/health", 1.0)
                if code == 200:
                    break
                if proc.poll() is not None:
                    raise RuntimeError(f"{name} exited with {proc.returncode}; see {out_dir / f'{label}-{name}.log'}")
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{name} not healthy after 30s (last: {code} {body})")
                time.sleep(0.1)
        holder = None
        if backend == "redis":
            roles = {
                name: (fo.http_json(bases[name] + "/status", 5)[1] or {}).get("fleet", {}) for name, _, _ in relays
            }
            holders = [name for name, f in roles.items() if f.get("role") == "holder"]
            if len(holders) != 1:
                raise RuntimeError(f"expected one holder, /status says {holders}")
            holder = holders[0]
        say(
            f"{label}: upstream :{up_port}, relays {', '.join(f'{name} :{port}' for name, _, port in relays)} healthy"
            + (f"; holder {holder}, prefix {prefix}" if holder else "")
        )
        # ---------------------------------------------------------------- sampler + loadgen
        pids = {name: proc.pid for name, proc, _ in relays} | {"upstream": up.pid, "fleet": os.getpid()}
        redis_pid = redis.pid() if backend == "redis" else None
        if redis_pid:
            pids["redis"] = redis_pid
        sampler = fo.Sampler(pids, args.sample_period, None)
        sampler.start()
        lg_cmd = [
            sys.executable,
            str(BENCH / "loadgen.py"),
            "--clients",
            str(cfg["clients"]),
            "--symbols-per-client",
            str(cfg["symbols_per_client"]),
            "--symbols",
            str(cfg["symbols"]),
            "--warmup",
            str(cfg["warmup"]),
            "--seconds",
            str(cfg["seconds"]),
        ]
        for _, _, port in relays:
            lg_cmd += ["--url", f"ws://127.0.0.1:{port}{WS_PATH}"]
        if cfg["batch"]:
            lg_cmd.append("--batch")
        lg = kids.start("loadgen", lg_cmd, cpu=lg_cpu, log=out_dir / f"loadgen-{label}.log", stdout=subprocess.PIPE)
        sampler.pids["loadgen"] = lg.pid

        def on_loadgen_event(obj: dict) -> None:
            event = obj.get("event")
            command = None
            if event == "subscribed":
                command = f"rate {cfg['rate']}\n"
            elif event in ("window_start", "window_end"):
                command = f"stats {event}\n"
                marks[event + "_irq"] = irq_jiffies()
                marks[event + "_irq_t"] = time.time()
                if backend == "redis":
                    marks[event] = redis.cpu_seconds()
                    marks[event + "_t"] = time.time()
            if command:
                try:
                    up.stdin.write(command.encode())
                    up.stdin.flush()
                except OSError:
                    pass

        lg_reader = fo.LineReader(
            lg.stdout, "loadgen-stdout", echo=on_loadgen_event, save=out_dir / f"loadgen-{label}.jsonl"
        )
        lg_reader.start()
        result = fo.await_loadgen(lg, lg_reader, sampler, cfg, label, out_dir, say)
        t0, t1 = lg_reader.wait_for("window_start", 1)["t"], lg_reader.wait_for("window_end", 1)["t"]
        # ---------------------------------------------------------------- counters, once the clients are gone
        deadline = time.monotonic() + 30
        for name, proc, _ in relays:
            while time.monotonic() < deadline and proc.poll() is None:
                code, body = fo.http_json(bases[name] + "/health", 5)
                if code and body and not body.get("clients"):
                    break
                time.sleep(0.3)
        statuses = {
            name: (fo.http_json(bases[name] + "/status", 15)[1] if proc.poll() is None else None)
            for name, proc, _ in relays
        }
        alive = {name: proc.poll() is None for name, proc, _ in relays}
        # ---------------------------------------------------------------- stop: relays, then upstream
        for name, _, _ in relays:
            kids.stop(name)
        up.stdin.write(b"quit\n")
        up.stdin.flush()
        kids.stop("upstream")
        up_reader.join(5)
    finally:
        kids.kill_all()
        if backend == "redis":
            try:
                redis.delete_prefix(prefix)
            except (OSError, RuntimeError) as exc:
                print(f"[fleet] could not delete the keys {prefix}:* ({exc})", file=sys.stderr)

    # -------------------------------------------------------------------- reduce
    win = sampler.window(t0, t1)
    first, last = win[0], win[-1]

    def cpu_pct(name: str) -> float | None:
        return fo.window_cpu_pct(win, name)

    relay_cpu_each = {name: cpu_pct(name) for name, _, _ in relays}
    relay_cpu_sum = round(sum(v for v in relay_cpu_each.values() if v is not None), 1)
    redis_cpu, redis_cpu_source = None, None
    if backend == "redis":
        if redis_pid:
            redis_cpu, redis_cpu_source = cpu_pct("redis"), "/proc"
        elif marks.get("window_start") is not None and marks.get("window_end") is not None:
            span = marks["window_end_t"] - marks["window_start_t"]
            redis_cpu = round(100 * (marks["window_end"] - marks["window_start"]) / span, 1) if span > 0 else None
            redis_cpu_source = "INFO cpu"
    lg_pct = cpu_pct("loadgen") or result["loadgen_cpu_pct"]
    cpu_busy = {}
    for cpu_name, (b1, tot1) in last["cpus"].items():
        b0, tot0 = first["cpus"].get(cpu_name, (b1, tot1))
        cpu_busy[cpu_name] = round(100 * (b1 - b0) / (tot1 - tot0), 1) if tot1 > tot0 else None
    total_busy = round(sum(v for v in cpu_busy.values() if v is not None), 1)
    irq_span = marks.get("window_end_irq_t", 0) - marks.get("window_start_irq_t", 0)
    irq = (
        round(100 * (marks["window_end_irq"] - marks["window_start_irq"]) / CLK_TCK / irq_span, 1)
        if irq_span > 0
        else None
    )
    ours = relay_cpu_sum + sum(
        v for v in (redis_cpu, lg_pct, cpu_pct("upstream"), cpu_pct("fleet"), irq) if v is not None
    )
    other = round(max(0.0, total_busy - ours), 1)
    if other > 10:
        notes.append(
            f"OTHER LOAD: {other:.0f}% of a CPU busy outside the benchmark's processes and the kernel's "
            "interrupt work during the window"
            + (" (Redis is shared: other clients' work shows in its CPU)" if backend == "redis" else "")
        )
    stats = up_reader.events("stats")
    edge = {o.get("tag"): o for o in stats if o.get("tag")}
    e0, e1 = edge.get("window_start"), edge.get("window_end")
    achieved = ((e1["generated"] - e0["generated"]) / (e1["t"] - e0["t"])) if e0 and e1 and e1["t"] > e0["t"] else None
    bp_skipped = (e1["bp_skipped"] - e0["bp_skipped"]) if e0 and e1 else 0
    up_conns_max = max((o["conns"] for o in stats), default=0)
    subs = result["subscribers_per_symbol"]
    demand = achieved * subs if achieved else None
    # fleet counters, from each relay's cumulative /status
    fleet_counters = None
    if backend == "redis":
        fleet_counters = {
            "batches_received": 0,
            "duplicates_dropped": 0,
            "stale_token_dropped": 0,
            "malformed": 0,
            "published_batches": 0,
            "published_updates": 0,
            "holders": [],
        }
        for name, status in statuses.items():
            f = (status or {}).get("fleet") or {}
            rec, pub = f.get("received") or {}, f.get("published") or {}
            fleet_counters["batches_received"] += rec.get("batches", 0)
            fleet_counters["duplicates_dropped"] += rec.get("duplicates_dropped", 0)
            fleet_counters["stale_token_dropped"] += rec.get("stale_token_dropped", 0)
            fleet_counters["malformed"] += rec.get("malformed", 0)
            fleet_counters["published_batches"] += pub.get("batches", 0)
            fleet_counters["published_updates"] += pub.get("updates", 0)
            if f.get("terms_held"):
                fleet_counters["holders"].append(name)
        if fleet_counters["duplicates_dropped"] or fleet_counters["stale_token_dropped"]:
            notes.append(
                f"fleet dropped {fleet_counters['duplicates_dropped']} duplicate(s) and "
                f"{fleet_counters['stale_token_dropped']} stale-token batch(es): expected 0 on a steady fleet"
            )
        if fleet_counters["holders"] != [holder]:
            notes.append(f"the upstream changed hands during the run: held by {fleet_counters['holders']}")
    if up_conns_max != 1:
        notes.append(f"the upstream saw {up_conns_max} connections at once (expected 1)")
    if bp_skipped:
        notes.append(f"UPSTREAM BACKPRESSURE: {bp_skipped:,} ticks not generated in the window")
    if result["loadgen_saturated"]:
        notes.append(f"LOAD GENERATOR SATURATED ({result['loadgen_cpu_pct']}% CPU): delivered is a lower bound")
    if result["seq_regressions"]:
        notes.append(f"{result['seq_regressions']} seq regressions (repeat or step back) seen by clients")
    if result["disconnected"]:
        notes.append(f"{result['disconnected']} client(s) disconnected by a relay: {result['close_codes']}")
    if result["connected"] < cfg["clients"]:
        notes.append(f"only {result['connected']}/{cfg['clients']} clients connected: {result['connect_failures']}")
    logs = {name: fo.scan_relay_log(out_dir / f"{label}-{name}.log") for name, _, _ in relays}
    for name, summary in logs.items():
        if summary["errors"] or summary["tracebacks"]:
            notes.append(
                f"{name} log: {summary['errors']} ERROR line(s), {summary['tracebacks']} traceback(s): "
                f"{summary['first_problems'][:2]}"
            )
        if not alive[name]:
            notes.append(f"{name} EXITED during the run")
    lat = result["latency_ms"]
    return {
        "config": label,
        "relays": n,
        "backend": backend,
        "clients": cfg["clients"],
        "connected": result["connected"],
        "subscribers_per_symbol": subs,
        "upstream_rate_target": cfg["rate"],
        "upstream_rate_achieved": round(achieved, 1) if achieved else None,
        "upstream_connections_max": up_conns_max,
        "demand_updates_per_s": round(demand, 1) if demand else None,
        "delivered_updates_per_s": result["updates_per_s"],
        "delivered_ratio": round(result["updates_per_s"] / demand, 3) if demand else None,
        "delivered_per_relay": [u["updates_per_s"] for u in result["per_url"]],
        "clients_per_relay": [u["clients"] for u in result["per_url"]],
        "frames_per_s": result["frames_per_s"],
        "latency_ms": lat,
        "staleness_ms": result["staleness_ms"],
        "seq_gaps": result["seq_gaps"],
        "seq_regressions": result["seq_regressions"],
        "disconnected": result["disconnected"],
        "relay_cpu_pct": relay_cpu_sum,
        "relay_cpu_pct_each": relay_cpu_each,
        "redis_cpu_pct": redis_cpu,
        "redis_cpu_source": redis_cpu_source,
        "loadgen_cpu_pct": lg_pct,
        "upstream_cpu_pct": cpu_pct("upstream"),
        "machine_busy_pct": total_busy,
        "irq_cpu_pct": irq,
        "other_cpu_pct": other,
        "cpu_busy_pct": cpu_busy,
        "pinning": {
            "relays": relay_cpu or "any",
            "loadgen": lg_cpu or "any",
            "upstream": up_cpu or "any",
            "redis": "any",
        },
        "holder": holder,
        "fleet_counters": fleet_counters,
        "relay_counters": {
            name: {k: ((s or {}).get("messages") or {}).get(k) for k in ("in", "out", "conflated")}
            for name, s in statuses.items()
        },
        "relay_logs": {name: {k: v for k, v in s.items() if k != "first_problems"} for name, s in logs.items()},
        "prefix": prefix if backend == "redis" else None,
        "run_seconds": round(time.monotonic() - t_run0, 1),
        "notes": notes,
    }


def wait_quiet(limit: float) -> None:
    """Wait up to ``limit`` seconds for the machine to be idle (≤ 15% of a CPU busy); warn if it is not."""
    busy = fo.machine_busy()
    deadline = time.monotonic() + limit
    while busy > 15 and time.monotonic() < deadline:
        busy = fo.machine_busy(2.0)
    if busy > 15:
        print(
            f"[fleet] WARNING: the machine is busy ({busy:.0f}% of a CPU) before the run; the figures will be "
            "disturbed (see 'machine %' and the NOTE lines)",
            file=sys.stderr,
            flush=True,
        )


# ---------------------------------------------------------------------------------------- report
def table(rows: list[dict]) -> str:
    def f(v, digits: int = 0, unit: str = "") -> str:
        return "-" if v is None else f"{v:,.{digits}f}{unit}"

    head = [
        "config",
        "relays",
        "delivered/s",
        "of demand",
        "per relay/s",
        "latency ms p50/p99",
        "relay CPU %",
        "Redis CPU %",
        "loadgen %",
        "upstream %",
        "irq %",
        "other %",
        "dup dropped",
        "upstream conns",
    ]
    lines = []
    for r in rows:
        lat = r["latency_ms"]
        fc = r["fleet_counters"]
        lines.append(
            [
                r["config"],
                str(r["relays"]),
                f(r["delivered_updates_per_s"]),
                f((r["delivered_ratio"] or 0) * 100, 1, "%"),
                " + ".join(f(v) for v in r["delivered_per_relay"]),
                f"{f(lat['p50'], 2)} / {f(lat['p99'], 1)}",
                f(r["relay_cpu_pct"], 0)
                + (
                    " (" + " + ".join(f(v, 0) for v in r["relay_cpu_pct_each"].values()) + ")"
                    if r["relays"] > 1
                    else ""
                ),
                f(r["redis_cpu_pct"], 1),
                f(r["loadgen_cpu_pct"], 0),
                f(r["upstream_cpu_pct"], 0),
                f(r["irq_cpu_pct"], 0),
                f(r["other_cpu_pct"], 0),
                "-" if fc is None else str(fc["duplicates_dropped"]),
                str(r["upstream_connections_max"]),
            ]
        )
    widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(head)]
    out = ["  ".join(h.ljust(w) for h, w in zip(head, widths)), "  ".join("-" * w for w in widths)]
    out += ["  ".join(c.ljust(w) for c, w in zip(line, widths)) for line in lines]
    for r in rows:
        for note in r["notes"]:
            out.append(f"NOTE {r['config']}: {note}")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--preset", choices=sorted(PRESETS), default="default")
    p.add_argument(
        "--fleets",
        default="2,3",
        help="fleet sizes to run with engine.backend=redis (default 2,3; "
        "1 = one relay on Redis, the engine's own cost)",
    )
    p.add_argument("--no-single", action="store_true", help="skip the one-relay engine.backend=memory run")
    p.add_argument("--clients", type=int)
    p.add_argument("--symbols-per-client", type=int)
    p.add_argument("--symbols", type=int)
    p.add_argument("--rate", type=float, help="upstream ticks/s (total, one upstream connection)")
    p.add_argument("--batch", action="store_true", default=None, help="clients use ?batch=1")
    p.add_argument("--warmup", type=float)
    p.add_argument("--seconds", type=float, help="measurement window")
    p.add_argument("--redis-url", default="redis://127.0.0.1:6379/0", help="the fleet's Redis (default: the local one)")
    p.add_argument("--relay-env", action="append", metavar="KEY=VALUE", help="extra environment for every relay")
    p.add_argument("--relay-bin", help="trio-relay executable (default: .venv/bin/trio-relay of this checkout)")
    p.add_argument("--pin", action="store_true", help="relays on CPU 0, load generator and upstream on CPU 1")
    p.add_argument("--sample-period", type=float, default=0.2)
    p.add_argument(
        "--wait-quiet",
        type=float,
        default=0,
        metavar="SECONDS",
        help="before each configuration, wait up to this long for the machine to be idle",
    )
    p.add_argument(
        "--retries",
        type=int,
        default=0,
        metavar="N",
        help="re-run a configuration up to N times while other load disturbed its window (> 10%% of a CPU)",
    )
    p.add_argument("--out", help="output directory (default bench/out/<timestamp>-fleet)")
    args = p.parse_args(argv)

    cfg = dict(PRESETS[args.preset])
    for key in ("clients", "symbols_per_client", "symbols", "rate", "batch", "warmup", "seconds"):
        if getattr(args, key) is not None:
            cfg[key] = getattr(args, key)
            if key not in ("warmup", "seconds"):
                cfg["about"] = "custom"
    fleets = [int(v) for v in args.fleets.split(",") if v.strip()]
    runs = ([] if args.no_single else [(1, "memory")]) + [(n, "redis") for n in fleets]
    redis = Redis(args.redis_url)
    if any(backend == "redis" for _, backend in runs):
        try:
            redis.call("PING")
        except (OSError, RuntimeError) as exc:
            print(f"[fleet] FAILED: Redis at {redis.host}:{redis.port} does not answer ({exc})", file=sys.stderr)
            return 1
    fo.raise_nofile()
    out_dir = Path(args.out) if args.out else BENCH / "out" / f"{time.strftime('%Y%m%d-%H%M%S')}-fleet"
    out_dir.mkdir(parents=True, exist_ok=True)

    def on_signal(signum, _frame):
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_signal)
    t_start = time.monotonic()
    rows = []
    try:
        for n, backend in runs:
            for attempt in range(args.retries + 1):
                wait_quiet(args.wait_quiet)
                row = run_config(n, backend, cfg, args, out_dir, redis)
                row["attempts"] = attempt + 1
                if row["other_cpu_pct"] <= 10 or attempt == args.retries:
                    break
                print(
                    f"[fleet] {row['config']}: {row['other_cpu_pct']:.0f}% of a CPU busy outside the benchmark "
                    f"during the window; re-running ({attempt + 1}/{args.retries})",
                    file=sys.stderr,
                    flush=True,
                )
            rows.append(row)
    except KeyboardInterrupt:
        print("[fleet] interrupted; children stopped", file=sys.stderr)
        return 130
    except RuntimeError as exc:
        print(f"[fleet] FAILED: {exc}", file=sys.stderr)
        return 1
    ncpu = os.cpu_count()
    print(
        f"scenario  {args.preset if cfg['about'] != 'custom' else 'custom'}: {cfg['clients']} clients x {cfg['symbols_per_client']} of {cfg['symbols']} symbols, "
        f"{cfg['rate']:,.0f} ticks/s, {'batch' if cfg['batch'] else 'one frame per update'}, "
        f"window {cfg['seconds']:g}s after {cfg['warmup']:g}s"
    )
    print(
        f"machine   {ncpu} CPUs shared by every relay, Redis, the load generator and the upstream "
        f"({'relays pinned to CPU 0, loadgen + upstream to CPU 1' if args.pin else 'nothing pinned'})"
    )
    print(table(rows))
    result = {
        "benchmark": "fleet",
        "preset": args.preset,
        **{k: cfg[k] for k in ("clients", "symbols_per_client", "symbols", "rate", "batch", "warmup", "seconds")},
        "cpus": ncpu,
        "pinned": args.pin,
        "relay_revision": fo.relay_revision() if not args.relay_bin else None,
        "configs": rows,
        "total_seconds": round(time.monotonic() - t_start, 1),
        "out_dir": str(out_dir),
    }
    print(f"total     {result['total_seconds']:.1f}s, logs in {out_dir}")
    (out_dir / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, separators=(",", ":")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
