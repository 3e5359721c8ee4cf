"""Recordings and their replay: the format round trip, crash damage, timing in virtual time, end to end.

Replay timing runs under ``MockClock(autojump_threshold=0)``: a session's ``receive()`` sleeps
until each recorded batch is due, so the virtual time at which each batch arrives is exactly
its recorded offset divided by the speed.
"""

from __future__ import annotations

import gzip
import logging
from pathlib import Path

import msgspec
import pytest
import trio
import trio.testing
from conftest import FMP_KEY, fmp_sections, make_config

from trio_relay.config import ConfigError
from trio_relay.demo import make as demo_make
from trio_relay.model import BREAK, QUOTE, TRADE, PriceState, Update, wall_ms
from trio_relay.providers.replay import ReplayConfig, ReplayProvider
from trio_relay.recording import (
    FIELDS,
    RawFrame,
    Recorded,
    RecordingError,
    RecordingHeader,
    RecordingWriter,
    load_recording,
    open_recording,
)
from trio_relay.recording.record import RecordSummary, add_record_parser, record, run_record
from trio_relay.testing.fake_fmp import FakeFmpServer

T0 = 1_736_173_800_000
EXACT = 1e-9  # virtual seconds
GUARD = 3600.0  # virtual seconds any one test may take: a replay that never delivers fails, not hangs


@pytest.fixture
def autojump_clock() -> trio.testing.MockClock:
    return trio.testing.MockClock(autojump_threshold=0)


def quote(symbol: str, ts: int, bid: float, ask: float) -> Update:
    return Update(symbol, QUOTE, ts, bid_price=bid, bid_size=100, ask_price=ask, ask_size=200)


def trade(symbol: str, ts: int, price: float, size: float = 10) -> Update:
    return Update(symbol, TRADE, ts, last_price=price, last_size=size)


# Offsets (ms) of the batches and what each holds: AAPL and MSFT interleaved, one MSFT-only batch.
BATCHES: list[tuple[int, list[Update]]] = [
    (0, [quote("AAPL", T0 - 4, 187.1, 187.2), quote("MSFT", T0 - 3, 415.0, 415.3)]),
    (120, [trade("AAPL", T0 + 110, 187.15)]),
    (125, [trade("MSFT", T0 + 121, 415.1, 3)]),
    (900, [quote("AAPL", T0 + 890, 187.12, 187.18), trade("MSFT", T0 + 895, 415.2)]),
    (2000, [trade("AAPL", T0 + 1990, 187.2, 100)]),
    (2001, [quote("MSFT", T0 + 1999, 415.1, 415.4)]),
    (3500, [trade("AAPL", T0 + 3495, 187.25, 7), quote("AAPL", T0 + 3496, 187.2, 187.3)]),
]
SYMBOLS = ["AAPL", "MSFT"]


def write_recording(
    path: Path, batches: list[tuple[int, list[Update]]] = BATCHES, symbols: list[str] = SYMBOLS
) -> Path:
    with RecordingWriter(path, RecordingHeader.new("test", symbols, T0)) as writer:
        for offset, updates in batches:
            writer.write_updates(updates, T0 + offset)
    return path


def flat(batches: list[tuple[int, list[Update]]] = BATCHES) -> list[Recorded]:
    return [Recorded(T0 + offset, u) for offset, updates in batches for u in updates]


async def play(provider: ReplayProvider, symbols: list[str], n: int) -> list[tuple[float, list[Update]]]:
    """The first ``n`` batches of a session subscribed to ``symbols``: (seconds since subscribe, batch)."""
    with trio.fail_after(GUARD):
        return await _play(provider, symbols, n)


async def _play(provider: ReplayProvider, symbols: list[str], n: int) -> list[tuple[float, list[Update]]]:
    async with provider.session() as session:
        await session.subscribe(symbols)
        start = trio.current_time()
        out = []
        for _ in range(n):
            batch = await session.receive()
            out.append((trio.current_time() - start, batch))
        return out


# --------------------------------------------------------------------------- the format


EVERY_FIELD = [
    Update("AAPL", TRADE, T0, last_price=187.123456789, last_size=0.5),
    Update("AAPL", QUOTE, T0 + 1, ask_price=187.2, ask_size=0, bid_price=0.0001, bid_size=1e9),
    Update("AAPL", BREAK, T0 + 2, last_price=187.0, last_size=100),
    Update("BTC/USD", QUOTE, T0 + 3, bid_price=97000.5, bid_size=0.25),  # ask unknown: None
    Update("SPY", TRADE, T0 + 4, 600.0, 1, 600.01, 200, 599.99, 300, True, "fmp", 42, "6745c1a0-9f3b2c"),
    Update("^GSPC", QUOTE, T0 + 5, seq=7),
    Update("EURUSD=X", TRADE, T0 + 6, provider="finnhub"),
]


@pytest.mark.parametrize("name", ["rec.jsonl", "rec.jsonl.gz"])
def test_every_field_round_trips_exactly(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    header = RecordingHeader.new("fmp", ["AAPL", "BTC/USD", "SPY"], T0, raw=True)
    with RecordingWriter(path, header) as writer:
        writer.write_updates(EVERY_FIELD[:3], T0 + 10)
        writer.write_raw(['{"s":"aapl","lp":187.1}', "ünïcödé \n newline"], T0 + 11)
        writer.write_updates(EVERY_FIELD[3:], T0 + 12)
    rec = load_recording(path)
    assert rec.header == header
    assert rec.header.fields == list(FIELDS)
    assert rec.updates == [Recorded(T0 + 10, u) for u in EVERY_FIELD[:3]] + [
        Recorded(T0 + 12, u) for u in EVERY_FIELD[3:]
    ]
    # Every field, with its type: a float stays the same float, a 0 size is not taken for None.
    for got, want in zip(rec.updates, EVERY_FIELD):
        assert msgspec.structs.asdict(got.update) == msgspec.structs.asdict(want)
    assert rec.raw == [RawFrame(T0 + 11, '{"s":"aapl","lp":187.1}'), RawFrame(T0 + 11, "ünïcödé \n newline")]
    assert (rec.corrupt, rec.truncated) == (0, False)


def test_lines_are_compact_arrays_with_trailing_defaults_left_off(tmp_path: Path) -> None:
    path = write_recording(tmp_path / "rec.jsonl")
    lines = path.read_bytes().splitlines()
    header = msgspec.json.decode(lines[0])
    assert header["format"] == "trio-relay-recording" and header["version"] == 1
    assert header["provider"] == "test" and header["symbols"] == SYMBOLS and header["started_at"] == T0
    assert lines[1] == b'[1736173800000,"AAPL","Q",1736173799996,null,null,187.2,200,187.1,100]'
    assert lines[3] == b'[1736173800120,"AAPL","T",1736173800110,187.15,10]'
    assert len(lines) == 1 + len(flat())


def test_an_existing_file_is_not_overwritten_unless_asked(tmp_path: Path) -> None:
    path = write_recording(tmp_path / "rec.jsonl")
    with pytest.raises(FileExistsError):
        RecordingWriter(path, RecordingHeader.new("test", [], T0))
    with RecordingWriter(path, RecordingHeader.new("again", [], T0), overwrite=True):
        pass
    assert load_recording(path).header.provider == "again"


# --------------------------------------------------------------------------- damage


def test_a_file_cut_mid_line_yields_every_complete_line_and_warns(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = write_recording(tmp_path / "rec.jsonl")
    data = path.read_bytes()
    last_line_start = data.rstrip(b"\n").rfind(b"\n") + 1
    path.write_bytes(data[: last_line_start + 17])  # the recorder died inside its last write
    with caplog.at_level(logging.WARNING, logger="trio_relay.recording"):
        rec = load_recording(path)
    assert rec.updates == flat()[:-1]
    assert rec.truncated and rec.corrupt == 0
    assert "final partial line" in caplog.text


def test_a_final_line_without_its_newline_but_complete_is_kept(tmp_path: Path) -> None:
    path = write_recording(tmp_path / "rec.jsonl")
    path.write_bytes(path.read_bytes().rstrip(b"\n"))
    rec = load_recording(path)
    assert rec.updates == flat() and not rec.truncated


def test_corrupt_lines_in_the_middle_are_counted_and_skipped(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = write_recording(tmp_path / "rec.jsonl")
    lines = path.read_bytes().splitlines(keepends=True)
    damaged = lines[:3] + [b'[1736173800120,"AAPL","T",17361\n', b"\x00\x00garbage\n", b"[1,2,3]\n", b"\n"] + lines[3:]
    path.write_bytes(b"".join(damaged))
    with caplog.at_level(logging.WARNING, logger="trio_relay.recording"):
        rec = load_recording(path)
    assert rec.updates == flat()
    assert rec.corrupt == 3 and not rec.truncated
    assert caplog.text.count("corrupt line") == 3


def test_not_a_recording(tmp_path: Path) -> None:
    empty = tmp_path / "empty.jsonl"
    empty.write_bytes(b"")
    other = tmp_path / "other.jsonl"
    other.write_bytes(b'{"hello":"world"}\n[1,"AAPL","T",1]\n')
    newer = tmp_path / "newer.jsonl"
    newer.write_bytes(b'{"format":"trio-relay-recording","version":2}\n')
    for path, message in [(empty, "empty file"), (other, "no trio-relay recording header"), (newer, "version 2")]:
        with pytest.raises(RecordingError, match=message):
            load_recording(path)


def test_gzip_files_are_read_whole_and_concatenated(tmp_path: Path) -> None:
    plain = write_recording(tmp_path / "rec.jsonl").read_bytes()
    # gzip(1)'s output, and two members one after the other (`cat a.gz b.gz`).
    (tmp_path / "tool.jsonl.gz").write_bytes(gzip.compress(plain))
    head, tail = plain.split(b"\n", 4)[:4], plain.split(b"\n", 4)[4]
    members = gzip.compress(b"\n".join(head) + b"\n") + gzip.compress(tail)
    (tmp_path / "members.gz").write_bytes(members)
    for name in ("tool.jsonl.gz", "members.gz"):
        rec = load_recording(tmp_path / name)
        assert rec.updates == flat() and (rec.corrupt, rec.truncated) == (0, False)


def test_a_gzip_recording_cut_short_reads_up_to_its_last_sync(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "rec.jsonl.gz"
    writer = RecordingWriter(path, RecordingHeader.new("test", SYMBOLS, T0))
    for offset, updates in BATCHES[:4]:
        writer.write_updates(updates, T0 + offset)
    writer.sync()
    synced = path.read_bytes()  # what a crash right now would leave: no gzip trailer
    for offset, updates in BATCHES[4:]:
        writer.write_updates(updates, T0 + offset)
    writer.close()
    expected = flat(BATCHES[:4])
    crashed = tmp_path / "crashed.jsonl.gz"
    crashed.write_bytes(synced)
    with caplog.at_level(logging.WARNING, logger="trio_relay.recording"):
        rec = load_recording(crashed)
    assert rec.updates == expected and rec.truncated
    assert "ends early" in caplog.text
    # Cut anywhere in the compressed bytes: never an exception, always a prefix of the updates.
    full = flat()
    for cut in range(10, len(path.read_bytes()), 7):
        crashed.write_bytes(path.read_bytes()[:cut])
        try:
            got = load_recording(crashed).updates
        except RecordingError:
            assert cut < 200  # not even the header decompressed yet
            continue
        assert got == full[: len(got)]


# --------------------------------------------------------------------------- the demo


def test_the_demo_recording_is_shipped_small_and_rebuildable(tmp_path: Path) -> None:
    rec = load_recording("demo")
    assert rec.header.provider == "sim"
    assert rec.header.symbols == list(demo_make.SYMBOLS)
    assert {r.update.symbol for r in rec.updates} == set(demo_make.SYMBOLS)
    assert (rec.corrupt, rec.truncated) == (0, False)
    span = (rec.updates[-1].t - rec.updates[0].t) / 1000
    assert 55 < span <= 60
    assert 2 < len(rec.updates) / span / len(demo_make.SYMBOLS) < 5  # a few updates/s per symbol
    with open_recording("demo") as reader:
        assert reader.path.stat().st_size < 300_000
        shipped = gzip.decompress(reader.path.read_bytes())
    n = demo_make.build(tmp_path / "demo.jsonl.gz")
    assert n == len(rec.updates)
    assert gzip.decompress((tmp_path / "demo.jsonl.gz").read_bytes()) == shipped


# --------------------------------------------------------------------------- replay timing


def provider_for(path: Path, speed: float = 1.0, loop: bool = False, retime: bool = False) -> ReplayProvider:
    """Fidelity tests compare recorded timestamps: re-timing (the default in a relay) is off here."""
    return ReplayProvider(ReplayConfig(file=str(path), speed=speed, loop=loop, retime=retime))


@pytest.mark.parametrize("speed", [1.0, 10.0])
async def test_replay_delivers_the_recorded_batches_at_the_recorded_gaps_over_speed(autojump_clock, tmp_path, speed):
    provider = provider_for(write_recording(tmp_path / "rec.jsonl"), speed)
    assert provider.describe() == f"replay of {tmp_path / 'rec.jsonl'} at {speed:g}x (recorded timestamps)"
    got = await play(provider, SYMBOLS, len(BATCHES))
    assert [batch for _, batch in got] == [updates for _, updates in BATCHES]
    assert [at for at, _ in got] == pytest.approx([offset / 1000 / speed for offset, _ in BATCHES], abs=EXACT)


async def test_the_clock_starts_at_the_first_subscribe(autojump_clock, tmp_path):
    provider = provider_for(write_recording(tmp_path / "rec.jsonl"))
    with trio.fail_after(GUARD):
        await _first_batch_after_a_wait(provider)


async def _first_batch_after_a_wait(provider: ReplayProvider) -> None:
    async with provider.session() as session:
        await trio.sleep(30.0)  # virtual time (MockClock): connected, nothing subscribed yet
        await session.subscribe(["AAPL"])
        subscribed_at = trio.current_time()
        assert await session.receive() == [BATCHES[0][1][0]]
        assert trio.current_time() == subscribed_at


async def test_only_subscribed_symbols_are_replayed_while_time_runs_on(autojump_clock, tmp_path):
    provider = provider_for(write_recording(tmp_path / "rec.jsonl"))
    with trio.fail_after(GUARD):
        await _filtered(provider)


async def _filtered(provider: ReplayProvider) -> None:
    async with provider.session() as session:
        await session.subscribe(["AAPL"])
        start = trio.current_time()

        async def next_batch() -> tuple[float, list[Update]]:
            batch = await session.receive()
            return round(trio.current_time() - start, 6), batch

        assert await next_batch() == (0.0, [BATCHES[0][1][0]])
        assert await next_batch() == (0.12, BATCHES[1][1])
        # MSFT's own batch (0.125 s) is skipped; the next one with AAPL comes at its own time.
        assert await next_batch() == (0.9, [BATCHES[3][1][0]])
        await session.subscribe(["MSFT"])
        await session.unsubscribe(["AAPL"])
        assert await next_batch() == (2.001, BATCHES[5][1])  # AAPL's batch at 2.0 s is skipped
        await session.subscribe(["AAPL"])
        assert await next_batch() == (3.5, BATCHES[6][1])


async def test_replay_ends_idle_and_says_so_once(autojump_clock, tmp_path, caplog):
    provider = provider_for(write_recording(tmp_path / "rec.jsonl"))
    caplog.set_level(logging.INFO, logger="trio_relay.providers.replay")
    async with provider.session() as session:
        await session.subscribe(SYMBOLS)
        with trio.fail_after(GUARD):
            for _ in BATCHES:
                await session.receive()
        for _ in range(2):
            with trio.move_on_after(3600.0) as idle:
                await session.receive()
            assert idle.cancelled_caught  # connected, nothing more to say
    assert caplog.text.count("[REPLAY] end of recording") == 1


async def test_loop_replays_again_with_times_shifted_forward(autojump_clock, tmp_path):
    batches = [
        (0, [quote("AAPL", T0 - 5, 1.0, 1.1)]),
        (100, [trade("AAPL", T0 + 95, 1.05)]),
        (400, [Update("AAPL", TRADE, T0 + 395, 1.06, 5, seq=9, epoch="feed-1")]),
    ]
    provider = provider_for(write_recording(tmp_path / "rec.jsonl", batches, ["AAPL"]), speed=10.0, loop=True)
    assert provider.describe().endswith("at 10x, looping (recorded timestamps)")
    got = await play(provider, ["AAPL"], 3 * len(batches))
    # Period: the 400 ms span plus one average gap (200 ms) = 600 ms, at 10x = 60 ms.
    period = 600
    expected_at = [(k * period + offset) / 1000 / 10 for k in range(3) for offset, _ in batches]
    assert [at for at, _ in got] == pytest.approx(expected_at, abs=EXACT)
    first = [u for _, b in got[:3] for u in b]
    assert first == [u for _, us in batches for u in us]  # the first pass exactly as recorded
    for k in (1, 2):
        again = [u for _, b in got[3 * k : 3 * k + 3] for u in b]
        # Shifted timestamps; a relay's numbering is not replayed backwards.
        assert again == [
            msgspec.structs.replace(u, timestamp=u.timestamp + k * period, seq=0, epoch=None)
            for _, us in batches
            for u in us
        ]
    stamps = [u.timestamp for _, b in got for u in b]
    assert stamps == sorted(stamps) and len(set(stamps)) == len(stamps)


async def test_a_missing_or_bad_file_is_a_config_error_naming_the_key(tmp_path):
    with pytest.raises(ConfigError, match=r"replay\.file: file not found"):
        provider_for(tmp_path / "nope.jsonl")
    (tmp_path / "bad.jsonl").write_text("hello\n")
    with pytest.raises(ConfigError, match=r"replay\.file: .*not a recording"):
        provider_for(tmp_path / "bad.jsonl")


# --------------------------------------------------------------------------- record()


@pytest.mark.parametrize("name", ["sim.jsonl", "sim.jsonl.gz"])
async def test_record_from_sim_then_replay_gives_the_same_updates_at_the_same_times(autojump_clock, tmp_path, name):
    config = make_config(sim={"rate": 10.0})
    out = tmp_path / name
    with trio.fail_after(GUARD):
        summary = await record(config, ["AAPL", "MSFT", "AAPL"], out, duration=5.0)
    rec = load_recording(out)
    assert rec.header.provider == "sim" and rec.header.symbols == ["AAPL", "MSFT"] and not rec.header.raw
    assert (rec.corrupt, rec.truncated) == (0, False)
    assert len(rec.updates) == summary.updates == summary.per_symbol["AAPL"] + summary.per_symbol["MSFT"]
    assert summary.per_symbol["AAPL"] > 20 and summary.per_symbol["MSFT"] > 20  # 10/s each for 5 virtual s
    times = [r.t for r in rec.updates]
    assert times == sorted(times)
    assert rec.header.started_at <= times[0] and times[-1] - rec.header.started_at <= 5000
    assert summary.bytes == out.stat().st_size and "recorded" in summary.describe()

    # Played back: the same updates, in the same order, at the recorded gaps.
    groups: list[tuple[int, list[Update]]] = []
    for r in rec.updates:
        if groups and groups[-1][0] == r.t:
            groups[-1][1].append(r.update)
        else:
            groups.append((r.t, [r.update]))
    got = await play(provider_for(out), ["AAPL", "MSFT"], len(groups))
    assert [batch for _, batch in got] == [batch for _, batch in groups]
    assert [at for at, _ in got] == pytest.approx([(t - groups[0][0]) / 1000 for t, _ in groups], abs=EXACT)


async def test_record_stops_cleanly_when_asked(autojump_clock, tmp_path):
    stop = trio.Event()
    with trio.fail_after(GUARD):
        summary = await _record_until_stopped(tmp_path / "r.jsonl", stop)
    assert len(load_recording(tmp_path / "r.jsonl").updates) == summary.updates >= 10


async def _record_until_stopped(out: Path, stop: trio.Event) -> RecordSummary:
    async with trio.open_nursery() as nursery:
        summary = await nursery.start(
            lambda task_status: record(make_config(), ["SPY"], out, stop=stop, task_status=task_status)
        )
        while summary.updates < 10:
            await trio.sleep(0.1)  # virtual time (MockClock)
        stop.set()
    return summary


async def test_raw_frames_need_a_network_provider(tmp_path):
    with pytest.raises(RecordingError, match="raw recording needs a network provider"):
        await record(make_config(), ["AAPL"], tmp_path / "r.jsonl", raw=True)
    assert not (tmp_path / "r.jsonl").exists()


async def test_record_raw_frames_from_fmp(autojump_clock, tmp_path):
    with trio.fail_after(GUARD):
        summary = await _record_fake_fmp(tmp_path)
    rec = load_recording(tmp_path / "raw.jsonl")
    assert rec.header.raw and rec.header.provider == "fmp"
    assert summary.raw_frames == len(rec.raw) > 0 and summary.updates == len(rec.updates) > 10
    with open_recording(tmp_path / "raw.jsonl") as reader:
        entries = list(reader)
    first_update = next(i for i, e in enumerate(entries) if isinstance(e, Recorded))
    assert any(isinstance(e, RawFrame) and '"AAPL"' in e.frame.upper() for e in entries[:first_update])


async def _record_fake_fmp(tmp_path: Path) -> RecordSummary:
    async with FakeFmpServer.open(api_keys=[FMP_KEY], rate=20.0, heartbeat_interval=1.0) as fake:
        config = make_config(**fmp_sections(fake))
        return await record(config, ["AAPL"], tmp_path / "raw.jsonl", raw=True, duration=3.0)


def test_record_command_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import argparse

    parser = argparse.ArgumentParser(prog="trio-relay")
    add_record_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(
        ["record", "--provider", "sim", "--symbols", "AAPL,MSFT", "--out", str(tmp_path / "x.jsonl")]
    )
    assert (args.command, args.provider, args.symbols, args.raw, args.duration) == (
        "record",
        "sim",
        "AAPL,MSFT",
        False,
        None,
    )
    write_recording(tmp_path / "x.jsonl")
    assert run_record(args) == 2
    assert "exists (use --force" in capsys.readouterr().err
    args = parser.parse_args(["record", "--symbols", "AAPL", "--out", str(tmp_path / "y.jsonl"), "--duration", "-1"])
    assert run_record(args) == 2


# --------------------------------------------------------------------------- end to end


def expected_states(updates: list[Update]) -> list[dict[str, object]]:
    """What a client must see for these updates of one symbol: the merged state after each."""
    state = PriceState(symbol=updates[0].symbol)
    out = []
    for u in updates:
        state.apply(u, "")
        out.append(
            {
                k: getattr(state, k)
                for k in ("timestamp", "data_type", "last_price", "last_size", "bid_price", "bid_size")
            }
            | {"ask_price": state.ask_price, "ask_size": state.ask_size}
        )
    return out


async def test_a_client_of_a_replaying_relay_gets_exactly_the_recorded_prices(start_relay, ws_connect, tmp_path):
    path = write_recording(tmp_path / "rec.jsonl")
    relay = await start_relay(
        upstream={"provider": "replay"}, replay={"file": str(path), "speed": 100, "retime": False}
    )
    assert relay.upstream.provider.describe() == f"replay of {path} at 100x (recorded timestamps)"
    client = await ws_connect(relay)
    aapl = [u for _, updates in BATCHES for u in updates if u.symbol == "AAPL"]
    with trio.fail_after(10):
        await client.request({"action": "subscribe", "symbols": ["AAPL"]}, "subscribed")
        got = []
        while len(got) < len(aapl):
            msg = await client.recv()
            if msg.get("type") == "price_update":
                got.append(msg)
    assert {m["symbol"] for m in got} == {"AAPL"}
    assert {m["provider"] for m in got} == {"replay"}
    fields = expected_states(aapl)[0].keys()
    assert [{k: m[k] for k in fields} for m in got] == expected_states(aapl)
    assert [m["seq"] for m in got] == list(range(got[0]["seq"], got[0]["seq"] + len(aapl)))


async def test_the_demo_plays_through_the_relay(start_relay, ws_connect):
    """Re-timed (the default): stamped from the moment it plays, at the recorded gaps / speed."""
    relay = await start_relay(upstream={"provider": "replay"}, replay={"speed": 1000})
    assert "demo (sim-demo.jsonl.gz)" in relay.upstream.provider.describe()
    assert "re-timed to now" in relay.upstream.provider.describe()
    before = wall_ms()
    client = await ws_connect(relay)
    btc = [r.update for r in load_recording("demo").updates if r.update.symbol == "BTCUSD"]
    with trio.fail_after(10):
        await client.request({"action": "subscribe", "symbols": ["BTCUSD"]}, "subscribed")
        got = []
        while len(got) < len(btc):
            msg = await client.recv()
            if msg.get("type") == "price_update":
                got.append(msg)
    after = wall_ms()
    first = load_recording("demo").updates[0].update.timestamp  # playback starts at the recording's first update
    start = got[0]["timestamp"] - round((btc[0].timestamp - first) / 1000)
    assert before <= start <= after
    assert [m["timestamp"] for m in got] == [start + round((u.timestamp - first) / 1000) for u in btc]


async def test_retimed_replay_lands_now_in_the_tick_history(start_relay, ws_connect, http, tmp_path):
    """Replayed ticks are stored at the time they were played (and as provider "replay"), not in 2025."""
    data = tmp_path / "data"
    relay = await start_relay(
        upstream={"provider": "replay"}, replay={"speed": 100}, history={"backend": "sqlite", "data_dir": str(data)}
    )
    client = await ws_connect(relay)
    before = wall_ms()
    with trio.fail_after(10):
        await client.request({"action": "subscribe", "symbols": ["AAPL"]}, "subscribed")
        await client.recv_until(lambda m: m.get("type") == "price_update")
        while True:
            body = (await http.get(f"{relay.http_url}/api/v2/realtime/history/AAPL?start=-1m")).json()
            if body["ticks"]:
                break
            assert relay.history_writer is not None
            await relay.history_writer.changed()  # its next write, not a timer
    tick = body["ticks"][0]
    assert before - 1000 <= tick["timestamp"] <= wall_ms() + 60_000 and tick["provider"] == "replay"


async def test_replay_can_keep_the_recorded_timestamps(start_relay, ws_connect):
    relay = await start_relay(upstream={"provider": "replay"}, replay={"speed": 1000, "retime": False})
    assert "recorded timestamps" in relay.upstream.provider.describe()
    client = await ws_connect(relay)
    btc = [r.update for r in load_recording("demo").updates if r.update.symbol == "BTCUSD"]
    with trio.fail_after(10):
        await client.request({"action": "subscribe", "symbols": ["BTCUSD"]}, "subscribed")
        got = []
        while len(got) < 5:
            msg = await client.recv()
            if msg.get("type") == "price_update":
                got.append(msg)
    assert [m["timestamp"] for m in got] == [u.timestamp for u in btc[:5]]
