// The official JavaScript client (trio_relay/web/client/relay-client.js) against a real relay.
// Run: node --experimental-websocket --test tests/js/   (tests/test_js_client.py does, in `make test`)
import assert from "node:assert/strict";
import { after, before, describe, test } from "node:test";

import { LIVE, RECONNECTING, RelayClient, endpoints } from "../../trio_relay/web/client/relay-client.js";
import { NodeEventSource, contiguous, startBlockingProxy, startRelay, waitFor } from "./support.mjs";

/** A client and everything it reported. */
function open(url, options = {}, on = {}) {
  const seen = { updates: [], raw: [], messages: [], states: [] };
  const client = new RelayClient(
    url,
    {
      update: (price, raw) => {
        seen.updates.push(price);
        seen.raw.push(raw);
      },
      message: (msg) => seen.messages.push(msg),
      state: () => seen.states.push(`${client.state}/${client.transport}`),
      ...on,
    },
    { EventSource: NodeEventSource, backoffInitialMs: 50, ...options },
  );
  return { client, seen };
}

const acks = (seen) => seen.messages.filter((m) => m.type === "subscribed");
const seqsOf = (seen, symbol) => seen.raw.filter((m) => m.symbol === symbol).map((m) => m.seq);

describe("the JavaScript client against a real relay", () => {
  let relay;
  before(async () => {
    relay = await startRelay({ TRIO_RELAY_SIM_RATE: "100", TRIO_RELAY_UPSTREAM_PINNED: "AAPL,MSFT" });
  });
  after(async () => {
    await relay?.stop();
  });

  test("endpoints from a base URL or either endpoint", () => {
    assert.deepEqual(endpoints("https://h:1/pre/"), {
      ws: "wss://h:1/pre/api/v2/realtime/ws/prices",
      sse: "https://h:1/pre/api/v2/realtime/sse/prices",
      batch: false,
      browser: null,
    });
    assert.equal(endpoints("ws://h/api/v2/realtime/ws/prices?batch=1").batch, true);
    assert.equal(endpoints("ws://h/api/v2/realtime/ws/prices?batch=1&browser=b-0123456789abcdef").browser, "b-0123456789abcdef");
    assert.equal(endpoints("http://h/api/v2/realtime/sse/prices").ws, "ws://h/api/v2/realtime/ws/prices");
  });

  for (const transport of ["websocket", "sse"]) {
    test(`${transport}: prices, then a resume without a gap or a repeat after the connection drops`, async () => {
      const { client, seen } = open(relay.url, { transport });
      client.add(["AAPL"]);
      client.start();
      try {
        await waitFor(() => seqsOf(seen, "AAPL").length >= 5, 10000, "five prices");
        assert.equal(client.state, LIVE);
        assert.equal(client.transport, transport);
        client.reconnectNow(); // a new connection, resuming from the last seq
        const before = seqsOf(seen, "AAPL").length;
        await waitFor(() => seqsOf(seen, "AAPL").length >= before + 10, 10000, "ten more prices");
        const resumed = acks(seen).at(-1);
        assert.equal(resumed.recovered, true);
        assert.ok(contiguous(seqsOf(seen, "AAPL")), `gap or repeat in ${seqsOf(seen, "AAPL")}`);
      } finally {
        client.stop();
      }
    });

    test(`${transport}: fields and delta, merged back into full prices`, async () => {
      const { client, seen } = open(relay.url, { transport });
      client.add(["MSFT"], { fields: ["last_price", "bid_price", "ask_price"], delta: true });
      client.start();
      try {
        await waitFor(() => seen.raw.filter((m) => m.delta).length >= 5, 10000, "five deltas");
        assert.equal(seen.raw[0].delta, undefined); // the first one is full
        for (const raw of seen.raw) {
          for (const key of Object.keys(raw)) {
            assert.ok(["type", "symbol", "seq", "epoch", "last_price", "bid_price", "ask_price", "delta"].includes(key), key);
          }
        }
        const price = client.prices.get("MSFT");
        assert.ok(price && "bid_price" in price && "ask_price" in price && "last_price" in price && !("delta" in price));
      } finally {
        client.stop();
      }
    });
  }

  test("maxRate: at most that many updates a second, the latest state", async () => {
    const { client, seen } = open(relay.url);
    client.add(["AAPL"], { maxRate: 2 });
    client.start();
    try {
      await waitFor(() => seen.updates.length >= 1, 10000, "a first price");
      const start = Date.now();
      const first = seen.updates.length;
      await new Promise((resolve) => setTimeout(resolve, 2000)); // measuring a rate takes time
      const received = seen.updates.length - first;
      assert.ok(received >= 2 && received <= 5, `${received} updates in ${Date.now() - start} ms at max_rate 2`);
    } finally {
      client.stop();
    }
  });

  test("changing options by subscribing again; list shows them", async () => {
    const { client, seen } = open(relay.url);
    client.add(["AAPL"]);
    client.start();
    try {
      await waitFor(() => seen.updates.length >= 2, 10000, "prices");
      client.add(["AAPL"], { fields: ["last_price"] });
      await waitFor(() => acks(seen).some((a) => a.options), 10000, "an ack with options");
      client._send({ action: "list" });
      const listing = await waitFor(() => seen.messages.find((m) => m.type === "subscriptions"), 10000, "list");
      assert.deepEqual(listing.options, { AAPL: { fields: ["symbol", "last_price", "seq", "epoch"] } });
    } finally {
      client.stop();
    }
  });

  test("falls back to SSE behind a proxy that blocks WebSockets, and resumes there", async () => {
    const proxy = await startBlockingProxy(relay.url);
    const { client, seen } = open(proxy.url, { sseAfterFailures: 2 });
    client.add(["AAPL"]);
    client.start();
    try {
      await waitFor(() => client.transport === "sse" && seqsOf(seen, "AAPL").length >= 5, 15000, "prices over SSE");
      assert.ok(seen.states.includes(`${RECONNECTING}/sse`));
      const before = seqsOf(seen, "AAPL").length;
      proxy.cut(); // the network drops the stream: the EventSource reconnects with Last-Event-ID
      await waitFor(() => seqsOf(seen, "AAPL").length >= before + 10, 15000, "prices after the cut");
      assert.ok(client.streams[0].reconnects >= 1);
      assert.ok(contiguous(seqsOf(seen, "AAPL")), `gap or repeat in ${seqsOf(seen, "AAPL")}`);
    } finally {
      client.stop();
      await proxy.close();
    }
  });

  test("after a fallback to SSE, back to the WebSocket once it passes again", async () => {
    const proxy = await startBlockingProxy(relay.url);
    const { client, seen } = open(proxy.url, { sseAfterFailures: 1, wsProbeMs: 100 });
    client.add(["AAPL"]);
    client.start();
    try {
      await waitFor(() => client.transport === "sse" && seqsOf(seen, "AAPL").length >= 3, 15000, "prices over SSE");
      proxy.blocking = false; // the proxy (or the relay, back from a restart) lets WebSockets through
      await waitFor(() => client.transport === "websocket" && client.ws, 15000, "the WebSocket again");
      const before = seqsOf(seen, "AAPL").length;
      await waitFor(() => seqsOf(seen, "AAPL").length >= before + 5, 15000, "prices over the WebSocket");
      assert.equal(client.streams.length, 0);
      assert.ok(contiguous(seqsOf(seen, "AAPL")), `gap or repeat in ${seqsOf(seen, "AAPL")}`);
      assert.equal(client._ready(), true); // alerts and pings are reachable again
    } finally {
      client.stop();
      await proxy.close();
    }
  });

  test("a subscribe refused for its options is an error callback, the connection stays", async () => {
    const errors = [];
    const { client, seen } = open(relay.url, {}, { error: (e) => errors.push(e) });
    client.add(["AAPL"], { maxRate: 1000 });
    client.start();
    try {
      await waitFor(() => errors.length, 10000, "the error");
      assert.equal(errors[0].code, "invalid_max_rate");
      client.add(["AAPL"], { maxRate: 5 });
      await waitFor(() => seen.updates.length >= 1, 10000, "a price");
    } finally {
      client.stop();
    }
  });
});
