// The dashboard page: a symbol list (kept in localStorage), a live table, a chart per selected
// row, the user's alert rules and the alerts they fired, and the connection's state. Messages
// are applied to plain objects (Quote) and the DOM is touched once per animation frame, only where something changed: 50 symbols updating many
// times a second cost one small render per frame, not one per message.

import { Chart } from "./chart.js";
import { CONNECTING, LIVE, NEED_TOKEN, RECONNECTING, RelayFeed, STOPPED, SYMBOL_RE } from "./feed.js";
import { PortfolioPanel } from "./portfolio.js";
import { Quote } from "./quotes.js";

const SYMBOLS_KEY = "trio-relay.symbols";  // localStorage: the list survives reloads
const TOKEN_KEY = "trio-relay.token";  // sessionStorage: the token does not outlive the tab
const BROWSER_KEY = "trio-relay.browser";  // localStorage: this browser's own id (auth off)
const MAX_SYMBOLS = 500;  // clients.max_symbols_per_client (default)
// A changed price's cell is tinted this long (a faint tint: at 50 updates/s longer flashes
// would keep half the table coloured); never with prefers-reduced-motion.
const FLASH_MS = 250;
const FLASH_GAP_MS = 1000;  // a cell flashes at most once a second, however often it changes
const reducedMotion = window.matchMedia?.("(prefers-reduced-motion: reduce)");
const MAX_FIRED = 50;  // fired alerts listed (newest first); older ones drop off the end
const REFRESH_AFTER_FIRE_MS = 500;  // re-read the rules (states, counts) this long after an alert

const $ = (id) => document.getElementById(id);
const ui = {
  conn: $("conn"),
  connText: $("conn-text"),
  retry: $("retry"),
  addForm: $("add-form"),
  input: $("symbol-input"),
  symbolError: $("symbol-error"),
  changeSince: $("change-since"),
  remove: $("remove"),
  notice: $("notice"),
  tokenForm: $("token-form"),
  tokenInput: $("token-input"),
  tokenReason: $("token-reason"),
  table: $("quotes"),
  rows: $("rows"),
  empty: $("empty"),
  charts: $("charts"),
  who: $("who"),
  alertsOff: $("alerts-off"),
  alertForm: $("alert-form"),
  alertSymbol: $("alert-symbol"),
  alertSymbols: $("alert-symbols"),
  alertType: $("alert-type"),
  alertLevel: $("alert-level"),
  alertPct: $("alert-pct"),
  alertWindow: $("alert-window"),
  alertField: $("alert-field"),
  alertSpread: $("alert-spread"),
  alertSpreadUnit: $("alert-spread-unit"),
  alertSeconds: $("alert-seconds"),
  alertOneShot: $("alert-oneshot"),
  alertCooldownLabel: $("alert-cooldown-label"),
  alertCooldown: $("alert-cooldown"),
  alertError: $("alert-error"),
  alertTable: $("alert-rules"),
  alertRows: $("alert-rows"),
  alertRulesEmpty: $("alert-rules-empty"),
  fired: $("fired"),
  firedEmpty: $("fired-empty"),
};

const quotes = new Map();  // symbol → Quote, in list order
const rows = new Map();  // symbol → {tr, cells, shown}
const selected = new Set();  // symbols whose chart is open
const charts = new Map();  // symbol → Chart
const dirty = new Set();  // symbols changed since the last frame
const flashing = new Map();  // cell → when its flash ends
let structureDirty = true;  // rows or charts to add/remove/reorder
let statusDirty = true;
let upstream = { state: "up", provider: "", reason: "" };
let frame = 0;
let ticker = 0;
let noticeTimer = 0;

// Alerts: the relay's rules as it sent them (id → rule, in its order) and the fired alerts not
// yet drawn; like quotes, messages only change these and mark them, the frame draws.
const alertRules = new Map();
const alertRows = new Map();  // rule id → {tr, cells, shown}
let firedPending = [];  // fired alerts since the last frame, oldest first (at most MAX_FIRED)
let firedCount = 0;  // fired alerts received since the page loaded
let alertLists = 0;  // rule lists received since the page loaded
let alertsDirty = true;
let alertsOff = null;  // why alerts are unavailable on this relay, or null
let alertError = null;  // the last refusal of alert_create/alert_delete, shown by the form
let alertErrorDirty = false;
let alertsRefresh = 0;  // timer: ask for the rules again
let alertsRefreshAt = Infinity;

// ------------------------------------------------------------------ storage
// `which` is "localStorage" or "sessionStorage": merely reading those may throw (storage blocked).
function storageGet(which, key) {
  try {
    return window[which].getItem(key);
  } catch {
    return null;  // storage disabled: the page still works, it just forgets
  }
}

function storageSet(which, key, value) {
  try {
    if (value === null) window[which].removeItem(key);
    else window[which].setItem(key, value);
  } catch {
    // as above
  }
}

function loadSymbols() {
  try {
    const list = JSON.parse(storageGet("localStorage", SYMBOLS_KEY) || "[]");
    if (!Array.isArray(list)) return [];
    return list.filter((s) => typeof s === "string" && SYMBOL_RE.test(s)).slice(0, MAX_SYMBOLS);
  } catch {
    return [];
  }
}

function saveSymbols() {
  storageSet("localStorage", SYMBOLS_KEY, JSON.stringify([...quotes.keys()]));
}

/**
 * This browser's id: random, made once, kept in localStorage. With auth off the relay makes it
 * the owner of the alerts and portfolios made here (not everyone's "anonymous"); with auth on
 * the token decides and the relay ignores it. Storage blocked: a new id per page load.
 */
function browserId() {
  let id = storageGet("localStorage", BROWSER_KEY);
  if (!id || !/^[A-Za-z0-9_-]{16,64}$/.test(id)) {
    const bytes = crypto.getRandomValues(new Uint8Array(18));
    id = btoa(String.fromCharCode(...bytes)).replaceAll("+", "-").replaceAll("/", "_");
    storageSet("localStorage", BROWSER_KEY, id);
  }
  return id;
}

// ------------------------------------------------------------------ the feed
// Relative to this module (…/static/app.js), so the page also works behind a path prefix.
const wsUrl = new URL("../api/v2/realtime/ws/prices?batch=1", import.meta.url);
wsUrl.protocol = wsUrl.protocol === "https:" ? "wss:" : "ws:";
const BROWSER = browserId();
wsUrl.searchParams.set("browser", BROWSER);

const feed = new RelayFeed(wsUrl.href, {
  update(msg) {
    const quote = quotes.get(msg.symbol);
    if (!quote) return;
    quote.apply(msg);
    dirty.add(msg.symbol);
    requestRender();
  },
  status(msg) {
    if (msg.scope === "upstream") {
      if (msg.state === "failover") {
        showNotice(`switched provider: ${msg.reason || msg.provider}`);
        upstream = { state: "up", provider: msg.provider, reason: "" };
      } else {
        upstream = { state: msg.state, provider: msg.provider || "", reason: msg.reason || "" };
      }
      statusDirty = true;
    } else if (msg.scope === "symbols") {
      for (const symbol of msg.symbols || []) {
        const quote = quotes.get(symbol);
        if (quote) {
          quote.stale = msg.state === "stale";
          dirty.add(symbol);
        }
      }
      statusDirty = true;  // the badge reads the rows' staleness too
    } else if (msg.scope === "relay" && msg.state === "closing") {
      showNotice("the relay is restarting; reconnecting shortly");
    }
    requestRender();
  },
  subscribed(msg) {
    for (const [symbol, close] of Object.entries(msg.prev_close ?? {})) {
      const quote = quotes.get(symbol);
      if (quote && typeof close === "number") {
        quote.prevClose = close;
        dirty.add(symbol);
      }
    }
    syncChangeLabel();
    requestRender();
    if (msg.recovered === false && msg.unrecovered?.length) {
      showNotice(`resumed from the current price (updates in between not available): ${msg.unrecovered.join(", ")}`);
    }
  },
  error(msg) {
    if (typeof msg.action === "string" && (msg.action === "alerts" || msg.action.startsWith("alert_"))) {
      alertRefused(msg);
      return;
    }
    const detail = msg.retry_after_ms ? ` (retry in ${msg.retry_after_ms} ms)` : "";
    showNotice(`${msg.code}: ${msg.message}${detail}`);
  },
  state() {
    if (feed.state === CONNECTING) {
      // A new connection: the relay tells a new subscriber what is down or stale.
      upstream = { state: "up", provider: "", reason: "" };
      for (const quote of quotes.values()) {
        if (quote.stale) {
          quote.stale = false;
          dirty.add(quote.symbol);
        }
      }
    }
    if (feed.state === RECONNECTING && !ticker) {
      ticker = setInterval(() => {
        statusDirty = true;
        requestRender();
      }, 250);
    } else if (feed.state !== RECONNECTING && ticker) {
      clearInterval(ticker);
      ticker = 0;
    }
    statusDirty = true;
    requestRender();
  },
  needToken(reason) {
    storageSet("sessionStorage", TOKEN_KEY, null);
    askToken(reason);
  },
  tokenRefused() {
    storageSet("sessionStorage", TOKEN_KEY, null);
  },
  authenticated(msg) {
    storageSet("sessionStorage", TOKEN_KEY, feed.token);  // kept once the relay accepted it
    ui.tokenForm.hidden = true;
    ui.who.textContent = msg.subject && msg.expires_at ? `as ${msg.subject}` : "";
  },
  expiring(expiresAt) {
    const at = new Date(expiresAt * 1000).toLocaleTimeString();
    askToken(`the token expires at ${at}: paste a fresh one to stay connected`);
  },
  alerts(rules) {
    alertLists++;
    alertRules.clear();
    for (const rule of rules) if (rule && typeof rule.id === "string") alertRules.set(rule.id, rule);
    alertsOff = null;
    alertsDirty = true;
    scheduleCoolingRefresh();
    requestRender();
  },
  alertCreated(rule) {
    alertRules.set(rule.id, rule);
    setAlertError(null);
    alertsDirty = true;
    requestRender();
    feed.listAlerts();
  },
  alertDeleted(id) {
    alertRules.delete(id);
    alertsDirty = true;
    requestRender();
    feed.listAlerts();
  },
  portfolio(msg) {
    portfolio.show(msg);
  },
  alert(msg) {
    firedCount++;
    firedPending.push(msg);
    if (firedPending.length > MAX_FIRED) firedPending = firedPending.slice(-MAX_FIRED);
    // Until the relay's list comes back, the rule shows what it just did.
    const rule = alertRules.get(msg.rule_id);
    if (rule) {
      rule.fire_count = (rule.fire_count ?? 0) + 1;
      rule.state = rule.one_shot === false ? "cooling" : "fired";
      rule.fired_at = msg.timestamp;
      alertsDirty = true;
    }
    refreshAlertsIn(REFRESH_AFTER_FIRE_MS);
    notify(msg);
    requestRender();
  },
});

// REST calls carry what the socket carries: this browser's id and, with auth on, the token.
const apiBase = new URL("../api/v2/realtime/", import.meta.url);
const portfolio = new PortfolioPanel(
  {
    form: $("position-form"),
    symbol: $("position-symbol"),
    quantity: $("position-qty"),
    cost: $("position-cost"),
    error: $("position-error"),
    table: $("positions"),
    rows: $("position-rows"),
    empty: $("positions-empty"),
    totalValue: $("total-value"),
    totalPnl: $("total-pnl"),
    totalDay: $("total-day"),
  },
  apiBase,
  () => ({ "X-Relay-Browser": BROWSER, ...(feed.token ? { Authorization: `Bearer ${feed.token}` } : {}) }),
  (name) => feed.watchPortfolio(name),
  () => {
    portfolioDirty = true;
    requestRender();
  },
);
let portfolioDirty = false;

function askToken(reason) {
  ui.tokenReason.textContent = reason;
  ui.tokenForm.hidden = false;
  ui.tokenInput.focus();
}

// ------------------------------------------------------------------ user actions
/**
 * The symbols typed (separated by commas, semicolons or spaces; upper-cased, as the relay
 * does), or null when any of them is not a symbol the relay accepts: then nothing is added or
 * removed, the input keeps its text and says what is wrong ("bad sym!" is refused, not "BAD").
 */
function parseInput() {
  const words = ui.input.value.split(/[\s,;]+/).map((s) => s.trim().toUpperCase()).filter(Boolean);
  const bad = words.filter((s) => !SYMBOL_RE.test(s));
  if (bad.length) {
    const shown = bad.slice(0, 5).map((s) => `"${s}"`).join(", ");
    setSymbolError(`not a symbol: ${shown}. A symbol is 1-20 of A-Z 0-9 . - / ^ = (AAPL, BRK.B, ^GSPC, EURUSD)`);
    return null;
  }
  setSymbolError(null);
  return [...new Set(words)];
}

function setSymbolError(text) {
  ui.symbolError.textContent = text ?? "";
  ui.symbolError.hidden = text === null;
  if (text === null) ui.input.removeAttribute("aria-invalid");
  else ui.input.setAttribute("aria-invalid", "true");
}

function addSymbols(symbols) {
  const fresh = symbols.filter((s) => !quotes.has(s));
  const room = MAX_SYMBOLS - quotes.size;
  if (fresh.length > room) showNotice(`at most ${MAX_SYMBOLS} symbols`);
  const added = fresh.slice(0, Math.max(0, room));
  for (const s of added) quotes.set(s, new Quote(s));
  if (!added.length) return;
  feed.add(added);
  saveSymbols();
  structureDirty = true;
  syncChangeLabel();
  requestRender();
}

function removeSymbols(symbols) {
  const gone = symbols.filter((s) => quotes.has(s));
  for (const s of gone) {
    quotes.delete(s);
    selected.delete(s);
    dirty.delete(s);
  }
  if (!gone.length) return;
  feed.remove(gone);
  saveSymbols();
  structureDirty = true;
  syncChangeLabel();
  requestRender();
}

ui.addForm.addEventListener("submit", (event) => {
  event.preventDefault();
  const symbols = parseInput();
  if (symbols === null) return;
  addSymbols(symbols);
  ui.input.value = "";
});

ui.remove.addEventListener("click", () => {
  const symbols = parseInput();
  if (symbols === null) return;
  removeSymbols(symbols);
  ui.input.value = "";
});

ui.input.addEventListener("input", () => {
  if (!ui.symbolError.hidden) setSymbolError(null);
});

ui.tokenForm.addEventListener("submit", (event) => {
  event.preventDefault();
  const token = ui.tokenInput.value.trim();
  if (!token) return;
  ui.tokenInput.value = "";
  ui.tokenForm.hidden = true;
  feed.setToken(token);
});

ui.retry.addEventListener("click", () => feed.reconnectNow());

// ------------------------------------------------------------------ alerts
function alertRefused(msg) {
  if (msg.code === "unavailable") {
    alertsOff = msg.message || "alerts are off on this relay";
    alertRules.clear();
    alertsDirty = true;
    requestRender();
  } else {
    setAlertError(msg.message || msg.code);
  }
}

function setAlertError(text) {
  if (alertError === text) return;
  alertError = text;
  alertErrorDirty = true;
  requestRender();
}

/** Ask for the rules again in `delayMs` (or sooner, if a refresh is already due sooner). */
function refreshAlertsIn(delayMs) {
  const at = performance.now() + delayMs;
  if (alertsRefresh && alertsRefreshAt <= at) return;
  clearTimeout(alertsRefresh);
  alertsRefreshAt = at;
  alertsRefresh = setTimeout(() => {
    alertsRefresh = 0;
    alertsRefreshAt = Infinity;
    feed.listAlerts();
  }, delayMs);
}

// A cooling rule re-arms by itself when its cooldown ends, and nothing is pushed then: look again.
function scheduleCoolingRefresh() {
  let soonest = Infinity;
  for (const rule of alertRules.values()) {
    if (rule.state === "cooling" && typeof rule.fired_at === "number") {
      soonest = Math.min(soonest, rule.fired_at + (rule.cooldown_s ?? 0) * 1000);
    }
  }
  if (soonest === Infinity) return;
  refreshAlertsIn(Math.min(2 ** 31 - 1, Math.max(1000, soonest - Date.now() + 1000)));
}

// A desktop notification only where the user already allowed them: this page never asks.
function notify(msg) {
  if (typeof Notification === "undefined" || Notification.permission !== "granted") return;
  try {
    new Notification(`trio-relay: ${msg.symbol}`, { body: msg.message, tag: msg.rule_id });
  } catch {
    // some browsers allow notifications only from a service worker
  }
}

function numberField(input) {
  const text = input.value.trim();
  return text === "" ? undefined : Number(text);
}

/** The form as a rule; the relay validates it (and says what is wrong, shown by the form). */
function ruleFromForm() {
  const type = ui.alertType.value;
  const rule = { type };
  const symbol = ui.alertSymbol.value.trim().toUpperCase();
  if (symbol) rule.symbol = symbol;
  const params = {
    above: { level: ui.alertLevel, field: ui.alertField },
    below: { level: ui.alertLevel, field: ui.alertField },
    move: { pct: ui.alertPct, window_s: ui.alertWindow, field: ui.alertField },
    spread: { [ui.alertSpreadUnit.value]: ui.alertSpread },
    stale: { seconds: ui.alertSeconds },
  }[type];
  for (const [key, input] of Object.entries(params)) {
    const value = input.tagName === "SELECT" ? input.value : numberField(input);
    if (value !== undefined) rule[key] = value;
  }
  if (!ui.alertOneShot.checked) {
    rule.one_shot = false;
    const cooldown = numberField(ui.alertCooldown);
    if (cooldown !== undefined) rule.cooldown_s = cooldown;
  }
  return rule;
}

// The form's shape follows the chosen type; no frame needed, it is the user's own input.
function syncAlertForm() {
  const type = ui.alertType.value;
  for (const label of ui.alertForm.querySelectorAll("label[data-types]")) {
    label.hidden = !label.dataset.types.split(" ").includes(type);
  }
  ui.alertCooldownLabel.hidden = ui.alertOneShot.checked;
}

ui.alertType.addEventListener("change", syncAlertForm);
ui.alertOneShot.addEventListener("change", syncAlertForm);

ui.alertForm.addEventListener("submit", (event) => {
  event.preventDefault();
  setAlertError(null);
  if (!feed.createAlert(ruleFromForm())) setAlertError("not connected: try again once the page is live");
});

ui.alertRows.addEventListener("click", (event) => {
  const button = event.target.closest("button.drop");
  if (!button) return;
  if (!feed.deleteAlert(button.dataset.id)) setAlertError("not connected: try again once the page is live");
});

function toggleChart(symbol) {
  if (selected.has(symbol)) selected.delete(symbol);
  else selected.add(symbol);
  structureDirty = true;
  requestRender();
}

// A click anywhere on a row opens its chart; for the keyboard and screen readers the symbol is
// a button that says whether its chart is open (aria-expanded belongs on a button, not a row).
ui.rows.addEventListener("click", (event) => {
  const tr = event.target.closest("tr");
  if (!tr) return;
  if (event.target.closest("button.drop")) removeSymbols([tr.dataset.symbol]);
  else toggleChart(tr.dataset.symbol);
});

ui.charts.addEventListener("click", (event) => {
  const button = event.target.closest("button.close");
  if (button) toggleChart(button.dataset.symbol);
});

// Charts learn their size from here, never by reading layout while drawing.
const resizes = new ResizeObserver((entries) => {
  for (const entry of entries) {
    const chart = charts.get(entry.target.dataset.symbol);
    if (!chart) continue;
    chart.resize(entry.contentRect.width, entry.contentRect.height);
    dirty.add(entry.target.dataset.symbol);
  }
  requestRender();
});

// ------------------------------------------------------------------ rendering
function requestRender() {
  if (!frame) frame = requestAnimationFrame(render);
}

function render(now) {
  frame = 0;
  if (structureDirty) {
    structureDirty = false;
    buildRows();
    buildCharts();
  }
  for (const symbol of dirty) {
    const quote = quotes.get(symbol);
    if (!quote) continue;
    charts.get(symbol)?.draw(quote);
    const row = rows.get(symbol);
    if (row) updateRow(row, quote, now);
  }
  dirty.clear();
  if (statusDirty) {
    statusDirty = false;
    renderStatus(now);
  }
  if (alertsDirty) {
    alertsDirty = false;
    renderAlertRules();
  }
  if (alertErrorDirty) {
    alertErrorDirty = false;
    ui.alertError.textContent = alertError ?? "";
    ui.alertError.hidden = alertError === null;
  }
  if (firedPending.length) {
    renderFired(firedPending);
    firedPending = [];
  }
  if (portfolioDirty) {
    portfolioDirty = false;
    portfolio.render(formatPrice);
  }
  for (const [cell, until] of flashing) {
    if (until <= now) {
      cell.classList.remove("flash-up", "flash-down");
      flashing.delete(cell);
    }
  }
  if (flashing.size) requestRender();
}

function buildRows() {
  for (const [symbol, row] of rows) {
    if (!quotes.has(symbol)) {
      row.tr.remove();
      rows.delete(symbol);
    }
  }
  const ordered = [];
  for (const symbol of quotes.keys()) {
    let row = rows.get(symbol);
    if (!row) {
      row = makeRow(symbol);
      rows.set(symbol, row);
      dirty.add(symbol);  // filled in by this frame's update pass
    }
    row.tr.classList.toggle("selected", selected.has(symbol));
    row.toggle.setAttribute("aria-expanded", String(selected.has(symbol)));
    ordered.push(row.tr);
  }
  ui.rows.replaceChildren(...ordered);
  ui.empty.hidden = quotes.size > 0;
  ui.table.hidden = quotes.size === 0;
  // The watched symbols, offered by the alert form's symbol field.
  ui.alertSymbols.replaceChildren(
    ...[...quotes.keys()].map((symbol) => {
      const option = document.createElement("option");
      option.value = symbol;
      return option;
    }),
  );
}

const COLUMNS = ["symbol", "last", "bid", "ask", "change", "updated", "provider"];

function makeRow(symbol) {
  const tr = document.createElement("tr");
  tr.dataset.symbol = symbol;
  tr.title = "show or hide the chart";
  const cells = {};
  for (const name of COLUMNS) {
    const td = document.createElement(name === "symbol" ? "th" : "td");
    if (name === "symbol") td.scope = "row";
    td.className = name;
    tr.append(td);
    cells[name] = td;
  }
  const toggle = document.createElement("button");
  toggle.type = "button";
  toggle.className = "sym";
  toggle.textContent = symbol;
  toggle.setAttribute("aria-expanded", "false");
  toggle.setAttribute("aria-controls", "charts");
  toggle.title = `show or hide the ${symbol} chart`;
  cells.symbol.append(toggle);
  const parts = { changeAbs: document.createElement("span"), changePct: document.createElement("span") };
  parts.changeAbs.className = "abs";
  parts.changePct.className = "pct";
  cells.change.append(parts.changeAbs, " ", parts.changePct);
  const td = document.createElement("td");
  td.className = "remove";
  const drop = document.createElement("button");
  drop.type = "button";
  drop.className = "drop";
  drop.textContent = "×";
  drop.title = `remove ${symbol}`;
  drop.setAttribute("aria-label", `remove ${symbol}`);
  td.append(drop);
  tr.append(td);
  return { tr, toggle, cells, parts, shown: {}, values: {}, flashedAt: {}, digits: 2 };
}

function setText(row, name, text) {
  if (row.shown[name] !== text) {
    row.shown[name] = text;
    row.cells[name].textContent = text;
  }
}

function setPart(row, name, text) {
  if (row.shown[name] !== text) {
    row.shown[name] = text;
    row.parts[name].textContent = text;
  }
}

function setPrice(row, name, value, now) {
  const before = row.values[name];
  row.values[name] = value;
  // As many decimals as this symbol's prices have had (1.16310, not 1.1631 after 1.16314).
  if (value !== null) row.digits = Math.max(row.digits, decimals(value));
  setText(row, name, formatPrice(value, row.digits));
  if (reducedMotion?.matches) return;
  if (before !== undefined && before !== null && value !== null && value !== before) {
    if (now - (row.flashedAt[name] ?? -Infinity) < FLASH_GAP_MS) return;
    row.flashedAt[name] = now;
    const cell = row.cells[name];
    // A flash lasts less than the gap between two, so none is running: one class change only.
    cell.classList.add(value > before ? "flash-up" : "flash-down");
    flashing.set(cell, now + FLASH_MS);
  }
}

function updateRow(row, quote, now) {
  setPrice(row, "last", quote.last, now);
  setPrice(row, "bid", quote.bid, now);
  setPrice(row, "ask", quote.ask, now);
  const change = quote.change;
  const cell = row.cells.change;
  if (change === null) {
    setPart(row, "changeAbs", "—");
    setPart(row, "changePct", "");
  } else {
    const [abs, pct] = change;
    const sign = abs > 0 ? "+" : abs < 0 ? "−" : "";
    // Two parts, so that a narrow screen can show the percentage alone.
    setPart(row, "changeAbs", `${sign}${formatPrice(Math.abs(abs), row.digits)}`);
    const pctSign = Math.abs(pct) < 0.005 ? "" : sign;  // no "−0.00%": it rounds to nothing
    setPart(row, "changePct", `(${pctSign}${Math.abs(pct).toFixed(2)}%)`);
    const since = quote.prevClose !== null ? `close ${quote.prevClose}` : quote.firstAt;
    if (row.shown.since !== since) {
      row.shown.since = since;
      cell.title =
        quote.prevClose !== null
          ? `on the day: since the previous close, ${formatPrice(quote.prevClose, row.digits)}`
          : `since ${formatTime(quote.firstAt)}, the first price this page saw (no previous close known)`;
    }
  }
  const direction = change === null || change[0] === 0 ? "" : change[0] > 0 ? "pos" : "neg";
  if (row.shown.direction !== direction) {
    row.shown.direction = direction;
    cell.classList.toggle("pos", direction === "pos");
    cell.classList.toggle("neg", direction === "neg");
  }
  setText(row, "updated", formatTime(quote.updatedAt));
  setText(row, "provider", quote.provider);
  if (row.shown.stale !== quote.stale) {
    row.shown.stale = quote.stale;
    row.tr.classList.toggle("stale", quote.stale);
    row.tr.title = quote.stale ? "no update for a while: this price may be old" : "show or hide the chart";
  }
}

function buildCharts() {
  for (const [symbol, chart] of charts) {
    if (!selected.has(symbol)) {
      resizes.unobserve(chart.canvas);
      chart.canvas.closest(".chart").remove();
      charts.delete(symbol);
    }
  }
  const cards = [];
  for (const symbol of quotes.keys()) {
    if (!selected.has(symbol)) continue;
    let chart = charts.get(symbol);
    if (!chart) {
      chart = new Chart(makeChart(symbol));
      charts.set(symbol, chart);
      resizes.observe(chart.canvas);  // its first report sizes it and draws it
    }
    cards.push(chart.canvas.closest(".chart"));
  }
  ui.charts.replaceChildren(...cards);
  ui.charts.hidden = cards.length === 0;
}

function makeChart(symbol) {
  const card = document.createElement("figure");
  card.className = "chart";
  card.dataset.symbol = symbol;
  const caption = document.createElement("figcaption");
  const name = document.createElement("strong");
  name.textContent = symbol;
  const legend = document.createElement("span");
  legend.className = "legend";
  for (const [cls, label] of [["mid", "mid"], ["last", "last"], ["ref", "first"]]) {
    const item = document.createElement("span");
    item.className = `key ${cls}`;
    item.textContent = label;
    legend.append(item);
  }
  const close = document.createElement("button");
  close.type = "button";
  close.className = "close";
  close.dataset.symbol = symbol;
  close.textContent = "×";
  close.setAttribute("aria-label", `close the ${symbol} chart`);
  caption.append(name, legend, close);
  const canvas = document.createElement("canvas");
  canvas.dataset.symbol = symbol;
  canvas.setAttribute("role", "img");
  canvas.setAttribute("aria-label", `${symbol}: the last prices`);
  card.append(caption, canvas);
  return canvas;
}

const ALERT_COLUMNS = ["symbol", "rule", "state", "count"];

function renderAlertRules() {
  const off = alertsOff !== null;
  ui.alertsOff.hidden = !off;
  ui.alertsOff.textContent = off ? alertsOff : "";
  ui.alertForm.hidden = off;
  for (const [id, row] of alertRows) {
    if (!alertRules.has(id)) {
      row.tr.remove();
      alertRows.delete(id);
    }
  }
  const ordered = [];
  for (const [id, rule] of alertRules) {
    let row = alertRows.get(id);
    if (!row) {
      row = makeAlertRow(id);
      alertRows.set(id, row);
    }
    setText(row, "symbol", rule.symbol ?? "");
    setText(row, "rule", describeRule(rule));
    setText(row, "state", rule.state ?? "");
    setText(row, "count", String(rule.fire_count ?? 0));
    if (row.tr.dataset.state !== rule.state) row.tr.dataset.state = rule.state ?? "";
    ordered.push(row.tr);
  }
  ui.alertRows.replaceChildren(...ordered);
  ui.alertTable.hidden = off || alertRules.size === 0;
  ui.alertRulesEmpty.hidden = off || alertRules.size > 0;
}

function makeAlertRow(id) {
  const tr = document.createElement("tr");
  tr.dataset.id = id;
  const cells = {};
  for (const name of ALERT_COLUMNS) {
    const td = document.createElement(name === "symbol" ? "th" : "td");
    if (name === "symbol") td.scope = "row";
    td.className = name;
    tr.append(td);
    cells[name] = td;
  }
  const td = document.createElement("td");
  const drop = document.createElement("button");
  drop.type = "button";
  drop.className = "drop";
  drop.dataset.id = id;
  drop.textContent = "×";
  drop.title = "delete this rule";
  drop.setAttribute("aria-label", "delete this rule");
  td.append(drop);
  tr.append(td);
  return { tr, cells, shown: {} };
}

function describeRule(rule) {
  const on = rule.field && rule.field !== "last" ? ` (${rule.field})` : "";
  let text;
  switch (rule.type) {
    case "above":
    case "below":
      text = `${rule.type} ${formatPrice(rule.level)}${on}`;
      break;
    case "move":
      text = `move ${rule.pct > 0 ? "+" : ""}${rule.pct}% in ${rule.window_s}s${on}`;
      break;
    case "spread":
      text = rule.max_spread != null ? `spread > ${formatPrice(rule.max_spread)}` : `spread > ${rule.max_spread_bps} bps`;
      break;
    case "stale":
      text = `no update for ${rule.seconds}s`;
      break;
    default:
      text = String(rule.type);
  }
  if (rule.one_shot === false) text += rule.cooldown_s ? `, re-arms after ${rule.cooldown_s}s` : ", re-arms";
  return rule.name ? `${rule.name}: ${text}` : text;
}

/** Prepend `alerts` (oldest first) to the Fired list, each flashing once (a CSS animation). */
function renderFired(alerts) {
  for (const msg of alerts) {
    const li = document.createElement("li");
    li.className = "fresh";
    li.dataset.symbol = msg.symbol ?? "";
    li.dataset.ruleId = msg.rule_id ?? "";
    const time = document.createElement("time");
    time.className = "time";
    if (typeof msg.fired_at === "number") time.dateTime = new Date(msg.fired_at).toISOString();
    time.textContent = formatTime(msg.fired_at ?? null).slice(0, 8);
    const symbol = document.createElement("strong");
    symbol.className = "symbol";
    symbol.textContent = msg.symbol ?? "";
    const price = document.createElement("span");
    price.className = "price";
    price.textContent = formatPrice(msg.price ?? null);
    const text = document.createElement("span");
    text.className = "message";
    text.textContent = msg.name ? `${msg.name}: ${msg.message}` : msg.message ?? "";
    li.append(time, symbol, price, text);
    ui.fired.prepend(li);
  }
  while (ui.fired.childElementCount > MAX_FIRED) ui.fired.lastElementChild.remove();
  ui.firedEmpty.hidden = ui.fired.childElementCount > 0;
}

function renderStatus(now) {
  let state = feed.state;
  let text;
  let title = feed.detail;
  switch (state) {
    case CONNECTING:
      text = "connecting…";
      break;
    case RECONNECTING: {
      const seconds = Math.max(0, Math.ceil((feed.retryAt - now) / 1000));
      text = `reconnecting in ${seconds}s`;
      if (feed.detail) text += ` (${feed.detail})`;
      break;
    }
    case NEED_TOKEN:
      text = "token needed";
      break;
    case STOPPED:
      text = `stopped: ${feed.detail}`;
      break;
    default: {
      // Connected. The badge says what the prices are worth: "down" (the relay lost its
      // provider: nothing moves), "stale" (the provider is silent, or every row is stale: the
      // prices may be old), or "live" (with how many rows are stale, if any).
      const staleRows = [...quotes.values()].filter((quote) => quote.stale).length;
      const why = `${upstream.provider || "the provider"}${upstream.reason ? ` — ${upstream.reason}` : ""}`;
      if (upstream.state === "down") {
        state = "upstream-down";
        text = `down: ${why}`;
      } else if (upstream.state === "stale") {
        state = "stale";
        text = `stale: ${why}`;
      } else if (quotes.size > 0 && staleRows === quotes.size) {
        // Every row the relay has flagged stale: whatever the upstream reports, nothing here is
        // live, and the badge must not say otherwise.
        state = "stale";
        text = "stale: no updates for any symbol";
      } else {
        text = staleRows ? `live (${staleRows} stale)` : "live";
      }
      if (state !== LIVE) title = text;
    }
  }
  if (ui.conn.dataset.state !== state) ui.conn.dataset.state = state;
  if (ui.connText.textContent !== text) ui.connText.textContent = text;
  ui.conn.title = title || "";
  ui.retry.hidden = !(state === RECONNECTING || state === STOPPED);
  // Prices that are not being updated (no socket, no upstream) look it.
  ui.table.classList.toggle("offline", state !== LIVE);
}

function showNotice(text) {
  ui.notice.textContent = text;
  ui.notice.hidden = false;
  clearTimeout(noticeTimer);
  noticeTimer = setTimeout(() => (ui.notice.hidden = true), 8000);
}

// ------------------------------------------------------------------ formatting
/** The decimals a price needs (2 to 6): 277.45 → 2, 1.08453 → 5, 0.000123 → 6. */
function decimals(value) {
  let digits = 2;
  while (digits < 6 && Math.abs(value * 10 ** digits - Math.round(value * 10 ** digits)) > 1e-6) digits++;
  return digits;
}

function formatPrice(value, digits = 0) {
  if (value === null || value === undefined) return "—";
  return value.toFixed(Math.max(digits, decimals(value)));
}

const pad = (n, width = 2) => String(n).padStart(width, "0");

function formatTime(ms) {
  if (ms === null) return "—";
  const d = new Date(ms);
  return `${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}.${pad(d.getMilliseconds(), 3)}`;
}

// ------------------------------------------------------------------ start
// For tests and the curious: the feed's counters and the page's state, read-only by intent.
window.relayDashboard = {
  get state() {
    return ui.conn.dataset.state;
  },
  get received() {
    return { ...feed.received };
  },
  get unsubscribedAt() {
    return { ...feed.unsubscribedAt };
  },
  get symbols() {
    return [...quotes.keys()];
  },
  updates(symbol) {
    return quotes.get(symbol)?.updates ?? 0;
  },
  get alertRules() {
    return [...alertRules.values()].map((rule) => ({ ...rule }));
  },
  get firedCount() {
    return firedCount;
  },
  get alertLists() {
    return alertLists;
  },
};

const started = new Date();
// "on the day" when every row knows its previous close, else since this page opened.
function syncChangeLabel() {
  const all = [...quotes.values()];
  const onTheDay = all.length > 0 && all.every((q) => q.prevClose !== null);
  ui.changeSince.textContent = onTheDay ? "on the day" : `since ${pad(started.getHours())}:${pad(started.getMinutes())}`;
}
syncChangeLabel();
const initial = loadSymbols();
for (const s of initial) quotes.set(s, new Quote(s));
feed.add(initial);
feed.token = storageGet("sessionStorage", TOKEN_KEY);
syncAlertForm();
feed.start();
portfolio.start();
requestRender();
