// A small line chart on a <canvas>, without libraries: the mid (line) and the last trade price
// (thinner line) of a symbol's stored points against their event time (a time axis along the
// bottom, local time), with the first price the page saw as a dashed line.
// Colours come from CSS custom properties on the canvas (--mid, --last, --ref, --text).

// Time-axis steps (ms): the smallest that leaves room between two labels is used.
const STEPS = [1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600].map((s) => s * 1000);
const AXIS = 16;  // px under the plot for the time labels

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
  const bottom = height - AXIS - 4;
  const y = (v) => bottom - ((v - lo) / (hi - lo)) * (bottom - top);
  // The newest point at the right edge, the oldest stored one at the left (by event time).
  const [t0, t1] = quote.timeSpan ?? [0, 0];
  const span = Math.max(t1 - t0, 1000);
  const x = (_i, t) => width - 1 - ((t1 - t) / span) * (width - 1);

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
  const digits = hi >= 1 ? 2 : hi >= 0.01 ? 5 : 6;
  ctx.fillText(hi.toFixed(digits), 4, 11);
  ctx.fillText(lo.toFixed(digits), 4, bottom - 3);
  timeAxis(ctx, width, height, colors, t1 - span, t1, x);
}

/** Ticks and HH:MM:SS labels along the bottom, at a round step that leaves room for each. */
function timeAxis(ctx, width, height, colors, from, to, x) {
  const axisY = height - AXIS;
  ctx.strokeStyle = colors.ref;
  ctx.lineWidth = 1;
  ctx.beginPath();
  ctx.moveTo(0, axisY + 0.5);
  ctx.lineTo(width, axisY + 0.5);
  const labelWidth = ctx.measureText("00:00:00").width + 12;
  const step = STEPS.find((s) => (s / (to - from)) * width >= labelWidth) ?? STEPS[STEPS.length - 1];
  const labels = [];
  for (let t = Math.ceil(from / step) * step; t <= to; t += step) {
    const px = x(0, t);
    ctx.moveTo(Math.round(px) + 0.5, axisY);
    ctx.lineTo(Math.round(px) + 0.5, axisY + 4);
    labels.push([px, t]);
  }
  ctx.stroke();
  ctx.fillStyle = colors.text;
  ctx.textAlign = "center";
  for (const [px, t] of labels) {
    const half = labelWidth / 2 - 6;
    if (px - half < 0 || px + half > width) continue;  // no label cut at an edge
    ctx.fillText(clock(t, step), px, height - 3);
  }
  ctx.textAlign = "start";
}

const pad = (n) => String(n).padStart(2, "0");

function clock(ms, step) {
  const d = new Date(ms);
  const hm = `${pad(d.getHours())}:${pad(d.getMinutes())}`;
  return step >= 60000 ? hm : `${hm}:${pad(d.getSeconds())}`;
}

function line(ctx, quote, which, x, y, strokeStyle, lineWidth) {
  ctx.strokeStyle = strokeStyle;
  ctx.lineWidth = lineWidth;
  ctx.beginPath();
  let pen = false;
  quote.eachPoint((i, mid, last, t) => {
    const v = which === 1 ? mid : last;
    if (v !== v || t !== t) {  // NaN: a gap in this series
      pen = false;
      return;
    }
    if (pen) ctx.lineTo(x(i, t), y(v));
    else ctx.moveTo(x(i, t), y(v));
    pen = true;
  });
  ctx.stroke();
}
