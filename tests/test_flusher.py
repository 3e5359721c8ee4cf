"""The single writer loop (hub/flusher.py): one task writes every plain-socket client's frames.

What must hold: a client whose socket is full is skipped and its task writes the rest whole (no
torn or interleaved frame, even with a pong in between), the others keep getting theirs, and a
client's frames go out in order, seq by seq, after it reads again.
"""

from __future__ import annotations

import json
import socket
from typing import Any

import trio
import wsproto
import wsproto.events as wse

from trio_relay.api import WS_PATH
from trio_relay.hub import Outbox
from trio_relay.hub.flusher import Flusher

SYMBOLS = [f"S{i:02d}" for i in range(20)]
SUBSCRIBE = json.dumps({"action": "subscribe", "symbols": SYMBOLS})


class RawClient:
    """A real WebSocket client (wsproto on a socket) with a small receive buffer it reads only when told."""

    def __init__(self, stream: trio.SocketStream, conn: wsproto.WSConnection) -> None:
        self.stream = stream
        self.conn = conn
        self.messages: list[dict[str, Any]] = []
        self.pongs = 0
        self._parts: list[str] = []

    @classmethod
    async def connect(cls, port: int, query: str = "") -> RawClient:
        sock = trio.socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        await sock.connect(("127.0.0.1", port))
        stream = trio.SocketStream(sock)
        conn = wsproto.WSConnection(wsproto.ConnectionType.CLIENT)
        await stream.send_all(conn.send(wse.Request(host=f"127.0.0.1:{port}", target=WS_PATH + query)))
        client = cls(stream, conn)
        while True:
            conn.receive_data(await stream.receive_some(4096))
            if any(isinstance(e, wse.AcceptConnection) for e in conn.events()):
                return client

    async def send(self, text: str) -> None:
        await self.stream.send_all(self.conn.send(wse.Message(data=text)))

    async def ping(self) -> None:
        await self.stream.send_all(self.conn.send(wse.Ping(b"are-you-there")))

    async def read_some(self) -> None:
        """Read one chunk; wsproto raises on any torn or interleaved frame."""
        self.conn.receive_data(await self.stream.receive_some(65536))
        for event in self.conn.events():
            if isinstance(event, wse.Pong):
                self.pongs += 1
            elif isinstance(event, wse.TextMessage):
                self._parts.append(event.data)
                if event.message_finished:
                    message = json.loads("".join(self._parts))
                    self._parts.clear()
                    self.messages.extend(message if isinstance(message, list) else [message])


def check_in_seq_order(messages: list[dict[str, Any]]) -> int:
    """Every symbol's seqs strictly increase (conflation may skip some, never reorder); the count."""
    last: dict[str, int] = {}
    count = 0
    for m in messages:
        if m.get("type") == "price_update":
            assert m["seq"] > last.get(m["symbol"], 0), m
            last[m["symbol"]] = m["seq"]
            count += 1
    return count


async def test_a_paused_reader_gets_whole_frames_in_order_and_its_pong_and_others_keep_flowing(
    start_relay, http
) -> None:
    relay = await start_relay(sim={"rate": 2000.0}, clients={"outbox_size": 64, "stall_timeout": 30.0})
    paused = await RawClient.connect(relay.port)
    steady = await RawClient.connect(relay.port, "?batch=1")
    await paused.send(SUBSCRIBE)
    await steady.send(SUBSCRIBE)
    hub = relay.hub
    with trio.fail_after(30):
        # Each ack is queued after the hub applied the subscribe: both are in place once read.
        for client in (paused, steady):
            while not any(m.get("type") == "subscribed" for m in client.messages):
                await client.read_some()
        stuck = next(c for c in hub.clients.values() if not c.batch)
        # The paused client's socket fills: the flusher's last write left a rest for its task,
        # and its outbox, skipped since, fills and conflates.
        while not stuck.outbox.conflating:
            await steady.read_some()
        await paused.ping()  # the reader's pong must wait for the rest, never cut a frame
        before = check_in_seq_order(steady.messages)
        for _ in range(20):
            await steady.read_some()
        assert check_in_seq_order(steady.messages) > before, "the steady client stalled behind the paused one"
        # Reading again: everything arrives whole, in order, the pong among it.
        while paused.pongs == 0 or check_in_seq_order(paused.messages) < 200:
            await paused.read_some()
    assert paused.messages[0]["type"] == "subscribed"
    assert stuck.outbox.conflated > 0
    metrics = (await http.get(f"{relay.http_url}/metrics")).text
    counters = {
        line.split()[0]: float(line.split()[1]) for line in metrics.splitlines() if line.startswith("trio_relay_flush_")
    }
    assert counters["trio_relay_flush_writes_total"] >= counters["trio_relay_flush_deferred_total"] >= 1
    assert counters["trio_relay_flush_rounds_total"] >= 1
    await paused.stream.aclose()
    await steady.stream.aclose()


class RecordingSink:
    """A sink that is not a socket: records what the flusher gives it, busy when told."""

    def __init__(self) -> None:
        self.busy = False
        self.writes: list[list[bytes]] = []

    def ready(self) -> bool:
        return not self.busy

    def write_now(self, frames: list[bytes]) -> bool:
        self.writes.append(frames)
        return True


async def test_the_flusher_skips_a_busy_sink_until_poked_and_marks_each_outbox_once_per_round() -> None:
    flusher = Flusher()
    outbox = Outbox(16)
    sink = RecordingSink()
    outbox.direct(sink, flusher.mark)
    outbox.put("A", b"1")
    outbox.put("B", b"2")
    assert outbox.dirty
    sink.busy = True
    flusher.flush()
    assert sink.writes == [] and len(outbox) == 2 and not outbox.dirty
    outbox.put("C", b"3")  # marked again by the next put...
    sink.busy = False
    flusher.flush()
    assert sink.writes == [[b"1", b"2", b"3"]] and outbox.idle
    outbox.put("D", b"4")
    sink.busy = True
    flusher.flush()
    sink.busy = False
    outbox.poke()  # ...or by the sink once it is free
    flusher.flush()
    assert sink.writes[-1] == [b"4"]
    flusher.flush()  # nothing marked: nothing written
    assert len(sink.writes) == 2
    outbox.put("E", b"5")
    outbox.stop()
    flusher.flush()  # a stopped outbox is never written by the flusher
    assert len(sink.writes) == 2


async def test_switching_to_batch_and_back_keeps_every_pending_update_in_order() -> None:
    from trio_relay.config import ClientsConfig
    from trio_relay.hub import Demand, Hub, Stats
    from trio_relay.model import Update, ws_payload

    async with Hub.open(ClientsConfig(outbox_size=64), Demand(linger=0.0), Stats()) as hub:
        client = hub.connect()
        hub.subscribe(client, ["A", "B"])
        for i in range(5):
            hub.publish(Update("A" if i % 2 else "B", "T", 1_700_000_000_000 + i, last_price=100.0 + i, last_size=1))
        hub.set_batch(client, True)  # the pending frames become payloads
        hub.publish(Update("A", "T", 1_700_000_000_010, last_price=110.0, last_size=1))  # routed as a payload
        entries = await client.outbox.get()
        batched = [json.loads(e) for e in entries]
        assert [m["type"] for m in batched] == ["subscribed"] + ["price_update"] * 6
        assert [m["last_price"] for m in batched[1:]] == [100.0, 101.0, 102.0, 103.0, 104.0, 110.0]
        hub.publish(Update("B", "T", 1_700_000_000_011, last_price=111.0, last_size=1))
        hub.set_batch(client, False)  # and back: the pending payload is a frame again
        hub.publish(Update("A", "T", 1_700_000_000_012, last_price=112.0, last_size=1))
        frames = await client.outbox.get()
        assert [json.loads(ws_payload(f))["last_price"] for f in frames] == [111.0, 112.0]
        assert hub.subscriber_count("A") == 1


async def test_an_accepted_price_socket_keeps_no_handshake_state(start_relay) -> None:
    """A price socket lives for hours: the edge's HTTP parser and wsproto's handshake must not."""
    import gc

    import h11

    relay = await start_relay()
    clients = [await RawClient.connect(relay.port) for _ in range(20)]
    for client in clients:
        await client.send(json.dumps({"action": "ping"}))
    with trio.fail_after(10):
        for client in clients:  # a pong back: the connection is accepted and served
            while not client.messages:
                await client.read_some()
    assert len(relay.hub.clients) == 20
    gc.collect()
    servers = [o for o in gc.get_objects() if isinstance(o, h11.Connection) and o.our_role is h11.SERVER]
    handshakes = [o for o in gc.get_objects() if isinstance(o, wsproto.WSConnection) and not o.client]
    assert len(servers) < 5 and len(handshakes) < 5, (len(servers), len(handshakes))
    for client in clients:
        await client.stream.aclose()
