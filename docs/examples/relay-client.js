// A browser client of trio-relay, as a plain ES module (no dependencies, no build step).
//
//   <script type="module">
//     import { RelayClient } from "./relay-client.js";
//     const relay = new RelayClient("ws://127.0.0.1:8000/api/v2/realtime/ws/prices", {
//       symbols: ["AAPL", "MSFT"],
//       onPrice: (p) => console.log(p.symbol, p.last_price, p.bid_price, p.ask_price),
//     });
//     relay.start();
//   </script>
//
// What it does for you:
// - subscribes on every (re)connect, and resumes: it sends the last `seq` it saw of each symbol
//   and the `epoch`, so the relay replays exactly the updates missed while it was away;
// - reconnects with capped, jittered exponential backoff, never sooner than the relay asked
//   for in its "closing" notice; gives up only on close codes that retrying cannot fix;
// - pings when the socket has been quiet (the relay sends nothing while the market is
//   quiet) and treats a missing answer as a dead connection;
// - understands batched frames (`batch: true`: each frame is an array of messages).
// It also runs under Node >= 22 (or Node 20 with --experimental-websocket), which has WebSocket.

export const DEFAULT_URL = "ws://127.0.0.1:8000/api/v2/realtime/ws/prices";

// Close codes after which reconnecting cannot help: the client must change what it sends.
const FATAL = new Map([
  [1002, "protocol error"],
  [1009, "message too big"],
]);

export class RelayClient {
  /**
   * @param {string} url the relay's price socket (ws:// or wss://)
   * @param {object} [options]
   * @param {string[]} [options.symbols] symbols to subscribe to
   * @param {boolean} [options.batch] ask for batched frames (?batch=1)
   * @param {() => (string|Promise<string>)} [options.getToken] a JWT, when the relay has auth on;
   *   called before every connect, so it can return a fresh one
   * @param {(update: object) => void} [options.onPrice] every price_update
   * @param {(status: object) => void} [options.onStatus] status messages, and resume gaps
   *   ({type: "gap", symbols}: a snapshot replaced updates that could not be replayed)
   * @param {(error: object) => void} [options.onError] error messages from the relay
   * @param {(state: string, detail?: object) => void} [options.onState]
   *   "connecting" | "open" | "closed" | "failed"
   * @param {(message: object) => void} [options.onMessage] every message, whatever its type
   */
  constructor(url = DEFAULT_URL, options = {}) {
    this.url = url;
    this.symbols = new Set((options.symbols ?? []).map((s) => s.toUpperCase()));
    this.batch = options.batch ?? false;
    this.getToken = options.getToken ?? null;
    this.onPrice = options.onPrice ?? (() => {});
    this.onStatus = options.onStatus ?? (() => {});
    this.onError = options.onError ?? (() => {});
    this.onState = options.onState ?? (() => {});
    this.onMessage = options.onMessage ?? (() => {});
    this.backoffInitial = options.backoffInitial ?? 500; // ms
    this.backoffMax = options.backoffMax ?? 30000; // ms
    this.heartbeat = options.heartbeat ?? 20000; // ms of silence before a ping
    this.prices = new Map(); // symbol -> latest price_update
    this.lastSeq = new Map(); // symbol -> last seq seen in this.epoch
    this.epoch = null;
    this.ws = null;
    this.attempt = 0;
    this.retryAfter = 0;
    this.stopped = true;
    this.timer = null;
    this.quietTimer = null;
  }

  /** Connect (and keep reconnecting until stop()). */
  start() {
    this.stopped = false;
    this.#connect();
  }

  /** Close for good. */
  stop() {
    this.stopped = true;
    clearTimeout(this.timer);
    clearTimeout(this.quietTimer);
    const ws = this.ws;
    this.ws = null;
    if (ws) ws.close(1000, "bye");
    this.onState("closed", { code: 1000 });
  }

  /** Subscribe to more symbols (sent now if connected, and on every reconnect). */
  subscribe(symbols) {
    const fresh = symbols.map((s) => s.toUpperCase()).filter((s) => !this.symbols.has(s));
    fresh.forEach((s) => this.symbols.add(s));
    if (fresh.length) this.#send({ action: "subscribe", symbols: fresh });
  }

  /** Unsubscribe; no update of these symbols follows the relay's "unsubscribed" ack. */
  unsubscribe(symbols) {
    const gone = symbols.map((s) => s.toUpperCase()).filter((s) => this.symbols.has(s));
    gone.forEach((s) => {
      this.symbols.delete(s);
      this.prices.delete(s);
      this.lastSeq.delete(s);
    });
    if (gone.length) this.#send({ action: "unsubscribe", symbols: gone });
  }

  /** Make the subscriptions exactly `symbols` (what a UI framework's hook wants). */
  setSymbols(symbols) {
    const wanted = new Set(symbols.map((s) => s.toUpperCase()));
    this.unsubscribe([...this.symbols].filter((s) => !wanted.has(s)));
    this.subscribe([...wanted]);
  }

  #send(message) {
    if (this.ws && this.ws.readyState === 1) this.ws.send(JSON.stringify(message));
  }

  async #connect() {
    if (this.stopped) return;
    this.onState("connecting");
    let token = null;
    if (this.getToken) {
      try {
        token = await this.getToken();
      } catch (err) {
        this.#reconnectLater();
        return;
      }
    }
    if (this.stopped) return;
    const ws = new WebSocket(this.url + (this.batch ? "?batch=1" : ""));
    this.ws = ws;
    this.retryAfter = 0;
    ws.onopen = () => {
      this.onState("open");
      // Browsers cannot set headers on a WebSocket: authenticate with the first message.
      if (token) ws.send(JSON.stringify({ action: "auth", token }));
      if (this.symbols.size) ws.send(JSON.stringify(this.#subscribeMessage()));
      this.#armHeartbeat(ws, false);
    };
    ws.onmessage = (event) => {
      if (this.ws !== ws) return;
      this.#armHeartbeat(ws, false);
      const data = JSON.parse(event.data);
      for (const message of Array.isArray(data) ? data : [data]) this.#handle(message);
    };
    ws.onclose = (event) => {
      if (this.ws !== ws) return; // closed by stop(), or replaced by a newer socket
      this.ws = null;
      clearTimeout(this.quietTimer);
      if (FATAL.has(event.code)) {
        this.stopped = true;
        this.onState("failed", { code: event.code, reason: FATAL.get(event.code) });
        return;
      }
      // 1001 (relay restarting), 4008 (we were too slow), 4001 (token expired: getToken
      // gives a fresh one), 1008 (policy), 1006 (network): come back later and resume.
      this.onState("closed", { code: event.code, reason: event.reason });
      this.#reconnectLater();
    };
  }

  #subscribeMessage() {
    const symbols = [...this.symbols];
    const message = { action: "subscribe", symbols };
    const since = {};
    for (const s of symbols) if (this.lastSeq.has(s)) since[s] = this.lastSeq.get(s);
    if (this.epoch && Object.keys(since).length) {
      message.since = since;
      message.epoch = this.epoch;
    }
    return message;
  }

  #handle(message) {
    this.onMessage(message);
    switch (message.type) {
      case "price_update":
        if (message.epoch !== this.epoch) {
          // A restarted relay: a new sequence space.
          this.epoch = message.epoch;
          this.lastSeq.clear();
        }
        if (!this.symbols.has(message.symbol)) return;
        this.lastSeq.set(message.symbol, message.seq);
        this.prices.set(message.symbol, message);
        this.onPrice(message);
        break;
      case "subscribed":
        this.attempt = 0; // connected and accepted: the backoff starts over
        if (message.recovered === false) {
          this.onStatus({ type: "gap", symbols: message.unrecovered ?? [] });
        }
        break;
      case "status":
        if (message.scope === "relay" && message.retry_after_ms) this.retryAfter = message.retry_after_ms;
        this.onStatus(message);
        break;
      case "error":
        this.onError(message);
        break;
      default: // pong, unsubscribed, subscriptions, authenticated
        break;
    }
  }

  #armHeartbeat(ws, pinged) {
    clearTimeout(this.quietTimer);
    this.quietTimer = setTimeout(() => {
      if (pinged) {
        ws.close(4000, "no answer to a ping"); // onclose reconnects
      } else if (ws.readyState === 1) {
        ws.send(JSON.stringify({ action: "ping" }));
        this.#armHeartbeat(ws, true);
      }
    }, this.heartbeat);
  }

  #reconnectLater() {
    const ceiling = Math.min(this.backoffMax, this.backoffInitial * 2 ** this.attempt);
    const jitter = Math.random() * ceiling;
    const hint = this.retryAfter ? this.retryAfter * (1 + Math.random() * 0.5) : 0;
    this.attempt += 1;
    clearTimeout(this.timer);
    this.timer = setTimeout(() => this.#connect(), Math.max(jitter, hint));
  }
}
