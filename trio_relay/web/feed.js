// The dashboard's connection to the relay is the official JavaScript client
// (client/relay-client.js, served as /static/relay-client.js): this module only adapts its
// constructor to the page. `?transport=sse` (or `websocket`) on the page's URL forces a
// transport; by default the client uses the WebSocket and falls back to SSE by itself.
import { RelayClient } from "./relay-client.js";

export { CONNECTING, LIVE, MAX_PER_REQUEST, NEED_TOKEN, RECONNECTING, STOPPED, SYMBOL_RE } from "./relay-client.js";

export class RelayFeed extends RelayClient {
  /**
   * @param {string} url the price socket's URL
   * @param {import("./relay-client.js").Callbacks} on
   */
  constructor(url, on) {
    const forced = new URLSearchParams(location.search).get("transport");
    super(url, on, forced === "sse" || forced === "websocket" ? { transport: forced } : {});
  }
}
