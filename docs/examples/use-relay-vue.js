// useRelay(url, symbols): a Vue 3 composable over the official client (@trio-relay/client). Plain JS.
//
//   <script setup>
//   import { ref } from "vue";
//   import { useRelay } from "./use-relay-vue.js";
//   const symbols = ref(["AAPL", "MSFT"]);
//   const { prices, connection, stale } = useRelay("http://127.0.0.1:8000", symbols);
//   </script>
//   <template>
//     <p>{{ connection }}</p>
//     <ul><li v-for="p in prices" :key="p.symbol" :class="{ stale: stale.includes(p.symbol) }">
//       {{ p.symbol }} {{ p.last_price }} ({{ p.bid_price }} / {{ p.ask_price }})</li></ul>
//   </template>
//
// `symbols` may be an array or a ref of one: changing the ref subscribes and unsubscribes on
// the same connection. The connection closes when the component is unmounted.

import { isRef, onUnmounted, ref, shallowRef, unref, watch } from "vue";
import { RelayClient } from "@trio-relay/client";

/**
 * @param {string} url the relay's price socket
 * @param {string[] | import("vue").Ref<string[]>} symbols
 * @param {object} [options] passed to RelayClient (transport, token, batch...), plus `delivery`:
 *   the delivery options of the symbols (maxRate, fields, delta)
 */
export function useRelay(url, symbols, options = {}) {
  // shallowRef: a price_update is replaced whole, never mutated, so deep reactivity is waste.
  const prices = shallowRef({});
  const connection = ref("connecting");
  const upstream = ref("up");
  const stale = ref([]);
  const error = ref(null);

  let pending = {};
  let scheduled = false;
  const flush = () => {
    scheduled = false;
    prices.value = { ...prices.value, ...pending };
    pending = {};
  };

  const { delivery, ...clientOptions } = options;
  const client = new RelayClient(
    url,
    {
      update: (price) => {
        // Many updates per second: one reactive change per animation frame (deltas come merged).
        pending[price.symbol] = price;
        if (!scheduled) {
          scheduled = true;
          (typeof requestAnimationFrame === "function" ? requestAnimationFrame : (fn) => setTimeout(fn, 16))(flush);
        }
      },
      status: (status) => {
        if (status.scope === "upstream") upstream.value = status.state;
        if (status.scope === "symbols") {
          stale.value =
            status.state === "stale"
              ? [...new Set([...stale.value, ...status.symbols])]
              : stale.value.filter((s) => !status.symbols.includes(s));
        }
      },
      error: (e) => {
        error.value = e;
      },
      state: () => {
        connection.value = client.state;
      },
    },
    clientOptions,
  );
  client.add(unref(symbols), delivery);
  client.start();

  if (isRef(symbols)) {
    watch(
      symbols,
      (list) => {
        client.setSymbols(list, delivery);
        const wanted = new Set(list.map((s) => s.toUpperCase()));
        prices.value = Object.fromEntries(Object.entries(prices.value).filter(([s]) => wanted.has(s)));
      },
      { deep: true },
    );
  }

  onUnmounted(() => client.stop());

  return { prices, connection, upstream, stale, error, client };
}
