/*
 * The page of the `double_auction` experiment (PROTOCOL v1.1): order entry (a bid for buyers,
 * odd members; an ask for sellers, even members) with price and quantity, the live book with
 * a Cancel button on one's own orders, the trade tape, one's own position and profit, and the
 * trade prices over the period with the best bid and ask. Position and profit are summed here
 * from the `trade` broadcasts this page saw (buyer_value − price per unit bought, price −
 * seller_cost per unit sold, as the server does); the period payoff at the end is the server's.
 *
 * The book a `book` broadcast carries lists only the best `book_depth` entries per side, with
 * `bids_total` / `asks_total` (PROTOCOL v2), so this page knows its own open orders from what it
 * did (PROTOCOL v2: "from its own orders, cancels and the trades that name it"): an order it
 * sent is open until a trade fills it, its cancel leaves, or an `error` answers it; a book that
 * shows one of them gives its quantity, and a book that would have to show one and does not
 * (the whole side is listed, or it is better than the last entry listed) says it is gone.
 * They are kept in sessionStorage with the period, so a reload keeps them; "Your open orders"
 * lists them, with Cancel, whether or not the book's depth reaches them.
 *
 * The role (buyer or seller) follows from id_in_group, which a seat in the lobby (grouping
 * "arrival") learns only from its group's hello: the texts that name it are set in render.
 */
import { formatNumber, h, startPage } from "./page.js";

const MAX_TAPE = 50;

const EMPTY_BOOK = { bids: [], asks: [], bids_total: 0, asks_total: 0 };

let book = EMPTY_BOOK;
let mine = {}; // seq -> {seq, price, quantity}: this page's open orders, as far as it knows
let cancels = {}; // seq of a cancel frame -> the order it cancels (restored if refused)
let minePeriod = null;
let trades = []; // this period's trades seen by this page, oldest first
let tradesPeriod = null;
const el = {};

function isBuyer(page) {
  return page.idInGroup(page.me()) % 2 === 1;
}

function values(page) {
  const p = page.config.params;
  return {
    buyerValue: typeof p.buyer_value === "number" ? p.buyer_value : 100,
    sellerCost: typeof p.seller_cost === "number" ? p.seller_cost : 0,
  };
}

function position(page) {
  const me = page.me();
  const v = values(page);
  let units = 0;
  let profit = 0;
  trades.forEach((t) => {
    if (t.buyer === me) {
      units += t.quantity;
      profit += (v.buyerValue - t.price) * t.quantity;
    } else if (t.seller === me) {
      units += t.quantity;
      profit += (t.price - v.sellerCost) * t.quantity;
    }
  });
  return { units, profit };
}

function storageKey(page) {
  return `canopy.auction.${page.me()}`;
}

function saveMine(page) {
  try {
    window.sessionStorage.setItem(storageKey(page),
      JSON.stringify({ period: minePeriod, orders: mine }));
  } catch {
    // No storage (private mode, quota): the orders are still known until a reload.
  }
}

function loadMine(page, period) {
  mine = {};
  minePeriod = period;
  try {
    const saved = JSON.parse(window.sessionStorage.getItem(storageKey(page)) || "null");
    if (saved && saved.period === period && saved.orders) mine = saved.orders;
  } catch {
    mine = {};
  }
}

function resetMine(page, period) {
  mine = {};
  cancels = {};
  minePeriod = period;
  saveMine(page);
}

function mySide(page) {
  return isBuyer(page) ? "bids" : "asks";
}

function better(side, price, other) {
  return side === "bids" ? price > other : price < other;
}

/** What a book (a broadcast or hello's) says about this page's own orders. */
function reconcile(page, b) {
  const side = mySide(page);
  const listed = b[side] || [];
  const total = typeof b[`${side}_total`] === "number" ? b[`${side}_total`] : listed.length;
  const me = page.me();
  const shown = {};
  const cancelling = {};
  Object.keys(cancels).forEach((c) => { cancelling[cancels[c].seq] = true; });
  listed.forEach((e) => {
    if (e.participant !== me || cancelling[e.seq]) return; // its cancel is on its way
    shown[e.seq] = true;
    mine[e.seq] = { seq: e.seq, price: e.price, quantity: e.quantity };
  });
  const last = listed.length ? listed[listed.length - 1].price : null;
  Object.keys(mine).forEach((seq) => {
    if (shown[seq]) return;
    const o = mine[seq];
    // Not listed although it would have to be: filled or cancelled while this page was away.
    // (An order not applied yet comes back with the next book that lists it.)
    if (listed.length >= total || (last !== null && better(side, o.price, last))) {
      delete mine[seq];
    }
  });
  saveMine(page);
}

function onTrade(page, t) {
  const me = page.me();
  const seq = t.buyer === me ? t.bid_seq : t.seller === me ? t.ask_seq : null;
  const o = seq === null ? null : mine[seq];
  if (!o) return;
  o.quantity -= t.quantity;
  if (o.quantity <= 0) delete mine[seq];
  saveMine(page);
}

function onError(page, p) {
  if (!p || typeof p.seq !== "number") return;
  if (mine[p.seq]) {
    delete mine[p.seq]; // the order was refused
    el.note.textContent = `Order ${p.seq} was refused: ${p.message || p.code}.`;
  } else if (cancels[p.seq]) {
    // A cancel refused as invalid: that order is not open any more. Anything else (the flood
    // limit, say): it still is.
    const o = cancels[p.seq];
    if (p.code !== "invalid_decision" && p.code !== "period_not_running") mine[o.seq] = o;
  }
  delete cancels[p.seq];
  saveMine(page);
}

function cancelOrder(page, o) {
  const seq = page.client.send("cancel", { seq: o.seq });
  cancels[seq] = o;
  delete mine[o.seq];
  saveMine(page);
  render(page);
}

function placeOrder(page) {
  const price = parseFloat(el.price.value);
  const quantity = Number(el.quantity.value);
  if (!(price > 0) || !isFinite(price)) {
    el.note.textContent = "Enter a price above 0.";
    el.price.focus();
    return;
  }
  if (!Number.isInteger(quantity) || quantity < 1) {
    el.note.textContent = "Enter a whole number of units, at least 1.";
    el.quantity.focus();
    return;
  }
  const side = isBuyer(page) ? "bid" : "ask";
  const seq = page.client.send("orders", { side, price, quantity });
  mine[seq] = { seq, price, quantity };
  saveMine(page);
  render(page);
  el.note.textContent =
    `Sent your ${side} (order ${seq}): ${quantity} at ${formatNumber(price)}.`;
}

function bookTable(page, side) {
  const entries = book[side] || [];
  const me = page.me();
  let rows = entries.map((e) => {
    const own = e.participant === me;
    return h("tr", { class: own ? "mine" : "", "data-seq": String(e.seq),
      "data-participant": e.participant },
      h("td", { text: formatNumber(e.price) }),
      h("td", { text: String(e.quantity) }),
      h("td", { text: own ? "you" : page.playerName(e.participant) }));
  });
  if (!rows.length) rows = [h("tr", {}, h("td", { colspan: "3", class: "empty", text: "none" }))];
  return rows;
}

function bookCaption(side, label) {
  const listed = (book[side] || []).length;
  const total = typeof book[`${side}_total`] === "number" ? book[`${side}_total`] : listed;
  return label + (total > listed ? ` (best ${listed} of ${total})` : ` (${total})`);
}

function myOrders(page) {
  const running = page.running();
  const side = mySide(page);
  const orders = Object.keys(mine).map((seq) => mine[seq]);
  // Best first, as the book lists them; earlier first at equal prices.
  orders.sort((a, b) =>
    a.price === b.price ? a.seq - b.seq : (better(side, a.price, b.price) ? -1 : 1));
  let rows = orders.map((o) => {
    const action = h("button", { type: "button", class: "cancel", disabled: !running,
      "aria-label": `Cancel your order ${o.seq}: ${o.quantity} at ${formatNumber(o.price)}`,
      text: "Cancel" });
    action.addEventListener("click", () => {
      cancelOrder(page, o);
    });
    return h("tr", { class: "mine", "data-seq": String(o.seq) },
      h("td", { text: formatNumber(o.price) }),
      h("td", { text: String(o.quantity) }),
      h("td", {}, action));
  });
  if (!rows.length) rows = [h("tr", {}, h("td", { colspan: "3", class: "empty", text: "none" }))];
  return rows;
}

function renderTape(page) {
  const me = page.me();
  let items = trades.slice(-MAX_TAPE).reverse().map((t) => {
    const mine = t.buyer === me || t.seller === me;
    const who = t.buyer === me ? "you bought" : t.seller === me ? "you sold" :
      `${page.playerName(t.buyer)} bought from ${page.playerName(t.seller)}`;
    return h("li", { class: mine ? "mine" : "", "data-price": String(t.price) },
      `${t.quantity} at ${formatNumber(t.price)} (${who})`);
  });
  if (!items.length) items = [h("li", { class: "empty", text: "No trades yet." })];
  el.tape.replaceChildren(...items);
}

/** The texts that depend on the role, when it is known or changed (the group's hello). */
function renderRole(page) {
  const role = page.idInGroup(page.me()) < 1 ? "" : isBuyer(page) ? "buyer" : "seller";
  if (el.form.dataset.role === role) return;
  el.form.dataset.role = role;
  const buyer = role === "buyer";
  const v = values(page);
  el.submit.textContent = buyer ? "Place bid" : "Place ask";
  el.form.setAttribute("aria-label", buyer ? "Place a bid" : "Place an ask");
  el.priceLabel.textContent = buyer ? "Price you pay" : "Price you ask";
  el.unitsLabel.textContent = buyer ? "Units bought" : "Units sold";
  el.role.textContent = role === "" ? "Your role comes with your group." : buyer ?
    `You are a buyer: each unit is worth ${formatNumber(v.buyerValue)} to you, so you ` +
      "earn that minus the price for every unit you buy." :
    `You are a seller: each unit costs you ${formatNumber(v.sellerCost)}, so you earn ` +
      "the price minus that for every unit you sell.";
}

function render(page) {
  if (!el.mine) return; // not mounted yet
  renderRole(page);
  const running = page.running();
  el.price.disabled = el.quantity.disabled = el.submit.disabled = !running;
  ["bids", "asks"].forEach((side) => {
    el[`${side}Heading`].textContent = bookCaption(side, el[`${side}Heading`].dataset.label);
    const key = JSON.stringify(book[side] || []);
    if (el[side].dataset.key === key) return; // rebuilt only when it changed
    el[side].dataset.key = key;
    el[side].replaceChildren(...bookTable(page, side));
  });
  // Rebuilt only when it changed, and a focused Cancel button keeps the focus (keyboard).
  const key = JSON.stringify(mine) + running;
  if (el.mine.dataset.key !== key) {
    el.mine.dataset.key = key;
    const focused = document.activeElement;
    const focusedSeq = focused && el.mine.contains(focused) ?
      focused.closest("tr").dataset.seq : null;
    el.mine.replaceChildren(...myOrders(page));
    if (focusedSeq) {
      const again = el.mine.querySelector(`tr[data-seq="${focusedSeq}"] button`);
      (again || el.price).focus();
    }
  }
  renderTape(page);
  const pos = position(page);
  el.units.textContent = String(pos.units);
  el.profit.textContent = formatNumber(pos.profit);
  el.spread.textContent = `${formatNumber(best("bids"))} / ${formatNumber(best("asks"))}`;
}

function best(side) {
  const entries = book[side] || [];
  return entries.length ? entries[0].price : null;
}

startPage({
  title: "Double auction",
  mount(page) {
    el.role = h("p", { id: "role", class: "help" });
    el.price = h("input", { id: "order-price", type: "number", min: "0.01", step: "0.01",
      inputmode: "decimal", required: true, disabled: true });
    el.quantity = h("input", { id: "order-quantity", type: "number", min: "1", step: "1",
      value: "1", inputmode: "numeric", required: true, disabled: true });
    el.submit = h("button", { type: "submit", id: "order-submit", disabled: true });
    el.note = h("p", { id: "order-note", class: "help", "aria-live": "polite" });
    el.priceLabel = h("label", { for: "order-price" });
    const form = h("form", { class: "inline-form", id: "order-form", novalidate: true },
      h("div", { class: "field" }, el.priceLabel, el.price),
      h("div", { class: "field" }, h("label", { for: "order-quantity", text: "Units" }),
        el.quantity),
      el.submit);
    el.form = form;
    form.addEventListener("submit", (event) => {
      event.preventDefault();
      placeOrder(page);
    });

    el.units = h("dd", { id: "position-units", text: "0" });
    el.profit = h("dd", { id: "position-profit", text: "0.00" });
    el.spread = h("dd", { id: "spread", text: "–" });
    el.unitsLabel = h("dt");
    const stats = h("dl", { class: "stats" },
      h("div", { class: "stat" }, el.unitsLabel, el.units),
      h("div", { class: "stat" }, h("dt", { text: "Your profit" }), el.profit),
      h("div", { class: "stat" }, h("dt", { text: "Best bid / ask" }), el.spread));

    function sideTable(side, caption) {
      const body = h("tbody", { id: `${side}-body` });
      el[side] = body;
      el[`${side}Heading`] = h("h3", { id: `${side}-heading`, text: caption });
      el[`${side}Heading`].dataset.label = caption;
      return h("div", {}, el[`${side}Heading`],
        h("table", { class: "book-table", id: `${side}-table`,
          "aria-labelledby": `${side}-heading` },
          h("thead", {}, h("tr", {}, h("th", { scope: "col", text: "Price" }),
            h("th", { scope: "col", text: "Units" }), h("th", { scope: "col", text: "Who" }))),
          body));
    }
    el.mine = h("tbody", { id: "mine-body" });
    const own = h("div", { class: "own-orders" },
      h("h3", { id: "mine-heading", text: "Your open orders" }),
      h("table", { class: "book-table", id: "mine-table", "aria-labelledby": "mine-heading" },
        h("thead", {}, h("tr", {}, h("th", { scope: "col", text: "Price" }),
          h("th", { scope: "col", text: "Units" }),
          h("th", { scope: "col" }, h("span", { class: "visually-hidden", text: "Action" })))),
        el.mine));
    el.tape = h("ul", { id: "tape", class: "tape", "aria-label": "Trades, newest first" });
    const market = h("div", { class: "market" }, sideTable("bids", "Bids (buyers)"),
      sideTable("asks", "Asks (sellers)"));
    const tape = h("div", { class: "tape-box" }, h("h3", { text: "Trades" }), el.tape);
    page.el.experiment.querySelector("h2").textContent = "Your orders";
    page.el.experiment.append(el.role, form, el.note, stats, own, market, tape);
    renderRole(page);

    const client = page.client;
    client.on("hello", (p) => {
      book = p && p.book ? p.book : EMPTY_BOOK;
      const period = client.state.period;
      const number = period ? period.number : null;
      if (number !== tradesPeriod) {
        trades = [];
        tradesPeriod = number;
      }
      if (number !== minePeriod) loadMine(page, number);
      // A paused period keeps its book; a period not started or ended has none.
      if (period && (period.state === "running" || period.state === "paused")) {
        reconcile(page, book);
      } else {
        resetMine(page, number);
      }
    });
    client.on("period_start", (p) => {
      book = EMPTY_BOOK;
      trades = [];
      tradesPeriod = p.period;
      resetMine(page, p.period);
    });
    client.on("period_end", (p) => {
      book = EMPTY_BOOK;
      resetMine(page, p.period);
    });
    client.on("book", (p, ts) => {
      book = p;
      reconcile(page, p);
      page.chart.record(ts, [null, best("bids"), best("asks")]);
    });
    client.on("trade", (p, ts) => {
      trades.push(p);
      onTrade(page, p);
      page.chart.record(ts, [p.price, best("bids"), best("asks")]);
    });
    client.on("error", (p) => {
      onError(page, p);
    });
  },
  render,
  formatDecision(value, member, page) {
    return page.idInGroup(member) % 2 === 1 ? "buyer" : "seller";
  },
  barWidth() {
    return null;
  },
  chart: {
    caption: "Trade prices, best bid and best ask over the period",
    yLabel: "price",
    range: null,
    series() {
      return [
        { label: "Trades", color: "#b45309", points: true },
        { label: "Best bid", color: "#1d4ed8" },
        { label: "Best ask", color: "#be123c" },
      ];
    },
    sample() {
      return [null, best("bids"), best("asks")];
    },
  },
});
