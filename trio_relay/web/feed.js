// The price socket, as the README's "Client WebSocket protocol" asks a client to use it.
//
// One RelayFeed owns at most one WebSocket at a time. It keeps the wanted symbols, the last
// `seq` of each and the relay's `epoch`, so that every reconnect subscribes everything again
// and resumes exactly where it stopped (`since` + `epoch`). It reconnects by itself with capped,
// jittered backoff, follows the close codes (1001: wait retry_after_ms; 4001: a new token;
// 1008: show why, back off; 4008: reconnect; 1002/1009: stop, it is a client bug) and never
// touches the DOM: the page gets callbacks and reads `state`, `detail`, `retryAt`.
//
// Alerts share the connection: with an `alerts` callback the feed asks for the user's rules on
// every (re)connect (after `auth`, so they are the rules of the token's user), and
// createAlert/deleteAlert send the relay's alert actions; replies and fired alerts come back
// through the callbacks.

export const SYMBOL_RE = /^[A-Z0-9^][A-Z0-9./^=-]{0,19}$/;  // trio_relay.model.SYMBOL_RE
export const MAX_PER_REQUEST = 50;  // clients.max_symbols_per_request (default)

const BACKOFF_INITIAL_MS = 500;
const BACKOFF_MAX_MS = 15000;
const PING_AFTER_MS = 20000;  // silent this long: ask for a pong...
const PONG_TIMEOUT_MS = 10000;  // ...and give the connection up when none comes
const EXPIRY_WARNING_MS = 60000;  // ask for a fresh token this long before the current one expires

// Connection states, as shown to people.
export const CONNECTING = "connecting";
export const LIVE = "live";
export const RECONNECTING = "reconnecting";
export const NEED_TOKEN = "token";
export const STOPPED = "stopped";

export class RelayFeed {
  /**
   * @param {string} url the price socket's URL (with ?batch=1)
   * @param {object} on callbacks, all optional: update(msg), status(msg), subscribed(msg),
   *   error(msg), state(), needToken(reason), tokenRefused(), authenticated(msg), expiring(msg),
   *   alerts(rules), alertCreated(rule), alertDeleted(id), alert(msg) (a fired alert),
   *   portfolio(msg) (a valuation of the watched portfolio)
   */
  constructor(url, on) {
    this.url = url;
    this.on = on;
    this.symbols = new Set();
    this.portfolio = null;  // the portfolio whose valuations are wanted (on every reconnect)
    this.lastSeq = new Map();
    this.epoch = null;
    this.token = null;
    this._acceptedToken = null;  // the last token the relay accepted (a refused refresh reverts to it)
    this.state = CONNECTING;
    this.detail = "";  // why we are reconnecting or stopped, or what the token is needed for
    this.retryAt = 0;  // when the next attempt starts (performance.now() ms)
    this.ws = null;
    this.authenticated = false;
    this._attempt = 0;
    this._retryAfterMs = null;  // from a relay "closing" status, for the 1001 that follows
    this._timer = 0;
    this._expiryTimer = 0;
    this._watchdog = 0;
    this._heardAt = 0;
    this._pingAt = 0;
    // For tests and the curious (window.relayDashboard): price updates received per symbol,
    // before any filtering, and that count when the relay acknowledged an unsubscribe.
    this.received = Object.create(null);
    this.unsubscribedAt = Object.create(null);
    this.frames = 0;
  }

  start() {
    this._connect();
  }

  /** Subscribe `symbols` (already validated) now if connected, and on every reconnect. */
  add(symbols) {
    const fresh = symbols.filter((s) => !this.symbols.has(s));
    for (const s of fresh) this.symbols.add(s);
    if (fresh.length && this._ready()) this._subscribe(fresh, false);
  }

  /** Unsubscribe `symbols`; their updates are ignored from now on, even those already in flight. */
  remove(symbols) {
    const gone = symbols.filter((s) => this.symbols.has(s));
    for (const s of gone) {
      this.symbols.delete(s);
      this.lastSeq.delete(s);
    }
    if (gone.length && this._ready()) {
      for (const chunk of chunks(gone)) this._send({ action: "unsubscribe", symbols: chunk });
    }
  }

  /** Follow the valuations of portfolio `name` now if connected, and on every reconnect. */
  watchPortfolio(name) {
    if (this.portfolio === name) return;
    this.portfolio = name;
    if (this._ready()) this._send({ action: "subscribe", channel: "portfolio", portfolio: name });
  }

  /** Ask for the user's alert rules (the reply goes to `on.alerts`); false when not connected. */
  listAlerts() {
    if (!this._ready()) return false;
    this._send({ action: "alerts" });
    return true;
  }

  /** Create an alert rule (the relay validates it: a refusal is an error with action "alert_create"). */
  createAlert(rule) {
    if (!this._ready()) return false;
    this._send({ action: "alert_create", rule });
    return true;
  }

  deleteAlert(id) {
    if (!this._ready()) return false;
    this._send({ action: "alert_delete", id });
    return true;
  }

  /** A token from the user: refresh it on a live authenticated connection, else connect with it. */
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
    this._detach(1000, "reconnecting");
    this._connect();
  }

  // ------------------------------------------------------------------ connection lifetime
  _connect() {
    clearTimeout(this._timer);
    this._setState(CONNECTING, "");
    let ws;
    try {
      ws = new WebSocket(this.url);
    } catch (exc) {
      this._retry(this._backoff(), String(exc));
      return;
    }
    this.ws = ws;
    ws.onopen = () => this._opened(ws);
    ws.onmessage = (event) => this._received(ws, event.data);
    ws.onclose = (event) => this._closed(ws, event.code, event.reason);
    // onerror is always followed by onclose, which decides what to do.
  }

  _opened(ws) {
    if (ws !== this.ws) return;
    this.authenticated = false;
    this._heardAt = performance.now();
    this._pingAt = 0;
    // The order matters: the relay handles messages in order, so auth comes before subscribe.
    if (this.token) this._send({ action: "auth", token: this.token });
    if (this.symbols.size) this._subscribe([...this.symbols], true);
    else this._send({ action: "list" });  // any reply tells us the connection works (and needs no token)
    if (this.on.alerts) this._send({ action: "alerts" });  // a new connection may follow changes made meanwhile
    if (this.portfolio) this._send({ action: "subscribe", channel: "portfolio", portfolio: this.portfolio });
    this._watchdog = setInterval(() => this._checkAlive(), 5000);
  }

  _closed(ws, code, reason) {
    if (ws !== this.ws) return;  // a socket we already gave up on
    this._cleanup();
    if (this.state === NEED_TOKEN) return;  // waiting for the user, not for a timer
    const why = reason || `closed (${code})`;
    switch (code) {
      case 1001: {  // the relay is shutting down: come back after the pause it asked for
        // Between one and two pauses, so that every page of a restarted relay does not come back
        // in the same millisecond; never sooner than the backoff.
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
        this._setState(STOPPED, why);  // a client bug: retrying in a loop would not help
        return;
      default:  // 4008 (too slow), 1006 (connection lost), anything else: back off and resume
        this._retry(this._backoff(), code === 1006 ? "connection lost" : why);
    }
  }

  _retry(delayMs, why) {
    clearTimeout(this._timer);
    this.retryAt = performance.now() + delayMs;
    this._setState(RECONNECTING, why);
    this._timer = setTimeout(() => this._connect(), delayMs);
  }

  _backoff() {
    const cap = Math.min(BACKOFF_MAX_MS, BACKOFF_INITIAL_MS * 2 ** this._attempt);
    this._attempt = Math.min(this._attempt + 1, 30);
    return cap / 2 + (Math.random() * cap) / 2;  // jittered: many pages do not come back in step
  }

  _needToken(reason) {
    this.token = null;
    this._detach(1000, "token needed");
    this._setState(NEED_TOKEN, reason);
    this.on.needToken?.(reason);
  }

  /** Stop listening to the current socket (if any) and close it; no reconnect is scheduled. */
  _detach(code, reason) {
    const ws = this.ws;
    this._cleanup();
    clearTimeout(this._timer);
    if (ws) {
      ws.onopen = ws.onmessage = ws.onclose = null;
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
  }

  _checkAlive() {
    const now = performance.now();
    if (this._pingAt && now - this._pingAt > PONG_TIMEOUT_MS) {
      this._detach(4000, "no reply to ping");
      this._retry(this._backoff(), "no reply from the relay");
    } else if (!this._pingAt && now - this._heardAt > PING_AFTER_MS) {
      this._pingAt = now;
      this._send({ action: "ping" });
    }
  }

  _ready() {
    return this.ws !== null && this.ws.readyState === WebSocket.OPEN;
  }

  _send(msg) {
    this.ws.send(JSON.stringify(msg));
  }

  _subscribe(symbols, resume) {
    for (const chunk of chunks(symbols)) {
      const msg = { action: "subscribe", symbols: chunk };
      if (resume && this.epoch !== null) {
        const since = {};
        let any = false;
        for (const s of chunk) {
          const seq = this.lastSeq.get(s);
          if (seq !== undefined) {
            since[s] = seq;
            any = true;
          }
        }
        if (any) {
          msg.since = since;
          msg.epoch = this.epoch;
        }
      }
      this._send(msg);
    }
  }

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
  }

  // ------------------------------------------------------------------ messages
  _received(ws, data) {
    if (ws !== this.ws) return;
    this._heardAt = performance.now();
    this._pingAt = 0;
    this.frames++;
    let parsed;
    try {
      parsed = JSON.parse(data);
    } catch {
      return;  // the relay sends JSON only; nothing sensible to do with anything else
    }
    if (Array.isArray(parsed)) {  // ?batch=1: one frame, many messages
      for (const msg of parsed) {
        this._handle(msg);
        if (ws !== this.ws) return;  // that message ended this connection: the rest is moot
      }
    } else {
      this._handle(parsed);
    }
  }

  _handle(msg) {
    switch (msg.type) {
      case "price_update":
        this._update(msg);
        return;
      case "subscribed":
        if (msg.epoch) this._adoptEpoch(msg.epoch);
        this._live();
        this.on.subscribed?.(msg);
        return;
      case "unsubscribed":
        for (const s of msg.symbols) this.unsubscribedAt[s] = this.received[s] ?? 0;
        this._live();
        return;
      case "authenticated": {
        const refresh = this.authenticated;
        this.authenticated = true;
        this._acceptedToken = this.token;
        this._live();
        this._armExpiry(msg.expires_at);
        // A refreshed token may name another user: their rules, not the previous one's.
        if (refresh && this.on.alerts) this._send({ action: "alerts" });
        this.on.authenticated?.(msg);
        return;
      }
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
        if (msg.scope === "relay" && msg.state === "closing") {
          this._retryAfterMs = msg.retry_after_ms ?? null;
        }
        this.on.status?.(msg);
        return;
      case "error":
        this._error(msg);
        return;
      default:  // pong, subscriptions, and whatever a newer relay adds
        this._live();
    }
  }

  _update(msg) {
    const symbol = msg.symbol;
    this.received[symbol] = (this.received[symbol] ?? 0) + 1;
    if (!this.symbols.has(symbol)) return;  // removed while it was in flight
    if (msg.epoch !== this.epoch) this._adoptEpoch(msg.epoch);
    const last = this.lastSeq.get(symbol);
    if (last !== undefined && msg.seq <= last) return;  // never a step back
    this.lastSeq.set(symbol, msg.seq);
    this._live();
    this.on.update?.(msg);
  }

  _adoptEpoch(epoch) {
    if (epoch === this.epoch) return;
    // A new sequence space (the relay restarted): old seq values mean nothing in it.
    this.epoch = epoch;
    this.lastSeq.clear();
  }

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
        if (msg.action === "auth") this.token = this._acceptedToken;  // a refused refresh: keep the old one
        break;
      default:
        break;
    }
    this.on.error?.(msg);
  }

  _armExpiry(expiresAt) {
    clearTimeout(this._expiryTimer);
    if (typeof expiresAt !== "number") return;
    const warnIn = expiresAt * 1000 - Date.now() - EXPIRY_WARNING_MS;
    if (warnIn > 2 ** 31 - 1) return;  // beyond what setTimeout can wait (~24 days)
    this._expiryTimer = setTimeout(() => this.on.expiring?.(expiresAt), Math.max(0, warnIn));
  }
}

function chunks(symbols) {
  const out = [];
  for (let i = 0; i < symbols.length; i += MAX_PER_REQUEST) out.push(symbols.slice(i, i + MAX_PER_REQUEST));
  return out;
}
