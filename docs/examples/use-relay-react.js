// useRelay(url, symbols): a React hook over the official client (@trio-relay/client). Plain JS, no JSX.
//
//   import { createElement as h } from "react";
//   import { useRelay } from "./use-relay-react.js";
//
//   function Quotes() {
//     const { prices, connection, stale } = useRelay("http://127.0.0.1:8000", ["AAPL", "MSFT"]);
//     return h("ul", null, Object.values(prices).map((p) =>
//       h("li", { key: p.symbol, style: { opacity: stale.includes(p.symbol) ? 0.5 : 1 } },
//         `${p.symbol} ${p.last_price} (${p.bid_price} / ${p.ask_price})`)));
//   }
//
// Updates can arrive by the thousand per second: the hook collects them and re-renders at most
// once per animation frame, with the latest price of each symbol. `delivery` (e.g.
// { maxRate: 4, fields: ["last_price"], delta: true }) asks the relay to do part of that work.
// Install the client with `npm install @trio-relay/client` (its source: trio_relay/web/client/).

import { useEffect, useRef, useState } from "react";
import { RelayClient } from "@trio-relay/client";

const nextFrame =
  typeof requestAnimationFrame === "function" ? requestAnimationFrame : (fn) => setTimeout(fn, 16);

/**
 * @param {string} url the relay (http(s)://host:port) or its price socket's URL
 * @param {string[]} symbols symbols to subscribe to (changes are applied without reconnecting)
 * @param {object} [options] passed to RelayClient (transport, token, batch...), plus `delivery`:
 *   the delivery options of the symbols (maxRate, fields, delta)
 * @returns {{prices: Object<string, object>, connection: string, upstream: string,
 *   stale: string[], error: object|null}}
 */
export function useRelay(url, symbols, options = {}) {
  const [prices, setPrices] = useState({});
  const [connection, setConnection] = useState("connecting"); // connecting | live | reconnecting | token | stopped
  const [upstream, setUpstream] = useState("up");
  const [stale, setStale] = useState([]);
  const [error, setError] = useState(null);
  const clientRef = useRef(null);
  const pending = useRef({});
  const scheduled = useRef(false);
  const key = symbols.join(",");

  useEffect(() => {
    let alive = true;
    const flush = () => {
      scheduled.current = false;
      if (!alive) return;
      const batch = pending.current;
      pending.current = {};
      setPrices((old) => ({ ...old, ...batch }));
    };
    const { delivery, ...clientOptions } = options;
    const client = new RelayClient(
      url,
      {
        update: (price) => {
          pending.current[price.symbol] = price; // deltas are already merged into full prices
          if (!scheduled.current) {
            scheduled.current = true;
            nextFrame(flush);
          }
        },
        status: (status) => {
          if (status.scope === "upstream") setUpstream(status.state);
          if (status.scope === "symbols") {
            setStale((old) =>
              status.state === "stale"
                ? [...new Set([...old, ...status.symbols])]
                : old.filter((s) => !status.symbols.includes(s)),
            );
          }
        },
        error: setError,
        state: () => setConnection(client.state),
      },
      clientOptions,
    );
    client.add(symbols, delivery);
    clientRef.current = client;
    client.start();
    return () => {
      alive = false;
      client.stop();
      clientRef.current = null;
    };
    // A new URL means a new connection; symbol changes are handled below without one.
    // eslint-disable-next-line react-hooks/exhaustive-deps
  }, [url]);

  useEffect(() => {
    const client = clientRef.current;
    if (!client) return;
    client.setSymbols(symbols, options.delivery);
    const wanted = new Set(symbols.map((s) => s.toUpperCase()));
    setPrices((old) => Object.fromEntries(Object.entries(old).filter(([s]) => wanted.has(s))));
    // eslint-disable-next-line react-hooks/exhaustive-deps
  }, [key]);

  return { prices, connection, upstream, stale, error };
}
