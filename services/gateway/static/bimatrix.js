/*
 * The page of the `bimatrix` experiment: a mixed-strategy slider (the probability of the first
 * action), the 2×2 matrix from this member's side with each cell shaded by how likely it is
 * now and the most likely one outlined, the expected flow payoff, and the group's mixes over
 * the period. The flow payoff shown here is computed as the server computes it (PROTOCOL v1.1
 * "Built-in experiments"); the period payoff at the end is the server's.
 */
import { decisionsChart, formatNumber, h, startPage } from "./page.js";

// Names of the two actions of the named games (action 0 is "the first action").
const ACTIONS = {
  prisoners_dilemma: ["Cooperate", "Defect"],
  stag_hunt: ["Stag", "Hare"],
  hawk_dove: ["Hawk", "Dove"],
  matching_pennies: ["Heads", "Tails"],
};

let slider = null;
let matrixBody = null;
let colHeads = [];
let expectedEl = null;
let otherEl = null;

function number(v, fallback) {
  return typeof v === "number" && isFinite(v) ? v : fallback;
}

/** This member's side: {row: am I the row player, p: my mix, q: the others' (mean) mix}. */
function sides(page) {
  const members = page.members();
  const me = page.me();
  const decisions = page.client.state.groupDecisions;
  const initial = number(page.config.params.initial_decision, 0.5);
  const mine = number(decisions[me], initial);
  const others = members.filter((m) => m !== me).map((m) => number(decisions[m], initial));
  const q = others.length ? others.reduce((a, b) => a + b, 0) / others.length : initial;
  // Two members: member 1 plays the rows, member 2 the columns. More: everyone plays the rows
  // against the others' mean mix (the matrix is symmetric then).
  const column = members.length === 2 && page.idInGroup(me) === 2;
  return { column, p: mine, q };
}

/** matrix[r][c] = [row's payoff, column's payoff]; seen from this member: mine first. */
function cell(matrix, mineAction, theirAction, column) {
  return column ? [matrix[theirAction][mineAction][1], matrix[theirAction][mineAction][0]] :
    matrix[mineAction][theirAction];
}

function expected(matrix, side) {
  let total = 0;
  for (let a = 0; a < 2; a++) {
    for (let b = 0; b < 2; b++) {
      const weight = (a === 0 ? side.p : 1 - side.p) * (b === 0 ? side.q : 1 - side.q);
      total += weight * cell(matrix, a, b, side.column)[0];
    }
  }
  return total;
}

function matrixOf(page) {
  const m = page.config.params.payoff_matrix;
  return Array.isArray(m) ? m : [[[3, 3], [0, 5]], [[5, 0], [1, 1]]];
}

function actionNames(page) {
  const game = page.config.params.game;
  if (ACTIONS[game]) return ACTIONS[game];
  // No game named and the default matrix: the default game, the prisoner's dilemma.
  const pd = [[[3, 3], [0, 5]], [[5, 0], [1, 1]]];
  return JSON.stringify(matrixOf(page)) === JSON.stringify(pd) ? ACTIONS.prisoners_dilemma :
    ["A", "B"];
}

startPage({
  title: "Bimatrix game",
  mount(page) {
    const names = actionNames(page);
    slider = page.slider({
      min: 0,
      max: 1,
      step: 0.01,
      initial: number(page.config.params.initial_decision, 0.5),
      label: `Your probability of playing ${names[0]}, from 0 to 1`,
      minLabel: names[1],
      maxLabel: names[0],
      format(v) {
        return `${Math.round(v * 100)}%`;
      },
      help: `Slide right to play ${names[0]} more often, left to play ${names[1]} more often. ` +
        "You can change your mix at any time while the period is running.",
    });
    const head = h("tr", {}, h("td", { class: "corner", text: "You ↓ · Others →" }));
    colHeads = [0, 1].map((b) => {
      const th = h("th", { scope: "col", "data-action": String(b) });
      head.append(th);
      return th;
    });
    matrixBody = h("tbody");
    [0, 1].forEach((a) => {
      const tr = h("tr", { "data-action": String(a) },
        h("th", { scope: "row", "data-action": String(a) }));
      [0, 1].forEach((b) => {
        tr.append(h("td", { "data-cell": `${a}${b}` }));
      });
      matrixBody.append(tr);
    });
    const table = h("table", { class: "matrix", id: "matrix" },
      h("caption", { class: "visually-hidden",
        text: "Payoffs: your payoff first, the others' second. Shading: how likely each " +
          "outcome is now; outlined: the most likely." }),
      h("thead", {}, head), matrixBody);
    expectedEl = h("dd", { id: "expected-payoff", text: "–" });
    otherEl = h("dd", { id: "others-mix", text: "–" });
    const stats = h("dl", { class: "stats" },
      h("div", { class: "stat" }, h("dt", { text: "Your expected payoff now" }), expectedEl),
      h("div", { class: "stat" },
        h("dt", { text: `Others play ${names[0]}` }), otherEl));
    page.el.experiment.append(...slider.nodes, table, stats);
  },
  render(page) {
    slider.render();
    const names = actionNames(page);
    const matrix = matrixOf(page);
    const side = sides(page);
    const mineP = [side.p, 1 - side.p];
    const theirP = [side.q, 1 - side.q];
    let best = null;
    colHeads.forEach((th, b) => {
      th.textContent = `${names[b]} (${Math.round(theirP[b] * 100)}%)`;
    });
    [...matrixBody.rows].forEach((tr, a) => {
      const rowHead = tr.cells[0];
      rowHead.textContent = `${names[a]} (${Math.round(mineP[a] * 100)}%)`;
      rowHead.classList.toggle("current", mineP[a] > 0.5);
      [0, 1].forEach((b) => {
        const td = tr.cells[b + 1];
        const pay = cell(matrix, a, b, side.column);
        const mass = mineP[a] * theirP[b];
        td.replaceChildren(h("span", { class: "mine", text: formatNumber(pay[0], 1) }),
          `, ${formatNumber(pay[1], 1)}`);
        td.style.setProperty("--mass", String(0.08 + 0.5 * mass));
        td.dataset.mass = mass.toFixed(3);
        td.setAttribute("aria-label", `You ${names[a]}, others ${names[b]}: ` +
          `you get ${formatNumber(pay[0], 1)}, they get ${formatNumber(pay[1], 1)}; ` +
          `${Math.round(mass * 100)}% likely now`);
        if (best === null || mass > best.mass) best = { mass, td };
      });
    });
    matrixBody.querySelectorAll("td").forEach((td) => {
      const current = td === best.td;
      td.classList.toggle("current", current);
      if (current) td.setAttribute("aria-current", "true");
      else td.removeAttribute("aria-current");
    });
    colHeads.forEach((th, b) => {
      th.classList.toggle("current", theirP[b] > 0.5);
    });
    expectedEl.textContent = formatNumber(expected(matrix, side));
    otherEl.textContent = `${Math.round(side.q * 100)}%`;
  },
  formatDecision(value) {
    return typeof value === "number" ? `${Math.round(value * 100)}%` : "–";
  },
  chart: decisionsChart({
    caption: "How often each member plays the first action, over the period",
    yLabel: "probability",
    range: [0, 1],
  }),
});
