/*
 * The page of the `public_goods` experiment: a contribution slider from 0 to the endowment,
 * the group's total, this member's flow payoff now (endowment − own contribution + mpcr ×
 * total, as the server computes it: PROTOCOL v1.1 "Built-in experiments"), and everyone's
 * contributions over the period. The period payoff at the end is the server's.
 */
import { decisionsChart, formatNumber, h, startPage } from "./page.js";

let slider = null;
let totalEl = null;
let flowEl = null;
let keepEl = null;

function params(page) {
  const p = page.config.params;
  return {
    endowment: typeof p.endowment === "number" ? p.endowment : 20,
    mpcr: typeof p.mpcr === "number" ? p.mpcr : 0.4,
  };
}

function contributions(page) {
  const decisions = page.client.state.groupDecisions;
  return page.members().map((m) => {
    const v = decisions[m];
    return typeof v === "number" && isFinite(v) ? v : 0;
  });
}

/** A slider step of about 1/100 of the endowment, rounded to a power of ten. */
function stepFor(endowment) {
  return Math.pow(10, Math.floor(Math.log10(endowment)) - 2);
}

startPage({
  title: "Public goods",
  mount(page) {
    const p = params(page);
    const step = stepFor(p.endowment);
    slider = page.slider({
      min: 0,
      max: p.endowment,
      step,
      initial: 0,
      label: `Your contribution to the group account, from 0 to ${p.endowment}`,
      help: `You have ${p.endowment} points. What you put in the group account is ` +
        `multiplied by ${p.mpcr} and paid to every member; what you keep is yours. You ` +
        "can change your contribution at any time while the period is running.",
    });
    totalEl = h("dd", { id: "group-total", text: "–" });
    flowEl = h("dd", { id: "flow-payoff", text: "–" });
    keepEl = h("dd", { id: "kept", text: "–" });
    const stats = h("dl", { class: "stats" },
      h("div", { class: "stat" }, h("dt", { text: "Group total" }), totalEl),
      h("div", { class: "stat" }, h("dt", { text: "You keep" }), keepEl),
      h("div", { class: "stat" }, h("dt", { text: "Your payoff now" }), flowEl));
    page.el.experiment.append(...slider.nodes, stats);
  },
  render(page) {
    slider.render();
    const p = params(page);
    const given = contributions(page);
    const total = given.reduce((a, b) => a + b, 0);
    const mine = given[page.idInGroup(page.me()) - 1] || 0;
    totalEl.textContent =
      `${formatNumber(total)} of ${formatNumber(p.endowment * given.length, 0)}`;
    totalEl.dataset.total = String(total);
    keepEl.textContent = formatNumber(p.endowment - mine);
    flowEl.textContent = formatNumber(p.endowment - mine + p.mpcr * total);
  },
  formatDecision(value) {
    return typeof value === "number" ? formatNumber(value) : "–";
  },
  barWidth(value, page) {
    return typeof value === "number" ? Math.min(1, Math.max(0, value / params(page).endowment)) :
      0;
  },
  chart: {
    caption: "Everyone's contribution over the period",
    yLabel: "contribution",
    range(page) {
      return [0, params(page).endowment];
    },
    series(page) {
      return decisionsChart().series(page);
    },
    sample(page) {
      return contributions(page);
    },
  },
});
