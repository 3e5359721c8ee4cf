// Test support for the JavaScript client under Node's test runner: a real relay process, a real
// HTTP proxy that refuses WebSocket upgrades (as some corporate proxies do), and a small
// EventSource for Node 20 (which has none; browsers use their own, as the Chromium tests do).
import { spawn } from "node:child_process";
import { mkdtempSync, rmSync } from "node:fs";
import http from "node:http";
import net from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";

const READY_LINE = "[START] trio-relay listening on";
const PYTHON = process.env.RELAY_PYTHON || new URL("../../.venv/bin/python", import.meta.url).pathname;

export async function freePort() {
  return new Promise((resolve, reject) => {
    const server = net.createServer();
    server.once("error", reject);
    server.listen(0, "127.0.0.1", () => {
      const { port } = /** @type {net.AddressInfo} */ (server.address());
      server.close(() => resolve(port));
    });
  });
}

/** `trio-relay serve --provider sim` on a free port; `await relay.stop()` at the end. */
export async function startRelay(env = {}) {
  const port = await freePort();
  const workdir = mkdtempSync(join(tmpdir(), "relay-js-"));
  const clean = Object.fromEntries(
    Object.entries(process.env).filter(([k]) => !/^(TRIO_RELAY_|FMP_|FINNHUB_|APCA_|POLYGON_|MASSIVE_)/.test(k)),
  );
  const child = spawn(PYTHON, ["-m", "trio_relay", "serve", "--port", String(port), "--provider", "sim"], {
    cwd: workdir,
    env: {
      ...clean,
      TRIO_RELAY_SIM_RATE: "50",
      TRIO_RELAY_HISTORY_BACKEND: "off",
      TRIO_RELAY_UPSTREAM_UNSUBSCRIBE_LINGER: "0",
      ...env,
    },
    stdio: ["ignore", "ignore", "pipe"],
  });
  let log = "";
  await new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`the relay did not start:\n${log}`)), 20000);
    child.stderr.setEncoding("utf8");
    child.stderr.on("data", (chunk) => {
      log += chunk;
      if (log.includes(READY_LINE)) {
        clearTimeout(timer);
        resolve(undefined);
      }
    });
    child.once("exit", (code) => reject(new Error(`the relay exited (${code}):\n${log}`)));
  });
  return {
    url: `http://127.0.0.1:${port}`,
    port,
    log: () => log,
    async stop() {
      if (child.exitCode === null) {
        const exited = new Promise((resolve) => child.once("exit", resolve));
        child.kill("SIGKILL");
        await exited;
      }
      rmSync(workdir, { recursive: true, force: true });
    },
  };
}

/**
 * A real HTTP proxy in front of `target` that passes plain requests (SSE among them) and refuses
 * every WebSocket upgrade with 403, as a proxy that blocks WebSockets does (until `blocking` is
 * set to false). `cut()` drops every connection it carries (the client sees the network go).
 */
export async function startBlockingProxy(target) {
  const upstream = new URL(target);
  const sockets = new Set();
  const server = http.createServer((req, res) => {
    const forward = http.request(
      { host: upstream.hostname, port: upstream.port, path: req.url, method: req.method, headers: req.headers },
      (answer) => {
        res.writeHead(answer.statusCode ?? 502, answer.headers);
        answer.pipe(res);
      },
    );
    forward.on("error", () => res.destroy());
    req.pipe(forward);
  });
  server.on("connection", (socket) => {
    sockets.add(socket);
    socket.on("close", () => sockets.delete(socket));
  });
  const proxy = {
    blocking: true, // false: WebSocket upgrades pass, as through a proxy that allows them
  };
  server.on("upgrade", (req, socket, head) => {
    if (proxy.blocking) {
      socket.end("HTTP/1.1 403 Forbidden\r\ncontent-length: 0\r\nconnection: close\r\n\r\n");
      return;
    }
    const upstreamSocket = net.connect(Number(upstream.port), upstream.hostname, () => {
      const lines = [`${req.method} ${req.url} HTTP/1.1`];
      for (let i = 0; i < req.rawHeaders.length; i += 2) lines.push(`${req.rawHeaders[i]}: ${req.rawHeaders[i + 1]}`);
      upstreamSocket.write(lines.join("\r\n") + "\r\n\r\n");
      upstreamSocket.write(head);
      socket.pipe(upstreamSocket).pipe(socket);
    });
    sockets.add(upstreamSocket);
    upstreamSocket.on("close", () => sockets.delete(upstreamSocket));
    upstreamSocket.on("error", () => socket.destroy());
    socket.on("error", () => upstreamSocket.destroy());
  });
  const port = await freePort();
  await new Promise((resolve) => server.listen(port, "127.0.0.1", () => resolve(undefined)));
  return Object.assign(proxy, {
    url: `http://127.0.0.1:${port}`,
    cut() {
      for (const socket of sockets) socket.destroy();
    },
    async close() {
      for (const socket of sockets) socket.destroy();
      await new Promise((resolve) => server.close(() => resolve(undefined)));
    },
  });
}

/**
 * Enough of the browser's EventSource for the client, over fetch: named events, `id:`, the
 * reconnect with `Last-Event-ID` after `retry:` ms, readyState CONNECTING (0) / OPEN (1) /
 * CLOSED (2), and "error" events (CLOSED after an HTTP error, as browsers do).
 */
export class NodeEventSource {
  constructor(url) {
    this.url = url;
    this.readyState = 0;
    this.lastEventId = "";
    this.retry = 1000;
    this.listeners = new Map();
    this.controller = null;
    this.reconnects = 0;
    this.#run();
  }

  addEventListener(name, fn) {
    const list = this.listeners.get(name) ?? [];
    list.push(fn);
    this.listeners.set(name, list);
  }

  close() {
    this.readyState = 2;
    this.controller?.abort();
  }

  #emit(name, event) {
    for (const fn of this.listeners.get(name) ?? []) fn(event);
  }

  async #run() {
    while (this.readyState !== 2) {
      this.controller = new AbortController();
      const headers = this.lastEventId ? { "last-event-id": this.lastEventId } : {};
      let response;
      try {
        response = await fetch(this.url, { headers, signal: this.controller.signal });
      } catch {
        response = null;
      }
      if (this.readyState === 2) return;
      if (response && !response.ok) {
        this.readyState = 2;
        this.#emit("error", { type: "error" });
        return;
      }
      if (response) {
        this.readyState = 1;
        this.#emit("open", { type: "open" });
        try {
          await this.#read(response);
        } catch {
          // the connection dropped
        }
      }
      if (this.readyState === 2) return;
      this.readyState = 0;
      this.#emit("error", { type: "error" });
      this.reconnects++;
      await new Promise((resolve) => setTimeout(resolve, this.retry));
    }
  }

  async #read(response) {
    const decoder = new TextDecoder();
    let buffer = "";
    let event = "message";
    let data = [];
    for await (const chunk of response.body) {
      buffer += decoder.decode(chunk, { stream: true });
      let newline;
      while ((newline = buffer.indexOf("\n")) >= 0) {
        const line = buffer.slice(0, newline).replace(/\r$/, "");
        buffer = buffer.slice(newline + 1);
        if (line === "") {
          if (data.length && this.readyState !== 2) this.#emit(event, { type: event, data: data.join("\n"), lastEventId: this.lastEventId });
          event = "message";
          data = [];
          continue;
        }
        if (line.startsWith(":")) continue;
        const colon = line.indexOf(":");
        const name = colon < 0 ? line : line.slice(0, colon);
        const value = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
        if (name === "data") data.push(value);
        else if (name === "event") event = value;
        else if (name === "id") this.lastEventId = value;
        else if (name === "retry" && /^\d+$/.test(value)) this.retry = Number(value);
      }
    }
  }
}

/** Resolve when `predicate()` holds (checked after every callback of the client), or fail after `ms`. */
export function waitFor(predicate, ms = 10000, what = "a condition") {
  return new Promise((resolve, reject) => {
    const started = Date.now();
    const check = () => {
      let value;
      try {
        value = predicate();
      } catch (err) {
        reject(err);
        return;
      }
      if (value) resolve(value);
      else if (Date.now() - started > ms) reject(new Error(`timed out waiting for ${what}`));
      else setTimeout(check, 10);
    };
    check();
  });
}

/** Every seq follows the one before (no gap, no repeat). */
export function contiguous(seqs) {
  return seqs.every((seq, i) => i === 0 || seq === seqs[i - 1] + 1);
}
