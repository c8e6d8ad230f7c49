/*
 * The page of the `double_auction` experiment (PROTOCOL v1.1): order entry (a bid for buyers,
 * odd members; an ask for sellers, even members) with price and quantity, the live book with
 * a Cancel button on one's own orders, the trade tape, one's own position and profit, and the
 * trade prices over the period with the best bid and ask. Position and profit are summed here
 * from the `trade` broadcasts this page saw (buyer_value − price per unit bought, price −
 * seller_cost per unit sold, as the server does); the period payoff at the end is the server's.
 */
import { formatNumber, h, startPage } from "./page.js";

var MAX_TAPE = 50;

var book = { bids: [], asks: [] };
var trades = []; // this period's trades seen by this page, oldest first
var tradesPeriod = null;
var el = {};

function isBuyer(page) {
  return page.idInGroup(page.me()) % 2 === 1;
}

function values(page) {
  var p = page.config.params;
  return {
    buyerValue: typeof p.buyer_value === "number" ? p.buyer_value : 100,
    sellerCost: typeof p.seller_cost === "number" ? p.seller_cost : 0,
  };
}

function position(page) {
  var me = page.me();
  var v = values(page);
  var units = 0;
  var profit = 0;
  trades.forEach(function (t) {
    if (t.buyer === me) {
      units += t.quantity;
      profit += (v.buyerValue - t.price) * t.quantity;
    } else if (t.seller === me) {
      units += t.quantity;
      profit += (t.price - v.sellerCost) * t.quantity;
    }
  });
  return { units: units, profit: profit };
}

function placeOrder(page) {
  var price = parseFloat(el.price.value);
  var quantity = Number(el.quantity.value);
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
  var side = isBuyer(page) ? "bid" : "ask";
  var seq = page.client.send("orders", { side: side, price: price, quantity: quantity });
  el.note.textContent = "Sent your " + side + " (order " + seq + "): " + quantity + " at " +
    formatNumber(price) + ".";
}

function bookTable(page, side) {
  var entries = book[side] || [];
  var me = page.me();
  var running = page.running();
  var rows = entries.map(function (e) {
    var mine = e.participant === me;
    var action = mine ? h("button", { type: "button", class: "cancel", disabled: !running,
      "aria-label": "Cancel your order " + e.seq + ": " + e.quantity + " at " +
        formatNumber(e.price), text: "Cancel" }) : null;
    if (action) {
      action.addEventListener("click", function () {
        page.client.send("cancel", { seq: e.seq });
      });
    }
    return h("tr", { class: mine ? "mine" : "", "data-seq": String(e.seq),
      "data-participant": e.participant },
      h("td", { text: formatNumber(e.price) }),
      h("td", { text: String(e.quantity) }),
      h("td", { text: mine ? "you" : page.playerName(e.participant) }),
      h("td", {}, action));
  });
  if (!rows.length) rows = [h("tr", {}, h("td", { colspan: "4", class: "empty", text: "none" }))];
  return rows;
}

function renderTape(page) {
  var me = page.me();
  var items = trades.slice(-MAX_TAPE).reverse().map(function (t) {
    var mine = t.buyer === me || t.seller === me;
    var who = t.buyer === me ? "you bought" : t.seller === me ? "you sold" :
      page.playerName(t.buyer) + " bought from " + page.playerName(t.seller);
    return h("li", { class: mine ? "mine" : "", "data-price": String(t.price) },
      t.quantity + " at " + formatNumber(t.price) + " (" + who + ")");
  });
  if (!items.length) items = [h("li", { class: "empty", text: "No trades yet." })];
  el.tape.replaceChildren.apply(el.tape, items);
}

function best(side) {
  var entries = book[side] || [];
  return entries.length ? entries[0].price : null;
}

startPage({
  title: "Double auction",
  mount: function (page) {
    var buyer = isBuyer(page);
    var v = values(page);
    el.role = h("p", { id: "role", class: "help" });
    el.price = h("input", { id: "order-price", type: "number", min: "0.01", step: "0.01",
      inputmode: "decimal", required: true, disabled: true });
    el.quantity = h("input", { id: "order-quantity", type: "number", min: "1", step: "1",
      value: "1", inputmode: "numeric", required: true, disabled: true });
    el.submit = h("button", { type: "submit", id: "order-submit",
      text: buyer ? "Place bid" : "Place ask", disabled: true });
    el.note = h("p", { id: "order-note", class: "help", "aria-live": "polite" });
    var form = h("form", { class: "inline-form", id: "order-form", novalidate: true,
      "aria-label": buyer ? "Place a bid" : "Place an ask" },
      h("div", { class: "field" }, h("label", { for: "order-price",
        text: buyer ? "Price you pay" : "Price you ask" }), el.price),
      h("div", { class: "field" }, h("label", { for: "order-quantity", text: "Units" }),
        el.quantity),
      el.submit);
    form.addEventListener("submit", function (event) {
      event.preventDefault();
      placeOrder(page);
    });
    el.role.textContent = buyer ?
      "You are a buyer: each unit is worth " + formatNumber(v.buyerValue) + " to you, so you " +
        "earn that minus the price for every unit you buy." :
      "You are a seller: each unit costs you " + formatNumber(v.sellerCost) + ", so you earn " +
        "the price minus that for every unit you sell.";

    el.units = h("dd", { id: "position-units", text: "0" });
    el.profit = h("dd", { id: "position-profit", text: "0.00" });
    el.spread = h("dd", { id: "spread", text: "–" });
    var stats = h("dl", { class: "stats" },
      h("div", { class: "stat" }, h("dt", { text: buyer ? "Units bought" : "Units sold" }),
        el.units),
      h("div", { class: "stat" }, h("dt", { text: "Your profit" }), el.profit),
      h("div", { class: "stat" }, h("dt", { text: "Best bid / ask" }), el.spread));

    function sideTable(side, caption) {
      var body = h("tbody", { id: side + "-body" });
      el[side] = body;
      return h("div", {}, h("h3", { id: side + "-heading", text: caption }),
        h("table", { class: "book-table", id: side + "-table", "aria-labelledby": side +
          "-heading" },
          h("thead", {}, h("tr", {}, h("th", { scope: "col", text: "Price" }),
            h("th", { scope: "col", text: "Units" }), h("th", { scope: "col", text: "Who" }),
            h("th", { scope: "col" }, h("span", { class: "visually-hidden", text: "Action" })))),
          body));
    }
    el.tape = h("ul", { id: "tape", class: "tape", "aria-label": "Trades, newest first" });
    var market = h("div", { class: "market" }, sideTable("bids", "Bids (buyers)"),
      sideTable("asks", "Asks (sellers)"));
    var tape = h("div", { class: "tape-box" }, h("h3", { text: "Trades" }), el.tape);
    page.el.experiment.querySelector("h2").textContent = "Your orders";
    page.el.experiment.append(el.role, form, el.note, stats, market, tape);

    var client = page.client;
    client.on("hello", function (p) {
      book = p && p.book ? p.book : { bids: [], asks: [] };
      var period = client.state.period;
      if (!period || period.number !== tradesPeriod) {
        trades = [];
        tradesPeriod = period ? period.number : null;
      }
    });
    client.on("period_start", function (p) {
      book = { bids: [], asks: [] };
      trades = [];
      tradesPeriod = p.period;
    });
    client.on("period_end", function () {
      book = { bids: [], asks: [] };
    });
    client.on("book", function (p, ts) {
      book = p;
      page.chart.record(ts, [null, best("bids"), best("asks")]);
    });
    client.on("trade", function (p, ts) {
      trades.push(p);
      page.chart.record(ts, [p.price, best("bids"), best("asks")]);
    });
  },
  render: function (page) {
    var running = page.running();
    el.price.disabled = el.quantity.disabled = el.submit.disabled = !running;
    ["bids", "asks"].forEach(function (side) {
      // Rebuilt only when it changed, and a focused Cancel button keeps the focus (keyboard).
      var key = JSON.stringify(book[side] || []) + running;
      if (el[side].dataset.key === key) return;
      el[side].dataset.key = key;
      var focused = document.activeElement;
      var focusedSeq = focused && el[side].contains(focused) ?
        focused.closest("tr").dataset.seq : null;
      el[side].replaceChildren.apply(el[side], bookTable(page, side));
      if (focusedSeq) {
        var again = el[side].querySelector('tr[data-seq="' + focusedSeq + '"] button');
        (again || el.price).focus();
      }
    });
    renderTape(page);
    var pos = position(page);
    el.units.textContent = String(pos.units);
    el.profit.textContent = formatNumber(pos.profit);
    el.spread.textContent = formatNumber(best("bids")) + " / " + formatNumber(best("asks"));
  },
  formatDecision: function (value, member, page) {
    return page.idInGroup(member) % 2 === 1 ? "buyer" : "seller";
  },
  barWidth: function () {
    return null;
  },
  chart: {
    caption: "Trade prices, best bid and best ask over the period",
    yLabel: "price",
    range: null,
    series: function () {
      return [
        { label: "Trades", color: "#b45309", points: true },
        { label: "Best bid", color: "#1d4ed8" },
        { label: "Best ask", color: "#be123c" },
      ];
    },
    sample: function () {
      return [null, best("bids"), best("asks")];
    },
  },
});
