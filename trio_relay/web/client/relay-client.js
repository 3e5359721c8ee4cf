// @ts-check
// The official JavaScript client of trio-relay: one class, no dependencies, ESM.
//
// One RelayClient owns at most one connection at a time: the price WebSocket, or, where a
// proxy blocks WebSockets, the Server-Sent Events stream of the same relay (automatic fallback,
// or forced with `transport`). It keeps the wanted symbols (each with its delivery options),
// the last `seq` of each and the relay's `epoch`, so every reconnect subscribes everything
// again and resumes exactly where it stopped: `since` + `epoch` on the WebSocket, the event id
// on SSE. It reconnects by itself with capped, jittered backoff, never sooner than the relay
// asked (`retry_after_ms` of a "closing" status or of a `rate_limited` error), follows the close
// codes (1001: wait; 4001: a new token; 1008: say why, back off; 4008: reconnect; 1002/1009:
// stop, it is a client bug), merges `delta` messages into full prices, reads batched frames,
// and never touches the DOM: the page gets callbacks and reads `state`, `detail`, `retryAt`.
//
//   import { RelayClient } from "@trio-relay/client";
//   const relay = new RelayClient("http://127.0.0.1:8000", {
//     update: (price) => console.log(price.symbol, price.last_price),
//     state: () => console.log(relay.state, relay.transport, relay.detail),
//   });
//   relay.add(["AAPL", "MSFT"], { maxRate: 4, fields: ["last_price"], delta: true });
//   relay.start();
//
// Alerts share the WebSocket: with an `alerts` callback the client asks for the user's rules
// on every (re)connect (after `auth`), and createAlert/deleteAlert send the relay's alert
// actions. Over SSE (one-way) they are not available: those methods return false.

export const WS_PATH = "/api/v2/realtime/ws/prices";
export const SSE_PATH = "/api/v2/realtime/sse/prices";
export const SYMBOL_RE = /^[A-Z0-9^][A-Z0-9./^=-]{0,19}$/; // trio_relay.model.SYMBOL_RE
export const MAX_PER_REQUEST = 50; // clients.max_symbols_per_request (default)

// Connection states, as shown to people.
export const CONNECTING = "connecting";
export const LIVE = "live";
export const RECONNECTING = "reconnecting";
export const NEED_TOKEN = "token";
export const STOPPED = "stopped";

/**
 * @typedef {Object} DeliveryOptions how the relay delivers one symbol (see docs/api.md)
 * @property {number} [maxRate] at most this many updates a second (the relay sends the latest state)
 * @property {string[]} [fields] only these price_update fields (symbol, seq and epoch always come)
 * @property {boolean} [delta] after a full message, only what changed (merged back by this client)
 */

/**
 * @typedef {Record<string, any> & {type: string}} RelayMessage any message from the relay
 * @typedef {RelayMessage & {symbol: string, seq: number, epoch: string}} PriceUpdate
 */

/**
 * @typedef {Object} Callbacks every one optional
 * @property {(price: PriceUpdate, raw: PriceUpdate) => void} [update] a price: the full state
 *   (a delta already merged into what was held), and the message as it came
 * @property {(msg: RelayMessage) => void} [status] status messages (upstream, symbols, relay)
 * @property {(msg: RelayMessage) => void} [subscribed] acks; `recovered: false` names a resume gap
 * @property {(msg: RelayMessage) => void} [error] error messages from the relay
 * @property {() => void} [state] the connection state changed (read state, detail, transport)
 * @property {(reason: string) => void} [needToken] the relay wants a (fresh) token: call setToken
 * @property {() => void} [tokenRefused] the token given was refused
 * @property {(msg: RelayMessage) => void} [authenticated]
 * @property {(expiresAt: number) => void} [expiring] the token expires within a minute
 * @property {(rules: RelayMessage[]) => void} [alerts]
 * @property {(rule: RelayMessage) => void} [alertCreated]
 * @property {(id: string) => void} [alertDeleted]
 * @property {(msg: RelayMessage) => void} [alert] a fired alert
 * @property {(msg: RelayMessage) => void} [portfolio] a valuation of the watched portfolio (see watchPortfolio)
 * @property {(msg: RelayMessage) => void} [message] every message, whatever its type
 */

/**
 * @typedef {Object} ClientOptions
 * @property {"auto" | "websocket" | "sse"} [transport] "auto" (default): the WebSocket, and SSE
 *   after `sseAfterFailures` WebSocket attempts in a row that never opened
 * @property {number} [sseAfterFailures] default 2
 * @property {number} [wsProbeMs] on SSE after a fallback, try the WebSocket again after this
 *   long (doubling up to 5 minutes): the relay may just have been down (default 30000)
 * @property {boolean} [batch] batched WebSocket frames (default: `?batch=1` on the URL)
 * @property {string | null} [browser] with auth off, this browser's own id (default: `?browser=` on
 *   the URL): the relay keeps this browser's alerts and portfolios apart from other browsers'
 * @property {string | null} [token] a JWT when the relay has auth on (or call setToken)
 * @property {number} [backoffInitialMs] default 500
 * @property {number} [backoffMaxMs] default 15000
 * @property {number} [pingAfterMs] silent this long: a ping (default 20000)
 * @property {number} [pongTimeoutMs] no pong this long: the connection is dead (default 10000)
 * @property {any} [WebSocket] a WebSocket class (default: the global one)
 * @property {any} [EventSource] an EventSource class (default: the global one)
 */

const EXPIRY_WARNING_MS = 60000; // ask for a fresh token this long before the current one expires
const RETRY_HINT_MAX_MS = 60000; // a relay's retry hint beyond this is not waited for

export class RelayClient {
  /**
   * @param {string} url the relay: its base URL (http(s)://host:port) or its price socket's URL
   * @param {Callbacks} [on]
   * @param {ClientOptions} [options]
   */
  constructor(url, on = {}, options = {}) {
    const { ws, sse, batch, browser } = endpoints(url);
    this.wsUrl = ws;
    this.sseUrl = sse;
    this.on = on;
    this.batch = options.batch ?? batch;
    this.browser = options.browser ?? browser;
    this.mode = options.transport ?? "auto";
    this.sseAfterFailures = options.sseAfterFailures ?? 2;
    this.wsProbeMs = options.wsProbeMs ?? 30000;
    this._probeDelayMs = this.wsProbeMs;
    this.backoffInitialMs = options.backoffInitialMs ?? 500;
    this.backoffMaxMs = options.backoffMaxMs ?? 15000;
    this.pingAfterMs = options.pingAfterMs ?? 20000;
    this.pongTimeoutMs = options.pongTimeoutMs ?? 10000;
    /** @type {any} */
    this.WebSocketImpl = options.WebSocket ?? globalThis.WebSocket;
    /** @type {any} */
    this.EventSourceImpl = options.EventSource ?? globalThis.EventSource;
    /** @type {"websocket" | "sse"} the transport of the current (or next) connection */
    this.transport = this.mode === "sse" ? "sse" : "websocket";
    /** @type {Set<string>} */
    this.symbols = new Set();
    /** @type {string | null} the portfolio whose valuations are wanted (on every reconnect) */
    this.portfolio = null;
    /** @type {Map<string, DeliveryOptions>} symbols with delivery options (others: the defaults) */
    this.options = new Map();
    /** @type {Map<string, number>} the last seq seen per symbol, in `epoch` */
    this.lastSeq = new Map();
    /** @type {Map<string, PriceUpdate>} the latest full price per symbol (deltas merged) */
    this.prices = new Map();
    /** @type {string | null} */
    this.epoch = null;
    /** @type {string | null} */
    this.token = options.token ?? null;
    this.state = CONNECTING;
    this.detail = ""; // why we are reconnecting or stopped, or what the token is needed for
    this.retryAt = 0; // when the next attempt starts (performance.now() ms)
    /** @type {any} the open WebSocket, if any */
    this.ws = null;
    /** @type {any[]} the open EventSources, if any (one per option set and 50 symbols) */
    this.streams = [];
    this.authenticated = false;
    // For tests and the curious: price updates received per symbol, before any filtering, and
    // that count when the relay acknowledged an unsubscribe; frames (or events) read.
    /** @type {Record<string, number>} */
    this.received = Object.create(null);
    /** @type {Record<string, number>} */
    this.unsubscribedAt = Object.create(null);
    this.frames = 0;
    /** @type {string | null} the last token the relay accepted (a refused refresh reverts to it) */
    this._acceptedToken = null;
    /** @type {Set<string>} removed, their "unsubscribed" not yet heard (resent after a rate limit) */
    this._dropped = new Set();
    this._attempt = 0;
    this._wsFailures = 0; // WebSocket attempts in a row that never opened
    /** @type {number | null} from a relay "closing" status, for the 1001 that follows */
    this._retryAfterMs = null;
    this._stopped = true;
    /** @type {any} */ this._timer = 0;
    /** @type {any} */ this._expiryTimer = 0;
    /** @type {any} */ this._watchdog = 0;
    /** @type {any} */ this._resyncTimer = 0;
    /** @type {any} */ this._probeTimer = 0;
    this._reopenQueued = false;
    this._heardAt = 0;
    this._pingAt = 0;
  }

  /** Connect, and keep reconnecting until stop(). */
  start() {
    this._stopped = false;
    this._connect();
  }

  /** Close for good (until start() again). */
  stop() {
    this._stopped = true;
    this._detach(1000, "bye");
    this._setState(STOPPED, "stopped");
  }

  /**
   * Subscribe `symbols` with `options` (the defaults when omitted), now if connected and on every
   * reconnect. Symbols already held switch to these options (the relay sends a fresh full price).
   * @param {string[]} symbols
   * @param {DeliveryOptions} [options]
   */
  add(symbols, options) {
    const wanted = normalize(symbols);
    const changed = wanted.filter((s) => !this.symbols.has(s) || optionsKey(this.options.get(s)) !== optionsKey(options));
    for (const s of changed) {
      this.symbols.add(s);
      this._dropped.delete(s);
      if (options && optionsKey(options) !== "{}") this.options.set(s, options);
      else this.options.delete(s);
    }
    if (!changed.length) return;
    if (this.transport === "sse") this._reopenStreams();
    else if (this._ready()) this._subscribe(changed, false);
  }

  /**
   * Unsubscribe `symbols`; their updates are ignored from now on, even those already in flight.
   * @param {string[]} symbols
   */
  remove(symbols) {
    const gone = normalize(symbols).filter((s) => this.symbols.has(s));
    for (const s of gone) {
      this.symbols.delete(s);
      this.options.delete(s);
      this.lastSeq.delete(s);
      this.prices.delete(s);
      this._dropped.add(s);
    }
    if (!gone.length) return;
    if (this.transport === "sse") this._reopenStreams();
    else if (this._ready()) for (const chunk of chunks(gone)) this._send({ action: "unsubscribe", symbols: chunk });
  }

  /** @param {string[]} symbols @param {DeliveryOptions} [options] */
  subscribe(symbols, options) {
    this.add(symbols, options);
  }

  /** @param {string[]} symbols */
  unsubscribe(symbols) {
    this.remove(symbols);
  }

  /**
   * Make the subscriptions exactly `symbols` (what a UI framework's hook wants).
   * @param {string[]} symbols
   * @param {DeliveryOptions} [options] for the symbols added
   */
  setSymbols(symbols, options) {
    const wanted = new Set(normalize(symbols));
    this.remove([...this.symbols].filter((s) => !wanted.has(s)));
    this.add([...wanted].filter((s) => !this.symbols.has(s)), options);
  }

  /**
   * Follow the valuations of portfolio `name` (to `on.portfolio`) now if connected, and on every
   * reconnect. WebSocket only: over SSE (one-way) the valuations resume when the WebSocket is back.
   * @param {string} name
   */
  watchPortfolio(name) {
    if (this.portfolio === name) return;
    this.portfolio = name;
    if (this._ready()) this._send({ action: "subscribe", channel: "portfolio", portfolio: name });
  }

  /** Ask for the user's alert rules (the reply goes to `on.alerts`); false when not possible. */
  listAlerts() {
    if (!this._ready()) return false;
    this._send({ action: "alerts" });
    return true;
  }

  /**
   * Create an alert rule (the relay validates it: a refusal is an error with action "alert_create").
   * @param {Record<string, any>} rule
   */
  createAlert(rule) {
    if (!this._ready()) return false;
    this._send({ action: "alert_create", rule });
    return true;
  }

  /** @param {string} id */
  deleteAlert(id) {
    if (!this._ready()) return false;
    this._send({ action: "alert_delete", id });
    return true;
  }

  /**
   * A token from the user: refresh it on a live authenticated socket, else connect with it.
   * @param {string | null} token
   */
  setToken(token) {
    this.token = token || null;
    if (this.token && this.authenticated && this._ready()) {
      this._send({ action: "auth", token: this.token });
      return;
    }
    this.reconnectNow();
  }

  /** Connect at once (a "retry now" button, a new token). */
  reconnectNow() {
    this._stopped = false;
    this._detach(1000, "reconnecting");
    this._connect();
  }

  // ------------------------------------------------------------------ connection lifetime
  _connect() {
    clearTimeout(this._timer);
    if (this._stopped) return;
    this._setState(CONNECTING, "");
    if (this.transport === "sse") this._openStreams();
    else this._openSocket();
  }

  _openSocket() {
    /** @type {any} */
    let ws;
    try {
      ws = new this.WebSocketImpl(this._socketUrl());
    } catch (exc) {
      this._retry(this._backoff(), String(exc));
      return;
    }
    this._watchSocket(ws, false);
  }

  /**
   * Make `ws` the connection: its events drive the client from now on.
   * @param {any} ws
   * @param {boolean} opened
   */
  _watchSocket(ws, opened) {
    this.ws = ws;
    ws.onopen = () => {
      opened = true;
      this._opened(ws);
    };
    ws.onmessage = (/** @type {{data: any}} */ event) => this._received(ws, event.data);
    ws.onclose = (/** @type {{code: number, reason: string}} */ event) => this._closed(ws, event.code, event.reason, opened);
    // In browsers onerror is always followed by onclose, which decides what to do. A socket that
    // never opened is given up at its error: some runtimes (Node 20's) never close it.
    ws.onerror = () => {
      if (opened) return;
      this._closed(ws, 1006, "", false);
      try {
        ws.close();
      } catch {
        // not open: nothing to close
      }
    };
  }

  /** @param {any} ws */
  _opened(ws) {
    if (ws !== this.ws) return;
    this._wsFailures = 0;
    this.authenticated = false;
    this._heardAt = performance.now();
    this._pingAt = 0;
    // The order matters: the relay handles messages in order, so auth comes before subscribe.
    if (this.token) this._send({ action: "auth", token: this.token });
    if (this.symbols.size) this._subscribe([...this.symbols], true);
    else this._send({ action: "list" }); // any reply tells us the connection works (and needs no token)
    if (this.on.alerts) this._send({ action: "alerts" }); // a new connection may follow changes made meanwhile
    if (this.portfolio) this._send({ action: "subscribe", channel: "portfolio", portfolio: this.portfolio });
    this._watchdog = setInterval(() => this._checkAlive(), Math.min(5000, this.pongTimeoutMs / 2));
  }

  /** @param {any} ws @param {number} code @param {string} reason @param {boolean} opened */
  _closed(ws, code, reason, opened) {
    if (ws !== this.ws) return; // a socket we already gave up on
    this._cleanup();
    if (this.state === NEED_TOKEN || this._stopped) return; // waiting for the user, not for a timer
    if (!opened && this.mode === "auto" && this.EventSourceImpl && ++this._wsFailures >= this.sseAfterFailures) {
      // The WebSocket never opens here (a proxy that blocks it): the same prices over SSE.
      this.transport = "sse";
      this._retry(0, "WebSocket blocked: using Server-Sent Events");
      return;
    }
    const why = reason || `closed (${code})`;
    switch (code) {
      case 1001: {
        // The relay is shutting down: come back after the pause it asked for, between one and
        // two pauses (a restarted relay's pages do not all come back in the same millisecond).
        const pause = this._retryAfterMs ?? 1000;
        this._retryAfterMs = null;
        this._retry(Math.max(pause * (1 + Math.random()), this._backoff()), "relay restarting");
        return;
      }
      case 4001:
        this._needToken("the token expired: paste a fresh one");
        return;
      case 1008:
        if (/auth/i.test(reason)) {
          this._needToken(reason);
          return;
        }
        this._retry(this._backoff(), why);
        return;
      case 1002:
      case 1009:
        this._setState(STOPPED, why); // a client bug: retrying in a loop would not help
        return;
      default: // 4008 (too slow), 1006 (connection lost), anything else: back off and resume
        this._retry(this._backoff(), code === 1006 ? "connection lost" : why);
    }
  }

  /** After a fallback to SSE: try the WebSocket again later (the relay may only have been down). */
  _probeLater() {
    if (this.mode !== "auto" || this._probeTimer || this._stopped) return;
    this._probeTimer = setTimeout(() => {
      this._probeTimer = 0;
      this._probe();
    }, this._probeDelayMs);
    this._probeDelayMs = Math.min(this._probeDelayMs * 2, 300000);
  }

  _probe() {
    if (this.transport !== "sse" || this._stopped) return;
    /** @type {any} */
    let ws;
    try {
      ws = new this.WebSocketImpl(this._socketUrl());
    } catch {
      this._probeLater();
      return;
    }
    let settled = false;
    ws.onopen = () => {
      settled = true;
      if (this.transport !== "sse" || this._stopped) {
        ws.close(1000, "not needed");
        return;
      }
      // The WebSocket passes now: back to it, resuming from what the streams delivered.
      this._closeStreams();
      this.transport = "websocket";
      this._probeDelayMs = this.wsProbeMs;
      this._watchSocket(ws, true);
      this._opened(ws);
    };
    ws.onerror = ws.onclose = () => {
      if (settled) return;
      settled = true;
      try {
        ws.close();
      } catch {
        // not open
      }
      this._probeLater();
    };
  }

  _openStreams() {
    const ES = this.EventSourceImpl;
    if (!ES) {
      this._setState(STOPPED, "no EventSource in this environment");
      return;
    }
    this._closeStreams();
    for (const url of this._streamUrls()) {
      const es = new ES(url);
      this.streams.push(es);
      /** @param {{data: string}} event */
      const read = (event) => this._receivedEvent(es, event.data);
      for (const name of ["price_update", "subscribed", "status", "relay_error", "message"]) es.addEventListener(name, read);
      es.addEventListener("error", () => this._streamError(es));
    }
    if (!this.streams.length) this._live(); // nothing to stream: nothing can fail
  }

  /** The URL of each stream: one per option set and 50 symbols, each resuming where it was. */
  _streamUrls() {
    /** @type {Map<string, string[]>} */
    const groups = new Map();
    for (const s of this.symbols) {
      const key = optionsKey(this.options.get(s));
      const list = groups.get(key) ?? [];
      list.push(s);
      groups.set(key, list);
    }
    const urls = [];
    for (const [key, symbols] of groups) {
      /** @type {DeliveryOptions} */
      const options = JSON.parse(key);
      for (const chunk of chunks(symbols)) {
        const params = new URLSearchParams({ symbols: chunk.join(",") });
        if (options.maxRate !== undefined) params.set("max_rate", String(options.maxRate));
        if (options.fields) params.set("fields", options.fields.join(","));
        if (options.delta) params.set("delta", "1");
        if (this.token) params.set("token", this.token);
        if (this.browser) params.set("browser", this.browser);
        const seen = chunk.filter((s) => this.lastSeq.has(s)).map((s) => `${s}:${this.lastSeq.get(s)}`);
        if (this.epoch !== null && seen.length) params.set("last_event_id", `${this.epoch}~${seen.join(",")}`);
        urls.push(`${this.sseUrl}?${params}`);
      }
    }
    return urls;
  }

  /** @param {any} es */
  _streamError(es) {
    if (!this.streams.includes(es)) return;
    if (es.readyState === 2) {
      // CLOSED: the browser gave up (an HTTP error: a bad token, a refused symbol, a cap).
      this._closeStreams();
      this._retry(this._backoff(), "the price stream was refused or lost");
    } else {
      // CONNECTING: the browser reconnects by itself, and resumes with Last-Event-ID.
      this._setState(RECONNECTING, "connection lost");
    }
  }

  /** Subscriptions changed on SSE (one-way): new streams, resuming from what we have. */
  _reopenStreams() {
    if (this._reopenQueued || this._stopped || this.state === NEED_TOKEN) return;
    this._reopenQueued = true;
    queueMicrotask(() => {
      this._reopenQueued = false;
      if (this.transport === "sse" && !this._stopped) this._openStreams();
    });
  }

  _closeStreams() {
    const streams = this.streams;
    this.streams = [];
    for (const es of streams) es.close();
  }

  /** @param {number} delayMs @param {string} why */
  _retry(delayMs, why) {
    clearTimeout(this._timer);
    this.retryAt = performance.now() + delayMs;
    this._setState(RECONNECTING, why);
    this._timer = setTimeout(() => this._connect(), delayMs);
  }

  _backoff() {
    const cap = Math.min(this.backoffMaxMs, this.backoffInitialMs * 2 ** this._attempt);
    this._attempt = Math.min(this._attempt + 1, 30);
    return cap / 2 + (Math.random() * cap) / 2; // jittered: many pages do not come back in step
  }

  /** @param {string} reason */
  _needToken(reason) {
    this.token = null;
    this._detach(1000, "token needed");
    this._setState(NEED_TOKEN, reason);
    this.on.needToken?.(reason);
  }

  /**
   * Stop listening to the current connection (if any) and close it; no reconnect is scheduled.
   * @param {number} code
   * @param {string} reason
   */
  _detach(code, reason) {
    const ws = this.ws;
    this._cleanup();
    this._closeStreams();
    clearTimeout(this._timer);
    if (ws) {
      ws.onopen = ws.onmessage = ws.onclose = ws.onerror = null;
      try {
        ws.close(code, reason);
      } catch {
        // already closing
      }
    }
  }

  _cleanup() {
    this.ws = null;
    this.authenticated = false;
    clearInterval(this._watchdog);
    clearTimeout(this._expiryTimer);
    clearTimeout(this._resyncTimer);
    clearTimeout(this._probeTimer);
    this._probeTimer = 0;
  }

  _checkAlive() {
    const now = performance.now();
    if (this._pingAt && now - this._pingAt > this.pongTimeoutMs) {
      this._detach(4000, "no reply to ping");
      this._retry(this._backoff(), "no reply from the relay");
    } else if (!this._pingAt && now - this._heardAt > this.pingAfterMs) {
      this._pingAt = now;
      this._send({ action: "ping" });
    }
  }

  /** The price socket's URL with this client's query (batch, browser). */
  _socketUrl() {
    const params = new URLSearchParams();
    if (this.batch) params.set("batch", "1");
    if (this.browser) params.set("browser", this.browser);
    const query = params.toString();
    return query ? `${this.wsUrl}?${query}` : this.wsUrl;
  }

  _ready() {
    return this.ws !== null && this.ws.readyState === 1; // OPEN
  }

  /** @param {Record<string, any>} msg */
  _send(msg) {
    this.ws.send(JSON.stringify(msg));
  }

  /** @param {string[]} symbols @param {boolean} resume */
  _subscribe(symbols, resume) {
    /** @type {Map<string, string[]>} */
    const groups = new Map();
    for (const s of symbols) {
      const key = optionsKey(this.options.get(s));
      groups.set(key, [...(groups.get(key) ?? []), s]);
    }
    for (const [key, group] of groups) {
      /** @type {DeliveryOptions} */
      const options = JSON.parse(key);
      for (const chunk of chunks(group)) {
        /** @type {Record<string, any>} */
        const msg = { action: "subscribe", symbols: chunk };
        if (options.maxRate !== undefined) msg.max_rate = options.maxRate;
        if (options.fields) msg.fields = options.fields;
        if (options.delta) msg.delta = true;
        if (resume && this.epoch !== null) {
          /** @type {Record<string, number>} */
          const since = {};
          for (const s of chunk) {
            const seq = this.lastSeq.get(s);
            if (seq !== undefined) since[s] = seq;
          }
          if (Object.keys(since).length) {
            msg.since = since;
            msg.epoch = this.epoch;
          }
        }
        this._send(msg);
      }
    }
  }

  /** After a rate_limited error: everything wanted (and not wanted) again, when the relay said. */
  _resync() {
    if (!this._ready()) return;
    if (this._dropped.size) for (const chunk of chunks([...this._dropped])) this._send({ action: "unsubscribe", symbols: chunk });
    if (this.symbols.size) this._subscribe([...this.symbols], true);
  }

  /** @param {string} state @param {string} detail */
  _setState(state, detail) {
    this.state = state;
    this.detail = detail;
    this.on.state?.();
  }

  _live() {
    if (this.state === LIVE || this.state === NEED_TOKEN) return;
    // The relay answered: it works, so the next drop starts the backoff again from the shortest
    // wait. (A socket that opens but never answers does not count, or a broken proxy that
    // accepts and closes at once would be retried in a tight loop.)
    this._attempt = 0;
    this._setState(LIVE, "");
    if (this.transport === "sse") this._probeLater();
  }

  // ------------------------------------------------------------------ messages
  /** @param {any} ws @param {string} data */
  _received(ws, data) {
    if (ws !== this.ws) return;
    this._heardAt = performance.now();
    this._pingAt = 0;
    this.frames++;
    let parsed;
    try {
      parsed = JSON.parse(data);
    } catch {
      return; // the relay sends JSON only; nothing sensible to do with anything else
    }
    if (Array.isArray(parsed)) {
      // Batched frames: one frame, many messages.
      for (const msg of parsed) {
        this._handle(msg);
        if (ws !== this.ws) return; // that message ended this connection: the rest is moot
      }
    } else {
      this._handle(parsed);
    }
  }

  /** @param {any} es @param {string} data */
  _receivedEvent(es, data) {
    if (!this.streams.includes(es)) return;
    this.frames++;
    try {
      this._handle(JSON.parse(data));
    } catch {
      // not JSON: nothing sensible to do with it
    }
  }

  /** @param {RelayMessage} msg */
  _handle(msg) {
    this.on.message?.(msg);
    switch (msg.type) {
      case "price_update":
        this._update(/** @type {PriceUpdate} */ (msg));
        return;
      case "subscribed":
        if (msg.epoch) this._adoptEpoch(msg.epoch);
        this._live();
        this.on.subscribed?.(msg);
        return;
      case "unsubscribed":
        for (const s of msg.symbols) {
          this.unsubscribedAt[s] = this.received[s] ?? 0;
          this._dropped.delete(s);
        }
        this._live();
        return;
      case "authenticated":
        this._authenticated(msg);
        return;
      case "alert":
        this._live();
        this.on.alert?.(msg);
        return;
      case "alerts":
        this._live();
        this.on.alerts?.(Array.isArray(msg.rules) ? msg.rules : []);
        return;
      case "alert_created":
        this._live();
        if (msg.rule) this.on.alertCreated?.(msg.rule);
        return;
      case "alert_deleted":
        this._live();
        this.on.alertDeleted?.(msg.id);
        return;
      case "portfolio":
        this._live();
        this.on.portfolio?.(msg);
        return;
      case "status":
        if (msg.scope === "relay" && msg.state === "closing") this._retryAfterMs = msg.retry_after_ms ?? null;
        this.on.status?.(msg);
        return;
      case "error":
        this._error(msg);
        return;
      default: // pong, subscriptions, and whatever a newer relay adds
        this._live();
    }
  }

  /** @param {PriceUpdate} msg */
  _update(msg) {
    const symbol = msg.symbol;
    this.received[symbol] = (this.received[symbol] ?? 0) + 1;
    if (!this.symbols.has(symbol)) return; // removed while it was in flight
    if (msg.epoch !== this.epoch) this._adoptEpoch(msg.epoch);
    const last = this.lastSeq.get(symbol);
    if (last !== undefined && msg.seq <= last) return; // never a step back
    this.lastSeq.set(symbol, msg.seq);
    this._live();
    if (msg.data_type === "B") {
      // A trade break corrects an earlier print; it is not the symbol's state.
      this.on.update?.(msg, msg);
      return;
    }
    const held = this.prices.get(symbol);
    /** @type {PriceUpdate} */
    let price = msg;
    if (msg.delta) {
      if (!held) return; // cannot happen: the relay sends a full message first
      price = { ...held, ...msg };
      delete price.delta;
    }
    this.prices.set(symbol, price);
    this.on.update?.(price, msg);
  }

  /** @param {RelayMessage} msg */
  _authenticated(msg) {
    const refresh = this.authenticated;
    this.authenticated = true;
    this._acceptedToken = this.token;
    this._live();
    this._armExpiry(msg.expires_at);
    // A refreshed token may name another user: their rules, not the previous one's.
    if (refresh && this.on.alerts) this._send({ action: "alerts" });
    this.on.authenticated?.(msg);
  }

  /** @param {string} epoch */
  _adoptEpoch(epoch) {
    if (epoch === this.epoch) return;
    // A new sequence space (the relay restarted): old seq values mean nothing in it.
    this.epoch = epoch;
    this.lastSeq.clear();
  }

  /** @param {RelayMessage} msg */
  _error(msg) {
    switch (msg.code) {
      case "unauthenticated":
        this._needToken("this relay needs a token");
        return;
      case "token_expired":
        this._needToken("the token expired: paste a fresh one");
        return;
      case "unauthorized":
        if (msg.action === "auth" && !this.authenticated) {
          this.on.tokenRefused?.();
          this._needToken(`token refused: ${msg.message}`);
          return;
        }
        if (msg.action === "auth") this.token = this._acceptedToken; // a refused refresh: keep the old one
        break;
      case "rate_limited":
        if (msg.action === "subscribe" || msg.action === "unsubscribe") {
          // Not applied: send what we want again once the relay allows it.
          clearTimeout(this._resyncTimer);
          this._resyncTimer = setTimeout(() => this._resync(), Math.min(msg.retry_after_ms ?? 1000, RETRY_HINT_MAX_MS));
        }
        break;
      default:
        break;
    }
    this.on.error?.(msg);
  }

  /** @param {unknown} expiresAt */
  _armExpiry(expiresAt) {
    clearTimeout(this._expiryTimer);
    if (typeof expiresAt !== "number") return;
    const warnIn = expiresAt * 1000 - Date.now() - EXPIRY_WARNING_MS;
    if (warnIn > 2 ** 31 - 1) return; // beyond what setTimeout can wait (~24 days)
    this._expiryTimer = setTimeout(() => this.on.expiring?.(expiresAt), Math.max(0, warnIn));
  }
}

/**
 * The price socket and the SSE stream of a relay, from its base URL or either endpoint's URL.
 * @param {string} url
 */
export function endpoints(url) {
  const u = new URL(url);
  const secure = u.protocol === "https:" || u.protocol === "wss:";
  let prefix = u.pathname;
  for (const path of [WS_PATH, SSE_PATH]) {
    const at = prefix.indexOf(path);
    if (at >= 0) prefix = prefix.slice(0, at);
  }
  prefix = prefix.replace(/\/+$/, "");
  const batch = ["1", "true", "yes"].includes((u.searchParams.get("batch") ?? "").toLowerCase());
  return {
    ws: `${secure ? "wss" : "ws"}://${u.host}${prefix}${WS_PATH}`,
    sse: `${secure ? "https" : "http"}://${u.host}${prefix}${SSE_PATH}`,
    batch,
    browser: u.searchParams.get("browser"),
  };
}

/** @param {string[]} symbols */
function normalize(symbols) {
  return [...new Set(symbols.map((s) => s.trim().toUpperCase()))];
}

/**
 * A stable key for a set of delivery options ("{}" for the defaults).
 * @param {DeliveryOptions | undefined} options
 */
function optionsKey(options) {
  if (!options) return "{}";
  /** @type {DeliveryOptions} */
  const out = {};
  if (options.maxRate !== undefined && options.maxRate !== null) out.maxRate = options.maxRate;
  if (options.fields) out.fields = [...options.fields];
  if (options.delta) out.delta = true;
  return JSON.stringify(out);
}

/** @param {string[]} symbols */
function chunks(symbols) {
  const out = [];
  for (let i = 0; i < symbols.length; i += MAX_PER_REQUEST) out.push(symbols.slice(i, i + MAX_PER_REQUEST));
  return out;
}
