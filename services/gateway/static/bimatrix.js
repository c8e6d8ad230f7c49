/*
 * The page of the `bimatrix` experiment: a mixed-strategy slider (the probability of the first
 * action), the 2×2 matrix from this member's side with each cell shaded by how likely it is
 * now and the most likely one outlined, the expected flow payoff, and the group's mixes over
 * the period. The flow payoff shown here is computed as the server computes it (PROTOCOL v1.1
 * "Built-in experiments"); the period payoff at the end is the server's.
 */
import { decisionsChart, formatNumber, h, startPage } from "./page.js";

// Names of the two actions of the named games (action 0 is "the first action").
var ACTIONS = {
  prisoners_dilemma: ["Cooperate", "Defect"],
  stag_hunt: ["Stag", "Hare"],
  hawk_dove: ["Hawk", "Dove"],
  matching_pennies: ["Heads", "Tails"],
};

var slider = null;
var matrixBody = null;
var colHeads = [];
var expectedEl = null;
var otherEl = null;

function number(v, fallback) {
  return typeof v === "number" && isFinite(v) ? v : fallback;
}

/** This member's side: {row: am I the row player, p: my mix, q: the others' (mean) mix}. */
function sides(page) {
  var members = page.members();
  var me = page.me();
  var decisions = page.client.state.groupDecisions;
  var initial = number(page.config.params.initial_decision, 0.5);
  var mine = number(decisions[me], initial);
  var others = members.filter(function (m) {
    return m !== me;
  }).map(function (m) {
    return number(decisions[m], initial);
  });
  var q = others.length ? others.reduce(function (a, b) { return a + b; }, 0) / others.length :
    initial;
  // Two members: member 1 plays the rows, member 2 the columns. More: everyone plays the rows
  // against the others' mean mix (the matrix is symmetric then).
  var column = members.length === 2 && page.idInGroup(me) === 2;
  return { column: column, p: mine, q: q };
}

/** matrix[r][c] = [row's payoff, column's payoff]; seen from this member: mine first. */
function cell(matrix, mineAction, theirAction, column) {
  return column ? [matrix[theirAction][mineAction][1], matrix[theirAction][mineAction][0]] :
    matrix[mineAction][theirAction];
}

function expected(matrix, side) {
  var total = 0;
  for (var a = 0; a < 2; a++) {
    for (var b = 0; b < 2; b++) {
      var weight = (a === 0 ? side.p : 1 - side.p) * (b === 0 ? side.q : 1 - side.q);
      total += weight * cell(matrix, a, b, side.column)[0];
    }
  }
  return total;
}

function matrixOf(page) {
  var m = page.config.params.payoff_matrix;
  return Array.isArray(m) ? m : [[[3, 3], [0, 5]], [[5, 0], [1, 1]]];
}

function actionNames(page) {
  var game = page.config.params.game;
  if (ACTIONS[game]) return ACTIONS[game];
  // No game named and the default matrix: the default game, the prisoner's dilemma.
  var pd = [[[3, 3], [0, 5]], [[5, 0], [1, 1]]];
  return JSON.stringify(matrixOf(page)) === JSON.stringify(pd) ? ACTIONS.prisoners_dilemma :
    ["A", "B"];
}

startPage({
  title: "Bimatrix game",
  mount: function (page) {
    var names = actionNames(page);
    slider = page.slider({
      min: 0,
      max: 1,
      step: 0.01,
      initial: number(page.config.params.initial_decision, 0.5),
      label: "Your probability of playing " + names[0] + ", from 0 to 1",
      minLabel: names[1],
      maxLabel: names[0],
      format: function (v) {
        return Math.round(v * 100) + "%";
      },
      help: "Slide right to play " + names[0] + " more often, left to play " + names[1] +
        " more often. You can change your mix at any time while the period is running.",
    });
    var head = h("tr", {}, h("td", { class: "corner", text: "You ↓ · Others →" }));
    colHeads = [0, 1].map(function (b) {
      var th = h("th", { scope: "col", "data-action": String(b) });
      head.append(th);
      return th;
    });
    matrixBody = h("tbody");
    [0, 1].forEach(function (a) {
      var tr = h("tr", { "data-action": String(a) },
        h("th", { scope: "row", "data-action": String(a) }));
      [0, 1].forEach(function (b) {
        tr.append(h("td", { "data-cell": a + "" + b }));
      });
      matrixBody.append(tr);
    });
    var table = h("table", { class: "matrix", id: "matrix" },
      h("caption", { class: "visually-hidden",
        text: "Payoffs: your payoff first, the others' second. Shading: how likely each " +
          "outcome is now; outlined: the most likely." }),
      h("thead", {}, head), matrixBody);
    expectedEl = h("dd", { id: "expected-payoff", text: "–" });
    otherEl = h("dd", { id: "others-mix", text: "–" });
    var stats = h("dl", { class: "stats" },
      h("div", { class: "stat" }, h("dt", { text: "Your expected payoff now" }), expectedEl),
      h("div", { class: "stat" },
        h("dt", { text: "Others play " + names[0] }), otherEl));
    page.el.experiment.append.apply(page.el.experiment, slider.nodes.concat([table, stats]));
  },
  render: function (page) {
    slider.render();
    var names = actionNames(page);
    var matrix = matrixOf(page);
    var side = sides(page);
    var mineP = [side.p, 1 - side.p];
    var theirP = [side.q, 1 - side.q];
    var best = null;
    colHeads.forEach(function (th, b) {
      th.textContent = names[b] + " (" + Math.round(theirP[b] * 100) + "%)";
    });
    Array.prototype.forEach.call(matrixBody.rows, function (tr, a) {
      var rowHead = tr.cells[0];
      rowHead.textContent = names[a] + " (" + Math.round(mineP[a] * 100) + "%)";
      rowHead.classList.toggle("current", mineP[a] > 0.5);
      [0, 1].forEach(function (b) {
        var td = tr.cells[b + 1];
        var pay = cell(matrix, a, b, side.column);
        var mass = mineP[a] * theirP[b];
        td.replaceChildren(h("span", { class: "mine", text: formatNumber(pay[0], 1) }),
          ", " + formatNumber(pay[1], 1));
        td.style.setProperty("--mass", String(0.08 + 0.5 * mass));
        td.dataset.mass = mass.toFixed(3);
        td.setAttribute("aria-label", "You " + names[a] + ", others " + names[b] + ": you get " +
          formatNumber(pay[0], 1) + ", they get " + formatNumber(pay[1], 1) + "; " +
          Math.round(mass * 100) + "% likely now");
        if (best === null || mass > best.mass) best = { mass: mass, td: td };
      });
    });
    Array.prototype.forEach.call(matrixBody.querySelectorAll("td"), function (td) {
      var current = td === best.td;
      td.classList.toggle("current", current);
      if (current) td.setAttribute("aria-current", "true");
      else td.removeAttribute("aria-current");
    });
    colHeads.forEach(function (th, b) {
      th.classList.toggle("current", theirP[b] > 0.5);
    });
    expectedEl.textContent = formatNumber(expected(matrix, side));
    otherEl.textContent = Math.round(side.q * 100) + "%";
  },
  formatDecision: function (value) {
    return typeof value === "number" ? Math.round(value * 100) + "%" : "–";
  },
  chart: decisionsChart({
    caption: "How often each member plays the first action, over the period",
    yLabel: "probability",
    range: [0, 1],
  }),
});
