// What the page knows about one symbol: applied from price_update messages, read by the render
// loop. Applying is cheap and touches no DOM, so a burst of updates costs one render.

export const HISTORY = 200;  // points kept per symbol for its chart

export class Quote {
  constructor(symbol) {
    this.symbol = symbol;
    this.last = null;
    this.bid = null;
    this.ask = null;
    this.prevClose = null;  // the previous close, when the relay's provider knows it (subscribe ack)
    this.firstLast = null;  // first trade price seen this session: the reference for "change" without one
    this.firstMid = null;  // the same for the mid, while no trade has been seen
    this.firstAt = null;  // when (epoch ms, event time) the page saw the reference price
    this.updatedAt = null;  // the update's event time, epoch ms
    this.provider = "";
    this.seq = 0;
    this.stale = false;  // the relay said this symbol stopped ticking
    this.updates = 0;
    // Ring buffers of the last HISTORY mids, last prices (NaN where there was none) and event
    // times (epoch ms: the chart's time axis).
    this.times = new Float64Array(HISTORY).fill(NaN);
    this.mids = new Float64Array(HISTORY).fill(NaN);
    this.lasts = new Float64Array(HISTORY).fill(NaN);
    this.head = 0;  // next slot to write
    this.count = 0;
  }

  get mid() {
    return this.bid !== null && this.ask !== null ? (this.bid + this.ask) / 2 : null;
  }

  /**
   * [absolute, percent], or null: the change on the day when the previous close is known (the
   * relay's subscribe ack says it, where its provider knows it), else since the first price
   * this page saw (at `firstAt`).
   */
  get change() {
    const price = this.last ?? this.mid;
    if (this.prevClose !== null && price !== null && this.prevClose !== 0) {
      return [price - this.prevClose, ((price - this.prevClose) / this.prevClose) * 100];
    }
    let now = this.last;
    let first = this.firstLast;
    if (now === null || first === null) {
      now = this.mid;
      first = this.firstMid;
    }
    if (now === null || first === null || first === 0) return null;
    return [now - first, ((now - first) / first) * 100];
  }

  /** Apply one price_update (the symbol's full state after it). */
  apply(msg) {
    // A trade break ("B") carries the broken trade's price, which is not the last trade.
    if (msg.data_type !== "B") this.last = msg.last_price ?? null;
    this.bid = msg.bid_price ?? null;
    this.ask = msg.ask_price ?? null;
    this.updatedAt = msg.timestamp ?? null;
    this.provider = msg.provider ?? "";
    this.seq = msg.seq;
    this.updates++;
    const mid = this.mid;
    if (this.firstLast === null && this.last !== null) this.firstLast = this.last;
    if (this.firstMid === null && mid !== null) this.firstMid = mid;
    if (this.firstAt === null && (this.last !== null || mid !== null)) this.firstAt = this.updatedAt ?? Date.now();
    this.times[this.head] = this.updatedAt ?? NaN;
    this.mids[this.head] = mid ?? NaN;
    this.lasts[this.head] = this.last ?? NaN;
    this.head = (this.head + 1) % HISTORY;
    if (this.count < HISTORY) this.count++;
  }

  /** Calls fn(i, mid, last, time) for the stored points, oldest first (i from 0). */
  eachPoint(fn) {
    const start = (this.head - this.count + HISTORY) % HISTORY;
    for (let i = 0; i < this.count; i++) {
      const k = (start + i) % HISTORY;
      fn(i, this.mids[k], this.lasts[k], this.times[k]);
    }
  }

  /** The event times of the oldest and newest stored points (epoch ms), or null. */
  get timeSpan() {
    if (!this.count) return null;
    const newest = this.times[(this.head - 1 + HISTORY) % HISTORY];
    const oldest = this.times[(this.head - this.count + HISTORY) % HISTORY];
    return newest === newest && oldest === oldest ? [oldest, newest] : null;
  }
}
