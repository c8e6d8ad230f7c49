// The researcher console (console.html): sign-in, the session form built from the experiments'
// schemas (GET /api/experiments), the session list, the live monitor (SSE, GET
// /api/sessions/{id}/live with a ticket), exports and payments, the replay chart (uPlot,
// vendored), bots, an online study's link (PROTOCOL v2 "Online studies") and, for a session
// with groups formed as people arrive (`grouping: "arrival"`), its lobby: who waits since when.
// One ES module, no build step. docs/console.md describes what it does.
import uPlot from "/static/vendor/uplot/uPlot.esm.js";

const TOKEN_KEY = "canopy.adminToken";
const $ = (selector, root = document) => root.querySelector(selector);
const esc = (value) => String(value ?? "").replace(/[&<>"']/g, (c) => ({"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;"}[c]));
const short = (id) => `…${String(id).slice(-6)}`;

// -- the token: from #token= once (make run's link), then this tab's sessionStorage only -------
// A fragment never reaches a server (no access log, no ingress log keeps it), and it is taken
// off the address bar at once. A `?token=` (links from before) is dropped unused: that request
// already carried the token to the server's logs, so the console asks for it instead.

let token = "";
let signInNote = "";
{
  const fragment = new URLSearchParams(location.hash.slice(1));
  const query = new URLSearchParams(location.search);
  if (fragment.has("token") || query.has("token")) {
    if (fragment.has("token")) sessionStorage.setItem(TOKEN_KEY, fragment.get("token"));
    else signInNote = "Links with ?token= are refused (they leave the token in server logs): sign in with the token, or use a #token= link.";
    fragment.delete("token");
    query.delete("token");
    const rest = query.toString();
    const hash = fragment.toString();
    history.replaceState(null, "", location.pathname + (rest ? `?${rest}` : "") + (hash ? `#${hash}` : ""));
  }
  localStorage.removeItem(TOKEN_KEY); // the old monitor kept it across browser restarts
  token = sessionStorage.getItem(TOKEN_KEY) || "";
}

class ApiError extends Error {
  constructor(status, body) {
    const error = (body && body.error) || {};
    super(error.message || `HTTP ${status}`);
    this.status = status;
    this.code = error.code;
    this.field = error.field;
  }
}

async function api(path, options = {}) {
  const headers = {...(options.headers || {}), Authorization: `Bearer ${token}`};
  if (options.json !== undefined) headers["Content-Type"] = "application/json";
  const response = await fetch(path, {
    method: options.method || (options.json !== undefined ? "POST" : "GET"),
    headers,
    body: options.json !== undefined ? JSON.stringify(options.json) : undefined,
  });
  if (response.status === 401) {
    signOut("The token was refused: sign in again.");
    throw new ApiError(401, await response.json().catch(() => null));
  }
  if (!response.ok) throw new ApiError(response.status, await response.json().catch(() => null));
  return response;
}

function signOut(message = "") {
  token = "";
  sessionStorage.removeItem(TOKEN_KEY);
  closeMonitor();
  $("#console").hidden = true;
  $("#sign-out").hidden = true;
  $("#sign-in").hidden = false;
  $("#sign-in-error").textContent = message;
  $("#token-input").focus();
}

async function signIn(candidate) {
  token = candidate;
  let catalogue;
  try {
    catalogue = await (await api("/api/experiments")).json();
  } catch (error) {
    if (error.status !== 401) signOut(`Could not reach the store: ${error.message}`);
    return;
  }
  sessionStorage.setItem(TOKEN_KEY, token);
  $("#sign-in").hidden = true;
  $("#console").hidden = false;
  $("#sign-out").hidden = false;
  buildForm(catalogue);
  await loadSessions();
}

$("#sign-in-form").addEventListener("submit", (event) => {
  event.preventDefault();
  signIn($("#token-input").value.trim());
  $("#token-input").value = "";
});
$("#sign-out").addEventListener("click", () => signOut("Signed out."));

// -- the session form, from JSON schemas ---------------------------------------------------

const SETTING_LABELS = {
  num_participants: ["Participants", ""],
  group_size: ["Group size", ""],
  num_periods: ["Periods", ""],
  period_length: ["Period length (s)", ""],
  num_subperiods: ["Sub-periods", "0 = continuous"],
  rate_limit: ["Rate limit (s)", "min. seconds between broadcasts; 0 = every change"],
  on_disconnect: ["On disconnect", "what a running period does when a member drops"],
  carry_decisions: ["Carry decisions to the next period", ""],
  post_period_delay: ["Pause between periods (s)", ""],
  label: ["Label", ""],
  // Online studies. No "label" in these names or hints: tests find the session's Label field by that word.
  labels: ["External ids, one per seat", 'e.g. ["5f3a…", "60b1…"]: seat i gets the i-th id'],
  label_param: ["Id parameter of the study link", "PROLIFIC_PID for Prolific"],
  completion: ["Completion", 'where each outcome sends people: {"completed": {"url": "https://…"}} or {"code": "…"}; URL placeholders: docs/console.md'],
  payment: ["Payment", '{"exchange_rate": 0.01, "show_up_fee": 1.5, "currency": "GBP"}'],
  // The lobby (PROTOCOL v2 "The lobby"); the two after grouping are shown for arrival only.
  grouping: ["Grouping", "fixed: groups as created · arrival: a lobby forms each group from the first people there"],
  lobby_timeout: ["Lobby timeout (s)", "the longest anyone waits in the lobby"],
  on_lobby_timeout: ["At the lobby timeout", "release: that person finishes (outcome lobby_timeout) · bots: a group forms at once, bots in the empty places"],
  // Bots for people who leave: shown with on_disconnect "bots" only.
  dropout_grace: ["Dropout grace (s)", "how long a member is away before a bot plays for them"],
};
const ARRIVAL_ONLY = ["lobby_timeout", "on_lobby_timeout"];
const STARTING_VALUES = {num_participants: 4, group_size: 2, period_length: 60};
let experiments = {};

function resolve(schema, defs) {
  if (schema && schema.$ref) return resolve(defs[schema.$ref.split("/").pop()] || {}, defs);
  return schema || {};
}

// What kind of control a schema property gets: number, integer, enum, boolean, text, or JSON.
function describe(property, defs) {
  let schema = resolve(property, defs);
  let nullable = false;
  if (schema.anyOf) {
    const options = schema.anyOf.map((s) => resolve(s, defs));
    nullable = options.some((s) => s.type === "null");
    const rest = options.filter((s) => s.type !== "null");
    schema = rest.length === 1 ? {...rest[0], default: property.default, title: property.title} : {type: "json"};
  }
  let kind = "json";
  if (schema.enum) kind = "enum";
  else if (schema.const !== undefined) kind = "enum";
  else if (["integer", "number", "boolean", "string"].includes(schema.type)) kind = schema.type;
  return {kind, schema, nullable, default: property.default};
}

function control(name, key, property, defs, {label, help, required, prefill}) {
  const {kind, schema} = describe(property, defs);
  const id = `f-${name.replace(/\W/g, "-")}`;
  const value = prefill !== undefined ? prefill : undefined;
  const bounds = [];
  if (schema.minimum !== undefined) bounds.push(`≥ ${schema.minimum}`);
  if (schema.exclusiveMinimum !== undefined) bounds.push(`> ${schema.exclusiveMinimum}`);
  if (schema.maximum !== undefined) bounds.push(`≤ ${schema.maximum}`);
  const defaultText = property.default !== undefined && property.default !== null ? `default ${JSON.stringify(property.default)}` : "";
  const hint = [help, bounds.join(", "), prefill === undefined ? defaultText : ""].filter(Boolean).join(" · ");
  const small = hint ? `<small>${esc(hint)}</small>` : "";
  const attrs = `id="${id}" name="${esc(name)}" data-kind="${kind}"${required ? " required" : ""}`;
  if (kind === "boolean" && prefill !== undefined) {
    return `<label class="check"><input type="checkbox" ${attrs}${value ? " checked" : ""}> ${esc(label)} ${small}</label>`;
  }
  if (kind === "enum" || kind === "boolean") {
    const options = kind === "boolean" ? [true, false] : (schema.enum || [schema.const]);
    const blank = prefill === undefined ? `<option value="">${esc(defaultText || "—")}</option>` : "";
    return `<label>${esc(label)}<select ${attrs}>${blank}${options.map((o) => `<option value="${esc(JSON.stringify(o))}"${JSON.stringify(o) === JSON.stringify(value) ? " selected" : ""}>${esc(o)}</option>`).join("")}</select>${small}</label>`;
  }
  if (kind === "integer" || kind === "number") {
    const min = schema.minimum ?? schema.exclusiveMinimum;
    const step = kind === "integer" ? "1" : "any";
    const placeholder = property.default !== undefined && property.default !== null ? ` placeholder="${esc(property.default)}"` : "";
    return `<label>${esc(label)}<input type="number" step="${step}"${min !== undefined ? ` min="${esc(min)}"` : ""}${schema.maximum !== undefined ? ` max="${esc(schema.maximum)}"` : ""}${placeholder} value="${value !== undefined ? esc(value) : ""}" ${attrs}>${small}</label>`;
  }
  if (kind === "string") {
    return `<label>${esc(label)}<input type="text"${schema.maxLength ? ` maxlength="${schema.maxLength}"` : ""} value="${esc(value ?? "")}" ${attrs}>${small}</label>`;
  }
  const example = property.default !== undefined && property.default !== null ? JSON.stringify(property.default) : "";
  return `<label class="wide">${esc(label)} (JSON)<textarea ${attrs} placeholder="${esc(example)}" spellcheck="false"></textarea>${small}</label>`;
}

function buildForm(catalogue) {
  experiments = Object.fromEntries(catalogue.experiments.map((e) => [e.name, e]));
  const select = $("#experiment");
  const previous = select.value;
  select.innerHTML = catalogue.experiments.map((e) => `<option value="${esc(e.name)}">${esc(e.name)}</option>`).join("");
  if (experiments[previous]) select.value = previous;
  const schema = catalogue.session_schema;
  const defs = schema.$defs || {};
  const required = new Set(schema.required || []);
  $("#settings").innerHTML = Object.entries(schema.properties)
    .filter(([key]) => key !== "experiment" && key !== "params")
    .map(([key, property]) => {
      const [label, help] = SETTING_LABELS[key] || [property.title || key, ""];
      const prefill = property.default !== undefined ? property.default : STARTING_VALUES[key];
      return control(key, key, property, defs, {label, help, required: required.has(key), prefill});
    })
    .join("");
  const grouping = $('[name="grouping"]');
  if (grouping) grouping.addEventListener("change", showGrouping);
  const onDisconnect = $('[name="on_disconnect"]');
  if (onDisconnect) onDisconnect.addEventListener("change", showGrouping);
  showGrouping();
  showExperiment();
}

// The lobby's settings mean something only when the lobby forms the groups.
function showGrouping() {
  const grouping = $('[name="grouping"]');
  const arrival = !!grouping && grouping.value === JSON.stringify("arrival");
  for (const name of ARRIVAL_ONLY) {
    const input = $(`[name="${name}"]`);
    if (input) input.closest("label").hidden = !arrival;
  }
  // The grace before a bot takes over means something only when bots do.
  const onDisconnect = $('[name="on_disconnect"]');
  const grace = $('[name="dropout_grace"]');
  if (grace) grace.closest("label").hidden = !onDisconnect || onDisconnect.value !== JSON.stringify("bots");
}

function showExperiment() {
  const experiment = experiments[$("#experiment").value];
  if (!experiment) return;
  const rules = experiment.group_size_rules.length ? ` Groups: ${experiment.group_size_rules.join("; ")}.` : "";
  $("#experiment-about").textContent = `${experiment.description.split("\n\n")[0].replace(/\s+/g, " ")}${rules} Channels: ${experiment.channels.join(", ")}.`;
  const schema = experiment.params_schema;
  const defs = schema.$defs || {};
  const properties = Object.entries(schema.properties || {});
  $("#params").innerHTML = properties.length
    ? properties.map(([key, property]) => control(`params.${key}`, key, property, defs, {label: property.title || key, help: property.description || ""})).join("")
    : `<p class="muted">No params.</p>`;
  const size = $('[name="group_size"]');
  if (size && experiment.min_group_size && Number(size.value) < experiment.min_group_size) {
    size.value = experiment.min_group_size;
  }
}
$("#experiment").addEventListener("change", showExperiment);

// The request body; throws {field, message} for a JSON textarea that does not parse.
function formBody() {
  const body = {experiment: $("#experiment").value, params: {}};
  for (const input of $("#create").querySelectorAll("[data-kind]")) {
    input.removeAttribute("aria-invalid");
    if (input.closest("[hidden]")) continue; // a setting that does not apply (the lobby's, for fixed groups)
    const name = input.name;
    const kind = input.dataset.kind;
    let value;
    if (input.type === "checkbox") value = input.checked;
    else if (input.value === "" && kind !== "string") continue; // not given: the default
    else if (kind === "integer" || kind === "number") value = Number(input.value);
    else if (kind === "enum" || kind === "boolean") value = JSON.parse(input.value);
    else if (kind === "string") value = input.value;
    else {
      try {
        value = JSON.parse(input.value);
      } catch {
        throw {field: name, message: `${name}: not valid JSON`};
      }
    }
    if (name.startsWith("params.")) body.params[name.slice(7)] = value;
    else body[name] = value;
  }
  return body;
}

function markInvalid(field) {
  if (!field) return;
  // The error names the first offending field, maybe inside one (params.payoff_matrix.0.1).
  const inputs = [...$("#create").querySelectorAll("[data-kind]")];
  const input = inputs.find((i) => field === i.name || field.startsWith(`${i.name}.`));
  if (input) {
    input.setAttribute("aria-invalid", "true");
    input.focus();
  }
}

let createdLinks = [];
$("#create").addEventListener("submit", async (event) => {
  event.preventDefault();
  $("#create-error").textContent = "";
  let created;
  let body;
  try {
    body = formBody();
    created = await (await api("/api/sessions", {json: body})).json();
  } catch (error) {
    $("#create-error").textContent = error.message;
    markInvalid(error.field);
    return;
  }
  const groupOrder = new Map(created.groups.map((g, i) => [g.group, i])); // the monitor's order
  // Arrival grouping: no seat has a group yet, so the seats keep their order.
  const place = (p) => (p.group === null ? -1 : groupOrder.get(p.group));
  createdLinks = [...created.participants].sort((a, b) => place(a) - place(b) || (a.id_in_group || 0) - (b.id_in_group || 0));
  $("#created-id").textContent = created.session;
  // Each link holds its seat's secret key (PROTOCOL v2): hand each one to its own participant.
  const where = (p) => (p.group === null ? "no group yet (the lobby forms it)" : `group ${short(p.group)}, player ${p.id_in_group}`);
  $("#created-links").innerHTML = createdLinks.map((p) => `<li data-code="${esc(p.code)}"><a href="${esc(p.url)}" target="_blank" rel="noopener">${esc(p.url)}</a> <span class="muted">${esc(where(p))}, code <code title="${esc(p.code)}">${esc(short(p.code))}</code></span></li>`).join("");
  showStudyLink(created.join_url, body.label_param || "label");
  $("#created").hidden = false;
  $("#create-box").open = false; // the links and the monitor matter now; the form is one click away
  $("#copy-status").textContent = "";
  await loadSessions();
  openMonitor(created.session);
});

// The study link: one link for everyone; a recruiting site appends each person's id to it.
function showStudyLink(joinUrl, labelParam) {
  $("#study-link").hidden = !joinUrl;
  if (!joinUrl) return;
  $("#join-url").textContent = joinUrl;
  const prolific = labelParam === "PROLIFIC_PID";
  $("#prolific-what").textContent = prolific ? "URL to paste into Prolific:" : `With each person's id (parameter ${labelParam}):`;
  $("#prolific-url").textContent = prolific ? `${joinUrl}?PROLIFIC_PID={{%PROLIFIC_PID%}}` : `${joinUrl}?${encodeURIComponent(labelParam)}=…`;
  $("#join-status").textContent = "";
}

async function copyText(element, status, what) {
  try {
    await navigator.clipboard.writeText(element.textContent);
    status.textContent = `${what} copied.`;
  } catch {
    const range = document.createRange();
    range.selectNodeContents(element);
    getSelection().removeAllRanges();
    getSelection().addRange(range);
    status.textContent = `${what} selected: press Ctrl-C to copy.`;
  }
}
$("#copy-join").addEventListener("click", () => copyText($("#join-url"), $("#join-status"), "Study link"));
$("#copy-prolific").addEventListener("click", () => copyText($("#prolific-url"), $("#join-status"), "URL"));

$("#copy-links").addEventListener("click", async () => {
  const text = createdLinks.map((p) => p.url).join("\n");
  try {
    await navigator.clipboard.writeText(text);
    $("#copy-status").textContent = `${createdLinks.length} links copied.`;
  } catch {
    // No clipboard permission (plain http, another origin): select them for Ctrl-C instead.
    const range = document.createRange();
    range.selectNodeContents($("#created-links"));
    getSelection().removeAllRanges();
    getSelection().addRange(range);
    $("#copy-status").textContent = "Links selected: press Ctrl-C to copy.";
  }
});
$("#open-links").addEventListener("click", () => {
  for (const p of createdLinks) {
    // "noopener" from the start: a tab opened with an opener gets a copy of this tab's
    // sessionStorage (the admin token) when both share an origin, as the console and the
    // pages do behind one ingress host. The price: window.open then returns null, so a
    // blocked pop-up cannot be counted.
    window.open(p.url, "_blank", "noopener");
  }
  $("#copy-status").textContent = `${createdLinks.length} tab(s) opened; if some are missing, allow pop-ups for this page.`;
});

// -- the session list ------------------------------------------------------------------------

let sessions = [];
async function loadSessions() {
  try {
    sessions = (await (await api("/api/sessions")).json()).sessions.reverse();
  } catch (error) {
    $("#sessions-message").innerHTML = `<span class="error">${esc(error.message)}</span>`;
    return;
  }
  renderSessions();
  showDeadLetters();
}

// Dead letters (messages a service gave up on, kept by the store): a count under the list, only
// when there are some; `canopy dead-letters list` and docs/operations.md say what to do.
async function showDeadLetters() {
  let box = $("#dead-letters");
  if (!box) {
    box = Object.assign(document.createElement("p"), {id: "dead-letters", className: "error", hidden: true});
    box.setAttribute("role", "status");
    $("#sessions-message").after(box);
  }
  try {
    const {dead} = await (await api("/api/dead-letters?state=dead&limit=1")).json();
    box.textContent = `${dead} dead letter${dead === 1 ? "" : "s"}: messages a service gave up on. See them with \`canopy dead-letters list\`.`;
    box.hidden = dead === 0;
  } catch {
    box.hidden = true; // the sessions' own message says when the store is away
  }
}

function renderSessions() {
  $("#sessions tbody").innerHTML = sessions.map((s) => `
    <tr data-session="${esc(s.session)}"${s.session === monitored ? ' class="selected"' : ""}>
      <td><code>${esc(s.session)}</code><br><span class="muted">${esc(s.label)}</span></td>
      <td>${esc(s.experiment)}<br><span class="muted">${esc(s.num_periods)} × ${esc(s.period_length)} s${s.num_subperiods ? `, ${esc(s.num_subperiods)} sub-periods` : ""}</span></td>
      <td>${esc(new Date(s.created_at).toLocaleString())}</td>
      <td>${esc(s.num_participants)} in groups of ${esc(s.group_size)}${s.grouping === "arrival" ? `<br><span class="muted">formed in a lobby</span>` : ""}</td>
      <td><button type="button" class="quiet" data-monitor="${esc(s.session)}">Monitor</button>
        <button type="button" class="link" data-export="csv" data-session="${esc(s.session)}">CSV</button>
        <button type="button" class="link" data-export="jsonl" data-session="${esc(s.session)}">JSONL</button>
        · <button type="button" class="link" data-payments="csv" data-session="${esc(s.session)}">Payments</button> <span class="muted">(CSV)</span></td>
    </tr>`).join("");
  $("#sessions").hidden = sessions.length === 0;
  $("#sessions-message").textContent = sessions.length ? `${sessions.length} session(s), newest first.` : "No sessions yet: create one above.";
}
$("#refresh").addEventListener("click", loadSessions);

document.addEventListener("click", async (event) => {
  const monitor = event.target.closest("[data-monitor]");
  if (monitor) openMonitor(monitor.dataset.monitor);
  const exporter = event.target.closest("[data-export], [data-payments]");
  if (!exporter) return;
  const what = exporter.dataset.export ? "events" : "payments";
  try {
    await download(exporter.dataset.session || monitored, what, exporter.dataset.export || exporter.dataset.payments);
  } catch (error) {
    alert(`The ${what} download failed: ${error.message}`);
  }
});

// The export routes need the Authorization header, so the file is fetched and saved as a blob.
async function download(session, what, format) {
  const response = await api(`/api/sessions/${encodeURIComponent(session)}/${what}?format=${format}`);
  const url = URL.createObjectURL(await response.blob());
  const suffix = format === "prolific" ? "txt" : format;
  const a = Object.assign(document.createElement("a"), {href: url, download: `canopy-${session}-${what}.${suffix}`});
  document.body.append(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(url), 10_000);
}

// -- the live monitor ------------------------------------------------------------------------

let monitored = null;
let source = null;
let view = null; // {session, experiment, groups: {id: group view}, participants: {code: …}}
let serverOffset = 0; // server clock − this browser's clock, seconds
let retry = null;

function serverNow() {
  return Date.now() / 1000 + serverOffset;
}

function setStream(status, text) {
  const element = $("#monitor-stream");
  element.dataset.status = status;
  element.textContent = text;
}

function closeMonitor() {
  if (source) source.close();
  source = null;
  clearTimeout(retry);
}

async function openMonitor(session) {
  closeMonitor();
  if (monitored !== session) {
    view = null;
    replayShown = -1;
    $("#groups").innerHTML = "";
    $("#lobby").hidden = true;
    $("#replay").hidden = true;
  }
  monitored = session;
  renderSessions();
  $("#monitor").hidden = false;
  $("#monitor-session").textContent = session;
  setStream("connecting", "connecting…");
  checkBots();
  let ticket;
  try {
    // This session's only, and good for one stream: a reconnect fetches a new one.
    ticket = (await (await api("/api/monitor/tickets", {json: {session}})).json()).ticket;
  } catch (error) {
    setStream("closed", `not connected: ${error.message}`);
    if (error.status !== 401) retry = setTimeout(() => openMonitor(session), 3000);
    return;
  }
  if (monitored !== session) return;
  source = new EventSource(`/api/sessions/${encodeURIComponent(session)}/live?ticket=${encodeURIComponent(ticket)}`);
  source.addEventListener("open", () => setStream("open", "live"));
  source.addEventListener("snapshot", (event) => {
    const data = JSON.parse(event.data);
    serverOffset = data.now - Date.now() / 1000;
    view = {
      ...data,
      groups: Object.fromEntries(data.groups.map((g) => [g.group, g])),
      participants: Object.fromEntries(data.participants.map((p) => [p.code, p])),
    };
    $("#monitor-experiment").textContent = `${data.experiment}${data.label ? ` · ${data.label}` : ""}`;
    $("#monitor-eps").textContent = data.events_per_second;
    renderGroups(true);
  });
  source.addEventListener("groups", (event) => {
    const data = JSON.parse(event.data);
    serverOffset = data.now - Date.now() / 1000;
    if (!view) return;
    for (const group of data.groups) view.groups[group.group] = group;
    renderGroups(false, data.groups.map((g) => g.group));
  });
  // Seats' labels, status and outcome (online studies): the whole list, when one changes.
  source.addEventListener("participants", (event) => {
    const data = JSON.parse(event.data);
    serverOffset = data.now - Date.now() / 1000;
    if (!view) return;
    view.participants = Object.fromEntries(data.participants.map((p) => [p.code, p]));
    renderGroups(true);
  });
  source.addEventListener("stats", (event) => {
    const data = JSON.parse(event.data);
    serverOffset = data.now - Date.now() / 1000;
    $("#monitor-eps").textContent = data.events_per_second;
  });
  source.addEventListener("failed", (event) => setStream("reconnecting", `${JSON.parse(event.data).message}; retrying…`));
  source.addEventListener("error", () => {
    // EventSource retries by itself after a network error, with the same ticket, which is
    // refused (used): that closes it, and then a new ticket is fetched.
    if (source && source.readyState === EventSource.CLOSED) {
      setStream("reconnecting", "reconnecting…");
      retry = setTimeout(() => openMonitor(session), 1000);
    } else {
      setStream("reconnecting", "reconnecting…");
    }
  });
}

function periodText(period) {
  const state = displayState(period);
  const of = period.of > 1 ? `/${period.of}` : "";
  if (state === "running") {
    const left = Math.max(0, period.ends_at - serverNow());
    return `Period ${period.number}${of} running · ${clock(left)} left`;
  }
  if (state === "ending") return `Period ${period.number}${of} ending…`;
  if (state === "paused") return `Period ${period.number}${of} paused · ${clock(period.remaining || 0)} left`;
  if (state === "ended") return `Period ${period.number}${of} ended`;
  return `Period ${period.number}${of} waiting for the group`;
}

// A running period past its end (the server's period_end not in yet) is "ending", never
// "running · 0 s left".
function displayState(period) {
  if (period.state === "running" && period.ends_at !== null && period.ends_at <= serverNow()) return "ending";
  return period.state;
}

function clock(seconds) {
  const s = Math.ceil(seconds);
  return `${Math.floor(s / 60)}:${String(s % 60).padStart(2, "0")}`;
}

function decisionText(value) {
  if (value === null || value === undefined) return "–";
  if (typeof value === "number") return Number.isInteger(value) ? String(value) : value.toFixed(2);
  return JSON.stringify(value);
}

// A seat's place in an online study: unassigned, lobby, playing, finished (with its outcome),
// and whether a bot plays (or played) it.
function seatText(seat) {
  if (!seat) return "–";
  const text = seat.outcome ? `finished · ${seat.outcome}` : seat.status;
  return seat.bot ? `${text} · bot` : text;
}

function groupHtml(group) {
  const connected = new Set(group.connected);
  const seats = (view && view.participants) || {};
  const period = group.period;
  const state = displayState(period);
  const progress = state === "running" ? Math.min(1, Math.max(0, 1 - (period.ends_at - serverNow()) / period.length)) : state === "ended" || state === "ending" ? 1 : 0;
  const members = group.members.map((code, index) => `
      <tr data-participant="${esc(code)}" data-connected="${connected.has(code)}" data-seat="${esc(seats[code] ? seats[code].status : "")}">
        <td><span class="dot" aria-hidden="true"></span> ${index + 1}</td>
        <td><code title="${esc(code)}">${esc(short(code))}</code>${seats[code] && seats[code].label ? `<br><span class="seat-label" title="${esc(seats[code].label)}">${esc(seats[code].label)}</span>` : ""}</td>
        <td>${connected.has(code) ? "connected" : "away"}</td>
        <td class="seat">${esc(seatText(seats[code]))}</td>
        <td class="decision">${esc(decisionText(group.decisions[code]))}</td>
        <td class="payoff">${code in group.total_payoffs ? esc(group.total_payoffs[code].toFixed(2)) : "–"}</td>
      </tr>`).join("");
  const book = group.market && group.market.book ? `<p class="book">Book: best bid ${esc(group.market.book.bids[0] ? group.market.book.bids[0].price : "–")}, best ask ${esc(group.market.book.asks[0] ? group.market.book.asks[0].price : "–")} (${group.market.book.bids.length} bids, ${group.market.book.asks.length} asks)</p>` : "";
  const sub = period.num_subperiods ? ` · sub-period ${period.subperiod}/${period.num_subperiods}` : "";
  return `
    <h3><span>Group <code title="${esc(group.group)}">${esc(short(group.group))}</code></span><span class="muted">${connected.size}/${group.members.length} connected</span></h3>
    <p class="period" data-state="${esc(state)}">${esc(periodText(period))}${esc(sub)}</p>
    <progress max="1" value="${progress}" aria-label="period progress"></progress>
    <table><thead><tr><th>#</th><th>Participant</th><th>Status</th><th>Seat</th><th>Decision</th><th>Payoff</th></tr></thead><tbody>${members}</tbody></table>
    ${book}`;
}

function renderGroups(all, changed = []) {
  if (!view) return;
  const container = $("#groups");
  if (all) container.innerHTML = "";
  for (const group of Object.values(view.groups)) {
    if (!all && !changed.includes(group.group)) continue;
    if (!group.members.length) continue; // arrival grouping: not formed yet (the lobby says how many)
    let card = container.querySelector(`[data-group="${CSS.escape(group.group)}"]`);
    if (!card) {
      card = Object.assign(document.createElement("article"), {className: "group"});
      card.dataset.group = group.group;
      container.append(card);
    }
    card.innerHTML = groupHtml(group);
  }
  const groups = Object.values(view.groups);
  const waiting = lobbySeats();
  const inLobby = waiting.filter((p) => p.connected).length;
  $("#monitor-connected").textContent = `${groups.reduce((n, g) => n + g.connected.length, 0) + inLobby}/${groups.reduce((n, g) => n + g.members.length, 0) + waiting.length}`;
  renderLobby();
  const ended = groups.reduce((n, g) => n + g.periods_ended, 0);
  if (ended > 0 && ended !== replayShown) showReplay(ended);
}

// -- the lobby (grouping "arrival") -----------------------------------------------------------

function isArrival() {
  return !!view && (view.grouping === "arrival" || Object.values(view.participants).some((p) => p.status === "lobby"));
}

// The seats whose person waits in the lobby, longest-waiting first.
function lobbySeats() {
  if (!view) return [];
  const since = (p) => (p.lobby_since ? Date.parse(p.lobby_since) : Infinity);
  return Object.values(view.participants).filter((p) => p.status === "lobby").sort((a, b) => since(a) - since(b));
}

function waited(seat) {
  return seat.lobby_since ? Math.max(0, serverNow() - Date.parse(seat.lobby_since) / 1000) : null;
}

function renderLobby() {
  const box = $("#lobby");
  box.hidden = !isArrival();
  if (box.hidden) return;
  const waiting = lobbySeats();
  const groups = Object.values(view.groups);
  const formed = groups.filter((g) => g.members.length).length;
  const here = waiting.filter((p) => p.connected).length;
  const size = view.group_size ? ` · groups of ${view.group_size}` : "";
  const timeout = view.lobby_timeout ? ` · at most ${clock(view.lobby_timeout)} each` : "";
  box.dataset.waiting = String(waiting.length);
  box.dataset.formed = String(formed);
  $("#lobby-settings").textContent = `${size}${timeout}`.replace(/^ · /, "");
  $("#lobby-summary").textContent = `${waiting.length} waiting (${here} connected) · ${formed} of ${groups.length} groups formed`;
  $("#lobby-table").hidden = waiting.length === 0;
  $("#lobby-table tbody").innerHTML = waiting.map((p) => `
      <tr data-participant="${esc(p.code)}" data-connected="${p.connected}" data-seat="${esc(p.status)}">
        <td><span class="dot" aria-hidden="true"></span> <code title="${esc(p.code)}">${esc(short(p.code))}</code></td>
        <td>${p.label ? `<span class="seat-label" title="${esc(p.label)}">${esc(p.label)}</span>` : `<span class="muted">–</span>`}</td>
        <td class="since">${p.lobby_since ? `<time datetime="${esc(p.lobby_since)}">${esc(new Date(p.lobby_since).toLocaleTimeString())}</time>` : "–"}</td>
        <td class="waited">${waited(p) === null ? "–" : esc(clock(waited(p)))}</td>
        <td>${p.connected ? "connected" : "away"}</td>
        <td class="seat">${esc(seatText(p))}</td>
      </tr>`).join("");
}

// Countdowns move on the server's clock between events.
setInterval(() => {
  if (!view) return;
  for (const row of document.querySelectorAll("#lobby-table tbody tr")) {
    const seat = view.participants[row.dataset.participant];
    const cell = row.querySelector(".waited");
    if (seat && cell && waited(seat) !== null) cell.textContent = clock(waited(seat));
  }
  for (const card of document.querySelectorAll("#groups [data-group]")) {
    const group = view.groups[card.dataset.group];
    const period = group && group.period;
    if (!period || period.state !== "running") continue;
    const line = card.querySelector(".period");
    const state = displayState(period);
    line.dataset.state = state;
    const sub = period.num_subperiods ? ` · sub-period ${period.subperiod}/${period.num_subperiods}` : "";
    line.textContent = periodText(period) + sub;
    card.querySelector("progress").value = state === "running" ? Math.min(1, Math.max(0, 1 - (period.ends_at - serverNow()) / period.length)) : 1;
  }
}, 250);

// -- the replay chart --------------------------------------------------------------------------

let replayShown = -1;
const plots = [];
const COLOURS = ["#2f6b3a", "#b3541e", "#1f5fa8", "#8a3ea8", "#a8891f", "#1f8a8a", "#a81f4f", "#555"];

async function showReplay(ended, attempt = 0) {
  replayShown = ended;
  const session = monitored;
  let replay, rows;
  try {
    replay = await (await api(`/api/sessions/${encodeURIComponent(session)}/replay`)).json();
    // The live view can be a few batches ahead of MongoDB (the store writes every 0.1 s).
    const logged = replay.groups.reduce((n, g) => n + g.periods.length, 0);
    if (logged < ended && attempt < 20) {
      setTimeout(() => session === monitored && showReplay(ended, attempt + 1), 250);
      return;
    }
    const text = await (await api(`/api/sessions/${encodeURIComponent(session)}/events?format=jsonl`)).text();
    rows = text.split("\n").filter(Boolean).map((line) => JSON.parse(line));
  } catch (error) {
    $("#replay-groups").innerHTML = `<p class="error">${esc(error.message)}</p>`;
    $("#replay").hidden = false;
    return;
  }
  if (session !== monitored) return;
  for (const plot of plots.splice(0)) plot.destroy();
  const container = $("#replay-groups");
  container.innerHTML = "";
  for (const group of replay.groups) {
    const live = view && view.groups[group.group];
    const members = live ? live.members : Object.keys((group.periods[0] || {}).group_decisions || {});
    const section = document.createElement("div");
    section.dataset.replayGroup = group.group;
    const payoffs = group.periods.map((p) => `<tr><td>${esc(p.period)}</td>${members.map((m) => `<td>${p.payoffs[m] !== undefined ? esc(Number(p.payoffs[m]).toFixed(2)) : "–"}</td>`).join("")}</tr>`).join("");
    section.innerHTML = `<h3>Group <code>${esc(short(group.group))}</code></h3>
      <div class="chart"></div>
      <table class="payoffs"><thead><tr><th>Period</th>${members.map((m, i) => `<th>Player ${i + 1} payoff</th>`).join("")}</tr></thead><tbody>${payoffs}</tbody></table>`;
    container.append(section);
    const data = chartData(rows.filter((r) => r.group === group.group), members);
    if (data) {
      const width = Math.min(container.clientWidth || 800, 1000);
      plots.push(new uPlot(data.options(width), data.values, $(".chart", section)));
    } else {
      $(".chart", section).innerHTML = `<p class="muted">Nothing numeric to chart yet.</p>`;
    }
  }
  $("#replay").hidden = false;
}
$("#replay-refresh").addEventListener("click", () => showReplay(replayShown));

// Each member's decision over time (a step line from every group_decisions row), or the
// trade prices of a double auction.
function chartData(rows, members) {
  const trades = rows.filter((r) => r.direction === "out" && r.channel === "trade");
  const time = (r) => Date.parse(r.ts) / 1000;
  if (trades.length) {
    const xs = trades.map(time);
    const prices = trades.map((r) => r.value.price); // JSONL: `value` is the JSON itself
    return {
      values: [xs, prices],
      options: (width) => ({width, height: 220, series: [{}, {label: "trade price", stroke: COLOURS[0], points: {show: true}, paths: () => null}]}),
    };
  }
  const changes = rows.filter((r) => r.direction === "out" && r.channel === "group_decisions");
  if (!changes.length) return null;
  const xs = [];
  const columns = members.map(() => []);
  for (const row of changes) {
    const decisions = row.value;
    xs.push(time(row));
    members.forEach((code, i) => columns[i].push(typeof decisions[code] === "number" ? decisions[code] : null));
  }
  const end = rows.filter((r) => r.channel === "period_end").map(time).pop();
  if (end && end > xs[xs.length - 1]) {
    xs.push(end);
    columns.forEach((column) => column.push(column[column.length - 1]));
  }
  if (!columns.some((c) => c.some((v) => v !== null))) return null;
  return {
    values: [xs, ...columns],
    options: (width) => ({
      width,
      height: 220,
      series: [{}, ...members.map((code, i) => ({label: `Player ${i + 1}`, stroke: COLOURS[i % COLOURS.length], width: 2, paths: uPlot.paths.stepped({align: 1})}))],
    }),
  };
}

// -- bots --------------------------------------------------------------------------------------

async function checkBots() {
  $("#bots-start").hidden = $("#bots-stop").hidden = true;
  $("#bots-status").textContent = "";
  let status;
  try {
    status = await (await api(`/api/sessions/${encodeURIComponent(monitored)}/bots`)).json();
  } catch {
    return; // a store without bots
  }
  showBots(status);
}

function showBots(status) {
  $("#bots-start").hidden = false;
  $("#bots-stop").hidden = !status.running;
  $("#bots-status").textContent = status.running ? `${status.bots.length} bot(s) playing (${status.strategy})` : "";
}

$("#bots-start").addEventListener("click", async () => {
  try {
    showBots(await (await api(`/api/sessions/${encodeURIComponent(monitored)}/bots`, {json: {}})).json());
  } catch (error) {
    $("#bots-status").textContent = error.message;
  }
});
$("#bots-stop").addEventListener("click", async () => {
  try {
    showBots(await (await api(`/api/sessions/${encodeURIComponent(monitored)}/bots`, {method: "DELETE"})).json());
  } catch (error) {
    $("#bots-status").textContent = error.message;
  }
});

// -- start -------------------------------------------------------------------------------------

if (token) signIn(token);
else signOut(signInNote);
