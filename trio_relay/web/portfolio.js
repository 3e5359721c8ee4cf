// The portfolio panel: one portfolio ("main") of the page's user, edited over REST and valued
// live by the relay (the WebSocket `portfolio` channel, followed by the feed). Messages only
// store the latest valuation; render() draws it, from the page's animation frame.

const NAME = "main";

export class PortfolioPanel {
  /**
   * @param {object} ui the panel's elements (see index.html)
   * @param {URL} base the REST prefix (…/api/v2/realtime/)
   * @param {() => object} headers the headers every request needs (browser id, token)
   * @param {(name: string) => void} watch asks the feed for this portfolio's valuations
   * @param {() => void} changed asks the page for a frame
   */
  constructor(ui, base, headers, watch, changed) {
    this.ui = ui;
    this.base = base;
    this.url = new URL(`portfolios/${NAME}`, base);
    this.headers = headers;
    this.watch = watch;
    this.changed = changed;
    this.exists = false;  // the relay has this portfolio (its first position creates it)
    this.valuation = null;  // the latest one, not yet drawn (or null)
    this.drawn = null;
    this.error = null;
    ui.form.addEventListener("submit", (event) => {
      event.preventDefault();
      this.setPosition(ui.symbol.value.trim().toUpperCase(), ui.quantity.value, ui.cost.value);
    });
    ui.rows.addEventListener("click", (event) => {
      const button = event.target.closest("button.drop");
      if (button) this.setPosition(button.dataset.symbol, "0", "0");
    });
  }

  /** Load the portfolio if it exists (from the list: no 404 for a new user), and follow it. */
  async start() {
    const list = await this._fetch("GET", new URL("portfolios", this.base));
    if (list === null) return;
    if (!list.ok) {
      await this._refused(list);
      return;
    }
    const { portfolios } = await list.json();
    this.exists = Array.isArray(portfolios) && portfolios.some((p) => p.name === NAME);
    if (!this.exists) return;
    const response = await this._fetch("GET", this.url);
    if (response?.ok) this.show(await response.json());
    this.watch(NAME);
  }

  /** A valuation from the relay (REST or the portfolio channel). */
  show(valuation) {
    this.valuation = valuation;
    this.changed();
  }

  /** Set (or with quantity 0, remove) a position; the portfolio is created with its first one. */
  async setPosition(symbol, quantity, cost) {
    const body = { quantity: Number(quantity), cost_basis: Number(cost || 0) };
    if (!symbol || quantity === "" || !Number.isFinite(body.quantity)) {
      this._setError("a position needs a symbol and a quantity");
      return;
    }
    let response;
    if (this.exists) {
      const position = new URL(`portfolios/${NAME}/positions/${encodeURIComponent(symbol)}`, this.base);
      response = await this._fetch("PUT", position, body);
    } else {  // no portfolio yet: created with this position
      const first = { name: NAME, positions: [{ symbol, ...body }] };
      response = await this._fetch("POST", new URL("portfolios", this.base), first);
      if (response?.ok || response?.status === 409) this.exists = true;  // 409: made meanwhile (another tab)
    }
    if (response === null) return;
    if (!response.ok) {
      await this._refused(response);
      return;
    }
    this._setError(null);
    this.ui.form.reset();
    this.watch(NAME);
    // The channel sends the new valuation; until it does, show the one REST gives.
    const now = await this._fetch("GET", this.url);
    if (now?.ok) this.show(await now.json());
  }

  async _fetch(method, url, body) {
    try {
      const init = { method, headers: this.headers() };
      if (body !== undefined) {
        init.headers["Content-Type"] = "application/json";
        init.body = JSON.stringify(body);
      }
      return await fetch(url, init);
    } catch {
      this._setError("the relay cannot be reached: try again once the page is live");
      return null;
    }
  }

  async _refused(response) {
    let text = `${response.status}`;
    try {
      const body = await response.json();
      text = body.message || body.error || text;
    } catch {
      // not JSON: the status says enough
    }
    this._setError(response.status === 503 ? `portfolios are off on this relay (${text})` : text);
  }

  _setError(text) {
    this.error = text;
    this.changed();
  }

  /** Draw what changed since the last frame. `format` formats a price. */
  render(format) {
    const ui = this.ui;
    ui.error.textContent = this.error ?? "";
    ui.error.hidden = this.error === null;
    const v = this.valuation;
    if (v === this.drawn) return;
    this.drawn = v;
    const positions = v?.positions ?? [];
    ui.table.hidden = positions.length === 0;
    ui.empty.hidden = positions.length > 0;
    ui.rows.replaceChildren(...positions.map((p) => row(p, format)));
    const t = v?.totals;
    ui.totalValue.textContent = t ? money(t.market_value) : "";
    ui.totalPnl.textContent = t ? signed(t.unrealised_pnl, t.unrealised_pnl_pct) : "";
    ui.totalDay.textContent = t ? signed(t.day_change) : "";
    tone(ui.totalPnl, t?.unrealised_pnl);
    tone(ui.totalDay, t?.day_change);
  }
}

function row(p, format) {
  const tr = document.createElement("tr");
  tr.dataset.symbol = p.symbol;
  const cells = [
    ["symbol", p.symbol, "th"],
    ["qty", String(p.quantity)],
    ["price", p.price == null ? "—" : format(p.price)],
    ["value", p.market_value == null ? "—" : money(p.market_value)],
    ["pnl", p.unrealised_pnl == null ? "—" : signed(p.unrealised_pnl, p.unrealised_pnl_pct)],
    ["day", p.day_change == null ? "—" : signed(p.day_change, p.day_change_pct)],
  ];
  for (const [name, text, tag] of cells) {
    const cell = document.createElement(tag ?? "td");
    if (tag === "th") cell.scope = "row";
    cell.className = name;
    cell.textContent = text;
    tr.append(cell);
  }
  tone(tr.querySelector(".pnl"), p.unrealised_pnl);
  tone(tr.querySelector(".day"), p.day_change);
  const td = document.createElement("td");
  const drop = document.createElement("button");
  drop.type = "button";
  drop.className = "drop";
  drop.dataset.symbol = p.symbol;
  drop.textContent = "×";
  drop.setAttribute("aria-label", `remove the ${p.symbol} position`);
  td.append(drop);
  tr.append(td);
  return tr;
}

function money(v) {
  const text = Math.abs(v).toLocaleString("en-US", { minimumFractionDigits: 2, maximumFractionDigits: 2 });
  return v < 0 ? `−${text}` : text;  // a true minus sign, as the quotes table writes it
}

function signed(v, pct) {
  if (v == null) return "—";
  const sign = v > 0 ? "+" : v < 0 ? "−" : "";
  const text = `${sign}${money(Math.abs(v))}`;
  return pct == null ? text : `${text} (${sign}${Math.abs(pct).toFixed(2)}%)`;
}

function tone(cell, v) {
  cell.classList.toggle("pos", v > 0);
  cell.classList.toggle("neg", v < 0);
}
