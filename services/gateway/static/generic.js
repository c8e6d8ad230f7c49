/*
 * The page of an experiment without a page of its own (a plug-in), built from the decision it
 * declares (`config.decision`, services/common/decision.py; docs/pages.md):
 *
 *   number    a slider with its label and unit, or a number box for a wide range
 *   choice    radio buttons, one per labelled option
 *   mix       one slider per action, kept summing to 1 (two actions sent as the probability
 *             of the first: a single slider between them)
 *   compound  one control per field and a Send button
 *
 * plus the experiment's instructions, the other members' decisions in the same terms (label,
 * unit, option names), a chart on the declared scale, and, when the experiment has payoffs,
 * the flow payoff now, the running period payoff, and the values its declaration `shows`
 * (price, profit …). Those come from the experiment's own hooks: the page posts the group's
 * decisions to POST /p/{key}/view (services/gateway/view.py) and shows the answer, at most
 * 5 times a second. A refused decision (the declared range checked here, or any refusal the
 * server answers) is shown beside the control with its message. An experiment that declares
 * nothing gets a text box for a number or JSON text, as before.
 */
import { decisionsChart, formatNumber, h, startPage } from "./page.js";

const VIEW_INTERVAL_MS = 200;
const VIEW_RETRY_MS = 2000;
const SLIDER_POSITIONS = 1000; // beyond this many steps a slider cannot be aimed: a number box

let decl = null; // config.decision.input, or null: the text box
let control = null; // {render(page), value(), set(value)} of the control built in mount
let note = null; // the line beside the control: a refusal, or what happens next
let stats = null; // {payoff, average, shown: {name: dd}}
const sentValues = new Map(); // seq -> value this page sent, to name a refused one
let refused = null; // {value, message} of the last refusal, until the next send

// ---- numbers and names, in the declared terms ----------------------------------------

function isNumber(v) {
  return typeof v === "number" && isFinite(v);
}

/** Decimal places that show a number on this scale: its step's, else a hundredth of it. */
function digitsOf(input) {
  const step = input.step || niceStep(input);
  return Math.max(0, Math.min(6, Math.ceil(-Math.log10(step) - 1e-9)));
}

/** A slider's step for a number declared without one: about 1/100 of the range. */
function niceStep(input) {
  return Math.pow(10, Math.floor(Math.log10(input.max - input.min)) - 2);
}

function withUnit(text, unit) {
  return unit ? `${text} ${unit}` : text;
}

function percent(p) {
  return `${Math.round(p * 100)}%`;
}

function mixOf(input, value) {
  if (input.form === "first") return isNumber(value) ? [value, 1 - value] : null;
  return Array.isArray(value) && value.length === input.actions.length ? value : null;
}

function describe(input, value) {
  if (value === null || value === undefined) return "–";
  if (input.kind === "number") {
    return isNumber(value) ? withUnit(formatNumber(value, digitsOf(input)), input.unit) : "–";
  }
  if (input.kind === "choice") {
    const found = input.options.find((o) => o.value === value);
    return found ? found.label : JSON.stringify(value);
  }
  if (input.kind === "mix") {
    const mix = mixOf(input, value);
    if (!mix) return "–";
    return input.actions.map((a, i) => `${a} ${percent(mix[i])}`).join(" · ");
  }
  if (input.kind === "compound" && value && typeof value === "object") {
    return Object.keys(input.fields)
      .map((name) => `${name} ${describe(input.fields[name], value[name])}`)
      .join(" · ");
  }
  return JSON.stringify(value);
}

/** The same rules as services/common/decision.py: null when acceptable, else why not. */
function check(input, value) {
  if (input.kind === "number") {
    const wanted = withUnit(`a number from ${input.min} to ${input.max}`, input.unit);
    if (!isNumber(value) || value < input.min || value > input.max) return wanted;
    if (input.step) {
      const k = (value - input.min) / input.step;
      if (Math.abs(k - Math.round(k)) > 1e-6) return `${wanted}, in steps of ${input.step}`;
    }
    return null;
  }
  if (input.kind === "compound") {
    const names = Object.keys(input.fields);
    for (let i = 0; i < names.length; i++) {
      const problem = check(input.fields[names[i]], value[names[i]]);
      if (problem) return `${names[i]}: ${problem}`;
    }
  }
  return null;
}

/** A number on the chart: the value itself, a mix's first probability, a choice's place. */
function plotted(input, value) {
  if (input.kind === "number") return isNumber(value) ? value : null;
  if (input.kind === "mix") {
    const mix = mixOf(input, value);
    return mix ? mix[0] : null;
  }
  if (input.kind === "choice") {
    const at = input.options.map((o) => o.value).indexOf(value);
    return at >= 0 ? at : null;
  }
  if (input.kind === "compound" && value && typeof value === "object") {
    const first = firstNumber(input);
    return first ? plotted(input.fields[first], value[first]) : null;
  }
  return null;
}

function firstNumber(input) {
  return Object.keys(input.fields).find((name) => input.fields[name].kind === "number");
}

// ---- sending, and what came back ------------------------------------------------------

function send(page, value) {
  const problem = decl ? check(decl, value) : null;
  if (problem) {
    showRefusal(value, `Not sent: ${problem}.`);
    return;
  }
  refused = null;
  const seq = page.client.decide(value);
  sentValues.set(seq, value);
  while (sentValues.size > 50) sentValues.delete(sentValues.keys().next().value);
  renderNote(page);
}

function showRefusal(value, message) {
  refused = { value, message };
  note.textContent = `${decl ? describe(decl, value) : JSON.stringify(value)}: ${message}`;
  note.dataset.invalid = "true";
}

function renderNote(page) {
  if (refused) return;
  note.dataset.invalid = "";
  const pending = page.client.state.pending.filter((f) => f.channel === "decisions");
  note.textContent = pending.length ? "Sending…" : "";
}

// ---- the controls -------------------------------------------------------------------

function labelRow(text) {
  return h("p", { class: "decision-label", "aria-hidden": "true", text });
}

/** The member's own decision as the server has it, unless something of theirs is in flight. */
function serverValue(page) {
  const pending = page.client.state.pending.filter((f) => f.channel === "decisions");
  if (pending.length) return undefined;
  return page.client.state.groupDecisions[page.me()];
}

function numberBox(page, input, id, onEnter) {
  const box = h("input", { id, type: "number", inputmode: "decimal", autocomplete: "off",
    min: String(input.min), max: String(input.max), step: input.step ? String(input.step) : "any",
    class: "decision-box", disabled: true, "aria-describedby": "decision-note" });
  box.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && onEnter) {
      event.preventDefault();
      onEnter();
    }
  });
  return box;
}

function readBox(box) {
  const text = box.value.trim();
  return text === "" ? null : Number(text);
}

/** A declared number: a slider (page.js's) for a narrow range, else a number box. */
function numberControl(page, input) {
  const step = input.step || niceStep(input);
  const wide = (input.max - input.min) / step > SLIDER_POSITIONS;
  const useBox = input.control === "box" || (input.control !== "slider" && wide);
  const range = withUnit(`from ${input.min} to ${input.max}`, input.unit);
  if (!useBox) {
    const digits = digitsOf(input);
    const slider = page.slider({
      min: input.min,
      max: input.max,
      step,
      initial: input.min,
      label: `${input.label}, ${range}`,
      help: "Use the slider or the arrow keys. You can change it at any time while the " +
        "period is running.",
      format(v) { return withUnit(v.toFixed(digits), input.unit); },
      minLabel: String(input.min),
      maxLabel: String(input.max),
      onChange() {
        refused = null;
        renderNote(page);
      },
    });
    return {
      nodes: [labelRow(`${input.label}, ${range}`), ...slider.nodes],
      render() { slider.render(); },
    };
  }
  const box = numberBox(page, input, "decision-input", () => { submit(); });
  const button = h("button", { type: "button", id: "decision-send", text: "Set", disabled: true });
  function submit() {
    const value = readBox(box);
    if (value === null || !isFinite(value)) {
      showRefusal(box.value, `Not sent: type a number ${range}.`);
      return;
    }
    send(page, value);
  }
  button.addEventListener("click", submit);
  let editing = false;
  box.addEventListener("focus", () => { editing = true; });
  box.addEventListener("blur", () => { editing = false; });
  return {
    nodes: [h("label", { for: "decision-input", class: "decision-label",
      text: `${input.label}, ${range}` }),
    h("div", { class: "inline-form" }, box, input.unit ?
      h("span", { class: "unit", text: input.unit }) : null, button)],
    render() {
      const off = !page.running();
      box.disabled = off;
      button.disabled = off;
      const v = serverValue(page);
      if (!editing && !refused && isNumber(v)) box.value = String(v);
    },
  };
}

function choiceControl(page, input, name, onPick) {
  const radios = [];
  const group = h("fieldset", { class: "choices", id: name },
    h("legend", { class: "decision-label", text: input.label }));
  input.options.forEach((option, i) => {
    const id = `${name}-${i}`;
    const radio = h("input", { type: "radio", name, id, value: String(i), disabled: true });
    radio.addEventListener("change", () => {
      if (radio.checked && onPick) onPick(option.value);
    });
    radios.push(radio);
    group.append(h("label", { class: "choice", for: id }, radio, h("span", { text: option.label })));
  });
  return {
    nodes: [group],
    value() {
      const i = radios.findIndex((r) => r.checked);
      return i >= 0 ? input.options[i].value : null;
    },
    set(value) {
      radios.forEach((r, i) => { r.checked = input.options[i].value === value; });
    },
    render() {
      radios.forEach((r) => { r.disabled = !page.running(); });
    },
  };
}

/** A mix: one slider per action; moving one rescales the others so that they sum to 1. */
function mixControl(page, input, name, onRelease) {
  const n = input.actions.length;
  let shares = input.actions.map(() => 1 / n);
  let moving = false;
  const sliders = [];
  const outputs = [];
  const group = h("fieldset", { class: "mix", id: name },
    h("legend", { class: "decision-label", text: input.label }));
  const shown = input.form === "first" ? 1 : n; // two actions as one: the first's probability
  for (let i = 0; i < shown; i++) {
    const id = `${name}-${i}`;
    const slider = h("input", { type: "range", id, min: "0", max: "1", step: "0.01",
      value: String(shares[i]), disabled: true, class: "mix-slider" });
    const out = h("output", { for: id, class: "mix-share", text: percent(shares[i]) });
    const text = input.form === "first" ?
      `${input.actions[0]} (the rest: ${input.actions[1]})` : input.actions[i];
    slider.addEventListener("input", () => {
      moving = true;
      setShare(i, parseFloat(slider.value));
    });
    slider.addEventListener("change", () => {
      moving = false;
      setShare(i, parseFloat(slider.value));
      if (onRelease) onRelease(valueOf());
    });
    sliders.push(slider);
    outputs.push(out);
    group.append(h("div", { class: "slider-row" },
      h("label", { for: id, class: "mix-action", text }), slider, out));
  }

  function setShare(i, p) {
    if (input.form === "first" || n === 1) {
      shares = [p, 1 - p];
    } else {
      const rest = 1 - shares[i];
      shares = shares.map((s, j) => {
        if (j === i) return p;
        return rest > 1e-9 ? s / rest * (1 - p) : (1 - p) / (n - 1);
      });
    }
    draw();
  }

  function draw() {
    sliders.forEach((s, i) => { s.value = String(shares[i]); });
    outputs.forEach((o, i) => {
      o.textContent = input.form === "first" ? `${input.actions[0]} ${percent(shares[0])} · ` +
        `${input.actions[1]} ${percent(shares[1])}` : percent(shares[i]);
    });
  }

  function valueOf() {
    if (input.form === "first") return Math.round(shares[0] * 1e6) / 1e6;
    const rounded = shares.map((s) => Math.round(s * 1e6) / 1e6);
    const head = rounded.slice(0, -1).reduce((a, b) => a + b, 0);
    rounded[n - 1] = Math.max(0, Math.round((1 - head) * 1e6) / 1e6);
    return rounded;
  }

  return {
    nodes: [group],
    value: valueOf,
    set(value) {
      if (moving) return;
      const mix = mixOf(input, value);
      if (mix) {
        shares = mix.slice();
        draw();
      }
    },
    render() {
      sliders.forEach((s) => { s.disabled = !page.running(); });
    },
  };
}

/** Send-on-change controls for a number, a choice or a mix on its own. */
function singleControl(page, input) {
  if (input.kind === "number") return numberControl(page, input);
  const built = input.kind === "choice" ?
    choiceControl(page, input, "decision-choice", (v) => { send(page, v); }) :
    mixControl(page, input, "decision-mix", (v) => { send(page, v); });
  const render = built.render;
  built.render = () => {
    render();
    const v = serverValue(page);
    if (v !== undefined && v !== null && !refused) built.set(v);
  };
  return built;
}

/** A compound: each field's control, and one Send button for all of them. */
function compoundControl(page, input) {
  const parts = {};
  const nodes = [h("p", { class: "decision-label", text: input.label })];
  Object.keys(input.fields).forEach((name, i) => {
    const field = input.fields[name];
    const id = `decision-${i}`;
    if (field.kind === "number") {
      const box = numberBox(page, field, id, null);
      const unit = field.unit ? ` (${field.unit})` : "";
      nodes.push(h("div", { class: "field" },
        h("label", { for: id, text: `${field.label}${unit}, from ${field.min} to ${field.max}` }),
        box));
      parts[name] = {
        value() { return readBox(box); },
        set(v) { if (isNumber(v) && document.activeElement !== box) box.value = v; },
        render() { box.disabled = !page.running(); },
      };
    } else {
      const built = field.kind === "choice" ? choiceControl(page, field, id, null) :
        mixControl(page, field, id, null);
      nodes.push(...built.nodes);
      parts[name] = built;
    }
  });
  const button = h("button", { type: "button", id: "decision-send", text: "Send", disabled: true });
  button.addEventListener("click", () => {
    const value = {};
    Object.keys(parts).forEach((name) => { value[name] = parts[name].value(); });
    send(page, value);
  });
  nodes.push(button);
  let synced = false;
  return {
    nodes,
    render() {
      Object.keys(parts).forEach((name) => { parts[name].render(); });
      button.disabled = !page.running();
      const v = serverValue(page);
      if (!synced && v && typeof v === "object") {
        synced = true; // once: later on, what the member is composing wins
        Object.keys(parts).forEach((name) => { parts[name].set(v[name]); });
      }
    },
  };
}

/** No declaration: a number, or JSON text, typed in. */
function textControl(page) {
  const input = h("input", { id: "decision-input", type: "text", inputmode: "decimal",
    autocomplete: "off", "aria-describedby": "decision-help decision-note", disabled: true });
  const button = h("button", { type: "submit", id: "decision-send", text: "Send", disabled: true });
  const form = h("form", { class: "inline-form", novalidate: true },
    h("label", { for: "decision-input", text: "Your decision" }), input, button);
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    let value;
    try {
      value = JSON.parse(input.value.trim());
    } catch {
      showRefusal(input.value, "Not a valid value: type a number (like 3 or 0.5) or JSON text.");
      return;
    }
    send(page, value);
  });
  return {
    nodes: [form, h("p", { id: "decision-help", class: "help", text: "Type your decision (a " +
      "number, or JSON text) and press Enter or Send. You can change it at any time while " +
      "the period is running." })],
    render() {
      input.disabled = !page.running();
      button.disabled = !page.running();
    },
  };
}

// ---- the live values (POST /p/{key}/view) ----------------------------------------------

const view = { answer: null, key: null, busy: false, next: 0, timer: null };
const flows = new Map(); // decisions key -> my flow payoff
let segments = []; // [{at: seconds into the period, key}] since the period started
let periodSeen = null; // the period (and group) the segments belong to
let subPayoffs = []; // discrete periods: my payoffs at this period's sub-periods

function viewUrl() {
  return `${location.pathname.replace(/\/+$/, "")}/view`;
}

function decisionsKey(page) {
  const decisions = page.client.state.groupDecisions;
  const shown = {};
  page.members().forEach((m) => { shown[m] = decisions[m] === undefined ? null : decisions[m]; });
  return JSON.stringify(shown);
}

function askView(page) {
  const p = page.client.state.period;
  if (!page.config.participant || page.inLobby() || !p || !page.members().length) return;
  const key = decisionsKey(page);
  if (key === view.key || view.busy) return;
  const wait = view.next - Date.now();
  if (wait > 0) {
    if (view.timer === null) {
      view.timer = setTimeout(() => {
        view.timer = null;
        askView(page);
      }, wait);
    }
    return;
  }
  view.busy = true;
  view.next = Date.now() + VIEW_INTERVAL_MS;
  fetch(viewUrl(), {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ decisions: JSON.parse(key) }),
    credentials: "omit",
  }).then((response) => {
    if (!response.ok) throw new Error(`view ${response.status}`);
    return response.json();
  }).then((answer) => {
    view.key = key;
    view.answer = answer;
    const mine = answer && answer.payoffs ? answer.payoffs[page.me()] : undefined;
    if (isNumber(mine)) flows.set(key, mine);
  }).catch(() => {
    view.next = Date.now() + VIEW_RETRY_MS; // a lobby seat, an old gateway: try later
  }).finally(() => {
    view.busy = false;
    page.render();
  });
}

function noteSegment(page, ts) {
  const p = page.client.state.period;
  if (!p || p.state === "lobby") return;
  const group = `${page.members().join(",")}#${p.number}`;
  if (periodSeen !== group) {
    periodSeen = group;
    segments = [];
    subPayoffs = [];
  }
  let at = page.elapsed(ts);
  const key = decisionsKey(page);
  const last = segments[segments.length - 1];
  if (last && last.key === key) return;
  if (last && at < last.at) at = last.at;
  segments.push({ at, key });
}

/** The page's estimate of the period payoff so far: the time average of the flow payoffs it
 * knows (continuous), or the mean of the sub-periods' payoffs (discrete); the server's own
 * once the period ended. {value, since} (since > 0: the page joined late). */
function runningPayoff(page) {
  const p = page.client.state.period;
  if (!p) return null;
  if (p.state === "ended" && p.payoffs && isNumber(p.payoffs[page.me()])) {
    return { value: p.payoffs[page.me()], since: 0, final: true };
  }
  if ((page.config.num_subperiods || 0) > 0) {
    if (!subPayoffs.length) return null;
    const sum = subPayoffs.reduce((a, b) => a + b, 0);
    return { value: sum / subPayoffs.length, since: 0 };
  }
  const now = page.elapsed();
  let area = 0;
  let time = 0;
  segments.forEach((s, i) => {
    const end = i + 1 < segments.length ? segments[i + 1].at : now;
    if (flows.has(s.key) && end > s.at) {
      area += flows.get(s.key) * (end - s.at);
      time += end - s.at;
    }
  });
  if (time <= 0) return null;
  return { value: area / time, since: segments.length ? segments[0].at : 0 };
}

function renderStats(page) {
  const answer = view.answer;
  const me = page.me();
  const flow = answer && answer.payoffs ? answer.payoffs[me] : undefined;
  const paid = isNumber(flow);
  stats.payoffRow.hidden = !paid;
  stats.averageRow.hidden = !paid;
  if (paid) {
    stats.payoff.textContent = formatNumber(flow);
    stats.payoff.dataset.value = String(flow);
    const running = runningPayoff(page);
    stats.average.textContent = running ? formatNumber(running.value) : "–";
    stats.average.dataset.value = running ? String(running.value) : "";
    stats.averageLabel.textContent = running && running.final ? "Your payoff this period" :
      running && running.since > 1 ? "Your average since you joined" :
      "Your average this period";
  }
  Object.keys(stats.shown).forEach((name) => {
    const item = stats.shown[name];
    let value = answer && answer.shown ? answer.shown[name] : undefined;
    if (value && typeof value === "object") value = value[me];
    item.dd.textContent = isNumber(value) ?
      withUnit(formatNumber(value, item.spec.digits), item.spec.unit) : "–";
    item.dd.dataset.value = isNumber(value) ? String(value) : "";
  });
  stats.list.hidden = !paid && !Object.keys(stats.shown).length;
}

function buildStats(shows) {
  function stat(id, label) {
    const dt = h("dt", { text: label });
    const dd = h("dd", { id, text: "–" });
    return { row: h("div", { class: "stat" }, dt, dd), dt, dd };
  }
  const payoff = stat("flow-payoff", "Your payoff now");
  const average = stat("period-payoff", "Your average this period");
  const list = h("dl", { class: "stats", id: "live-values" }, payoff.row, average.row);
  const shown = {};
  shows.forEach((spec) => {
    const item = stat(`shown-${spec.name}`, spec.label);
    item.spec = spec;
    item.row.dataset.name = spec.name;
    shown[spec.name] = item;
    list.append(item.row);
  });
  return { list, payoff: payoff.dd, payoffRow: payoff.row, average: average.dd,
    averageRow: average.row, averageLabel: average.dt, shown };
}

// ---- the page -----------------------------------------------------------------------

function chartOf(decision) {
  if (!decision) return decisionsChart({ yLabel: "decision" });
  const input = decision.input;
  const base = decisionsChart();
  const chart = {
    caption: "Your group's decisions over the period",
    yLabel: input.kind === "number" ?
      withUnit(input.label, input.unit ? `(${input.unit})` : "") : input.label,
    range: null,
    series: base.series,
    sample(page) {
      const decisions = page.client.state.groupDecisions;
      return page.members().map((m) => plotted(input, decisions[m]));
    },
  };
  if (input.kind === "number") chart.range = [input.min, input.max];
  if (input.kind === "mix") {
    chart.range = [0, 1];
    chart.yLabel = `probability of ${input.actions[0]}`;
  }
  if (input.kind === "choice") {
    const n = input.options.length;
    chart.range = [-0.5, n - 0.5];
    chart.yAxis = () => ({
      splits: () => input.options.map((o, i) => i),
      values: (u, splits) => splits.map((i) => input.options[i] ? input.options[i].label : ""),
    });
  }
  if (input.kind === "compound") {
    const first = firstNumber(input);
    if (first) {
      chart.range = [input.fields[first].min, input.fields[first].max];
      chart.yLabel = input.fields[first].label;
    }
  }
  return chart;
}

const config = (() => {
  const node = document.getElementById("canopy-config");
  try {
    return node ? JSON.parse(node.textContent) || {} : {};
  } catch {
    return {};
  }
})();
const declared = config.decision && config.decision.input ? config.decision : null;

startPage({
  title: "",
  mount(page) {
    decl = declared ? declared.input : null;
    page.el.title.textContent = page.config.experiment || "Experiment";
    const card = page.el.experiment;
    if (declared && declared.instructions) {
      card.append(h("p", { id: "instructions", class: "instructions",
        text: declared.instructions }));
    }
    note = h("p", { id: "decision-note", class: "decision-note", role: "status",
      "aria-live": "polite" });
    if (!decl) control = textControl(page);
    else if (decl.kind === "compound") control = compoundControl(page, decl);
    else control = singleControl(page, decl);
    // The note right below the control, so that a refusal is seen where the value was typed.
    card.append(...control.nodes, note);
    stats = buildStats(declared ? declared.shows || [] : []);
    card.append(stats.list);
    renderStats(page);

    // What happened to what this page sent: a refusal names the value and says why.
    const decide = page.client.decide.bind(page.client);
    page.client.on("error", (err) => {
      if (!err || !sentValues.has(err.seq)) return;
      const value = sentValues.get(err.seq);
      sentValues.delete(err.seq);
      if (err.code === "too_many_messages") return; // sent again by the client
      showRefusal(value, err.message || err.code);
    });
    page.client.on("ack", () => { renderNote(page); });
    page.client.decide = (value) => {
      const seq = decide(value);
      sentValues.set(seq, value);
      return seq;
    };
    page.client.on("hello", () => { noteSegment(page); });
    page.client.on("message", (channel, payload, ts) => {
      if (channel === "period_start") {
        periodSeen = null;
        refused = null;
      }
      if (channel === "group_decisions" || channel === "period_start") noteSegment(page, ts);
      if (channel === "subperiod" && payload && payload.payoffs &&
        isNumber(payload.payoffs[page.me()])) {
        noteSegment(page, ts);
        subPayoffs.push(payload.payoffs[page.me()]);
      }
    });
  },
  render(page) {
    control.render(page);
    renderNote(page);
    askView(page);
    renderStats(page);
  },
  formatDecision(value) {
    if (!decl) {
      if (value === null || value === undefined) return "–";
      if (typeof value === "number") return value.toFixed(2);
      const text = JSON.stringify(value);
      return text.length > 24 ? `${text.slice(0, 23)}…` : text;
    }
    return describe(decl, value);
  },
  barWidth(value) {
    if (!decl) return isNumber(value) ? Math.min(1, Math.max(0, value)) : null;
    if (decl.kind === "number") {
      return isNumber(value) ? Math.min(1, Math.max(0, (value - decl.min) /
        (decl.max - decl.min))) : 0;
    }
    if (decl.kind === "mix") {
      const mix = mixOf(decl, value);
      return mix ? mix[0] : 0;
    }
    return null;
  },
  chart: chartOf(declared),
});
