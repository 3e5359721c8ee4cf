// A small line chart on a <canvas>, without libraries: the mid (line) and the last trade price
// (thinner line) of a symbol's stored points, with the session's first price as a dashed line.
// Colours come from CSS custom properties on the canvas (--mid, --last, --ref, --text).

import { HISTORY } from "./quotes.js";

/**
 * One symbol's chart. Drawing reads no layout and no style (both would force the browser to
 * recompute them in the middle of a frame that just changed the table): the size comes from
 * resize() (a ResizeObserver), the colours are read once, on the first draw after a resize.
 */
export class Chart {
  constructor(canvas) {
    this.canvas = canvas;
    this.width = 0;
    this.height = 0;
    this.colors = null;
  }

  /** The canvas's CSS size changed: size its bitmap for the device's pixel ratio. */
  resize(width, height) {
    const ratio = window.devicePixelRatio || 1;
    this.width = width;
    this.height = height;
    this.canvas.width = Math.round(width * ratio);
    this.canvas.height = Math.round(height * ratio);
    this.colors = null;
  }

  draw(quote) {
    if (!this.width || !this.height) return;
    if (this.colors === null) {
      const style = getComputedStyle(this.canvas);
      const color = (name, fallback) => style.getPropertyValue(name).trim() || fallback;
      this.colors = {
        mid: color("--mid", "#3b82f6"),
        last: color("--last", "#f59e0b"),
        ref: color("--ref", "#999"),
        text: color("--text", "#888"),
      };
    }
    drawChart(this.canvas.getContext("2d"), this.width, this.height, this.colors, quote);
  }
}

function drawChart(ctx, width, height, colors, quote) {
  const ratio = ctx.canvas.width / width;
  ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
  ctx.clearRect(0, 0, width, height);

  let lo = Infinity;
  let hi = -Infinity;
  quote.eachPoint((_, mid, last) => {
    for (const v of [mid, last]) {
      if (v === v) {  // not NaN
        if (v < lo) lo = v;
        if (v > hi) hi = v;
      }
    }
  });
  const ref = quote.firstLast ?? quote.firstMid;
  if (ref !== null && lo <= hi) {
    lo = Math.min(lo, ref);
    hi = Math.max(hi, ref);
  }
  ctx.font = "11px system-ui, sans-serif";
  ctx.fillStyle = colors.text;
  if (!(lo <= hi)) {
    ctx.fillText("waiting for prices…", 8, height / 2);
    return;
  }
  if (hi - lo < 1e-9) {  // a flat line: give it some room
    hi += Math.max(Math.abs(hi) * 1e-4, 1e-4);
    lo -= Math.max(Math.abs(lo) * 1e-4, 1e-4);
  }
  const top = 14;
  const bottom = height - 14;
  const y = (v) => bottom - ((v - lo) / (hi - lo)) * (bottom - top);
  // The newest point at the right edge; older ones scroll off to the left.
  const step = (width - 1) / (HISTORY - 1);
  const x = (i) => width - 1 - (quote.count - 1 - i) * step;

  if (ref !== null) {
    ctx.strokeStyle = colors.ref;
    ctx.lineWidth = 1;
    ctx.setLineDash([3, 3]);
    ctx.beginPath();
    ctx.moveTo(0, y(ref));
    ctx.lineTo(width, y(ref));
    ctx.stroke();
    ctx.setLineDash([]);
  }
  line(ctx, quote, 1, x, y, colors.mid, 1.5);
  line(ctx, quote, 2, x, y, colors.last, 1);

  ctx.fillStyle = colors.text;
  const digits = hi >= 1 ? 2 : 4;
  ctx.fillText(hi.toFixed(digits), 4, 11);
  ctx.fillText(lo.toFixed(digits), 4, height - 3);
}

function line(ctx, quote, which, x, y, strokeStyle, lineWidth) {
  ctx.strokeStyle = strokeStyle;
  ctx.lineWidth = lineWidth;
  ctx.beginPath();
  let pen = false;
  quote.eachPoint((i, mid, last) => {
    const v = which === 1 ? mid : last;
    if (v !== v) {  // NaN: a gap in this series
      pen = false;
      return;
    }
    if (pen) ctx.lineTo(x(i), y(v));
    else ctx.moveTo(x(i), y(v));
    pen = true;
  });
  ctx.stroke();
}
