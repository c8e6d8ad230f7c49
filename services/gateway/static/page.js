/*
 * The participant page's shell, shared by every experiment's page (decisions.js, bimatrix.js,
 * public_goods.js, double_auction.js, generic.js): the connection badge and notices, the
 * period with its countdown on the server's clock and sub-period progress, the lobby (PROTOCOL
 * v2 "The lobby", `grouping: "arrival"`: how many wait, how many are needed, how long at most,
 * until the group's own `hello` comes), the waiting screen until the group is complete, the
 * paused banner (on_disconnect "pause"), the group's members,
 * the payoffs at period end, the errors, a live uPlot chart of the period, and the finished
 * screen (PROTOCOL v2 "The end for everyone": the seat's outcome, its payoffs, the completion
 * code with a Copy button, and the countdown to the completion site), shown over everything
 * else once the `finished` message came.
 *
 * An experiment's module calls startPage(spec) once; the shell owns the client (canopy.js) and
 * calls the spec back:
 *   spec.title                      shown in the top bar
 *   spec.mount(page)                build the controls inside page.el.experiment (once)
 *   spec.render(page)               bring them up to date (after every change)
 *   spec.formatDecision(value, member, page)   a member's decision in the group list
 *   spec.barWidth(value, page)      0..1, the bar behind it (null: no bar)
 *   spec.chart = {caption, yLabel, range: [min, max] | (page) -> [min, max] | null,
 *                 yAxis(page) -> more uPlot options of the y axis (optional),
 *                 series(page) -> [{label, color, points?}],
 *                 sample(page) -> [y per series]}  (what the chart records on a change)
 * `page` (also window.canopyPage) has: client, config (from the gateway: experiment, params,
 * members, period_length, num_subperiods, …), me(), members(), el, chart (record(values),
 * reset()), running(), elapsed(ts), slider(options), showError(error), finished (the
 * `finished` payload once it came, else null), inLobby().
 *
 * In the lobby a page's members() is empty and idInGroup() 0; the group's `hello` brings them
 * (not the embedded config, which has none for a lobby seat), and spec.render runs again, so a
 * spec must derive anything that depends on the member (a role, a side) in render, not mount.
 */
import { connect, pageKey, socketUrl } from "./canopy.js";
import { LEAVE_SECONDS, leaveAfter, safeTarget } from "./leave.js";
import uPlot from "./vendor/uplot/uPlot.esm.js";

const MAX_ERRORS_SHOWN = 5;
const SEND_INTERVAL_MS = 33; // at most ~30 decisions per second while a slider is dragged
const TICK_MS = 250;
const COLORS = ["#0f766e", "#1d4ed8", "#b45309", "#9333ea", "#be123c", "#4d7c0f", "#0369a1",
  "#a16207"];
const FINISHED_TEXT = {
  completed: ["You have finished", "Thank you for taking part."],
  again: ["You have already taken part", "You finished this study already; here is what you " +
    "earned and your completion code again."],
  dropout: ["The study has ended", "Your group's last period ended while you were away, so " +
    "your part could not be completed. Thank you for your time."],
  lobby_timeout: ["The study has ended", "No group could be formed in time. Thank you for " +
    "waiting."],
  full: ["This study is full", "All places in this study are taken. Thank you for your " +
    "interest."],
};
const LOBBY_DOTS_MAX = 12; // beyond this group size, the count alone
const STATUS_TEXT = {
  connecting: "Connecting…",
  connected: "Connected",
  reconnecting: "Reconnecting…",
  replaced: "Opened elsewhere",
  refused: "Link not valid",
  closed: "Closed",
};

export function readConfig() {
  const node = document.getElementById("canopy-config");
  let config = {};
  if (node) {
    try {
      config = JSON.parse(node.textContent) || {};
    } catch {
      config = {};
    }
  }
  if (!config.params) config.params = {};
  return config;
}

export function formatNumber(value, digits) {
  if (typeof value !== "number" || !isFinite(value)) return "–";
  return value.toFixed(digits === undefined ? 2 : digits);
}

export function formatSeconds(s) {
  s = Math.max(0, Math.ceil(s));
  const m = Math.floor(s / 60);
  const r = s % 60;
  return `${m}:${r < 10 ? "0" : ""}${r}`;
}

/** A new element: h("span", {class: "x", text: "…", "aria-label": "…"}, child, …). */
export function h(tag, attrs, ...children) {
  const node = document.createElement(tag);
  Object.keys(attrs || {}).forEach((key) => {
    const value = attrs[key];
    if (value === undefined || value === null || value === false) return;
    if (key === "text") node.textContent = value;
    else if (key === "class") node.className = value;
    else if (key.slice(0, 2) === "on") node.addEventListener(key.slice(2), value);
    else node.setAttribute(key, value === true ? "" : value);
  });
  for (const child of children) if (child) node.append(child);
  return node;
}

function byId(id) {
  return document.getElementById(id);
}

export function startPage(spec) {
  const config = readConfig();
  const code = config.participant;
  const el = {
    title: byId("experiment-title"),
    status: byId("status"),
    notice: byId("notice"),
    noticeText: byId("notice-text"),
    noticeButton: byId("notice-button"),
    paused: byId("paused"),
    pausedText: byId("paused-text"),
    period: byId("period"),
    subperiod: byId("subperiod"),
    countdown: byId("countdown"),
    progress: byId("progress"),
    waiting: byId("waiting"),
    waitingText: byId("waiting-text"),
    lobby: byId("lobby"),
    lobbyCount: byId("lobby-count"),
    lobbySeats: byId("lobby-seats"),
    lobbyDeadline: byId("lobby-deadline"),
    lobbyCountdown: byId("lobby-countdown"),
    lobbyAnnounce: byId("lobby-announce"),
    result: byId("result"),
    resultText: byId("result-text"),
    resultBody: byId("result-table").querySelector("tbody"),
    experiment: byId("experiment"),
    chart: byId("chart"),
    chartCaption: byId("chart-caption"),
    members: byId("members"),
    errors: byId("errors"),
    finished: byId("finished"),
    finishedHeading: byId("finished-heading"),
    finishedText: byId("finished-text"),
    finishedTotal: byId("finished-total"),
    finishedPeriods: byId("finished-periods"),
    finishedCode: byId("finished-code"),
    completionCode: byId("completion-code"),
    copyCode: byId("copy-code"),
    copyNote: byId("copy-note"),
    leaving: byId("leaving"),
    leavingSeconds: byId("leaving-seconds"),
    leaveNow: byId("leave-now"),
    finishedClose: byId("finished-close"),
  };
  const key = pageKey(); // the seat's secret: only in this page's own address
  const client = connect(socketUrl(key), key, null, { code });
  const periodPayoffs = {}; // period number -> {code: payoff}, as announced by period_end

  const page = {
    client,
    config,
    el,
    spec,
    periodPayoffs,
    finished: null,
    me() {
      const hello = client.state.hello;
      return hello && hello.participant ? hello.participant : code;
    },
    members() {
      const hello = client.state.hello;
      if (hello && Array.isArray(hello.members) && hello.members.length) return hello.members;
      if (Array.isArray(config.members) && config.members.length) return config.members;
      return Object.keys(client.state.groupDecisions);
    },
    idInGroup(member) {
      return page.members().indexOf(member) + 1;
    },
    playerName(member) {
      const i = page.idInGroup(member);
      return (i > 0 ? `Player ${i}` : member) + (member === page.me() ? " (you)" : "");
    },
    color(member) {
      const i = page.idInGroup(member);
      return COLORS[(Math.max(1, i) - 1) % COLORS.length];
    },
    running() {
      const p = client.state.period;
      return !!p && p.state === "running" && !client.inLobby();
    },
    /** Waiting in the lobby for a group: its hello had no group, or (before any hello) the
     * gateway gave this arrival seat no members. */
    inLobby() {
      if (page.finished) return false;
      if (client.state.hello) return client.inLobby();
      return config.grouping === "arrival" && !(config.members && config.members.length);
    },
    periodLength() {
      const p = client.state.period;
      return (p && p.length) || config.period_length || 60;
    },
    /** Running time into the period (pauses left out) at server time `ts`. */
    elapsed(ts) {
      const p = client.state.period;
      const length = page.periodLength();
      if (!p || p.state === "waiting") return 0;
      if (p.state === "ended") return length;
      if (p.state === "paused") return Math.max(0, length - (p.remaining || 0));
      if (typeof p.ends_at !== "number") return 0;
      const t = typeof ts === "number" ? ts : client.serverNow();
      return Math.min(length, Math.max(0, length - (p.ends_at - t)));
    },
    showError,
    render() {
      renderAll();
    },
    /** A range input that sends its value (coalesced while dragged) and follows the server's. */
    slider(options) {
      return makeSlider(page, options);
    },
  };
  window.canopyClient = client; // for tests and for poking at it from the console
  window.canopyPage = page;

  el.title.textContent = spec.title || "";
  const baseTitle = spec.title ? `${spec.title} · Canopy` : document.title;
  document.title = baseTitle;

  // ---- status and notices ----------------------------------------------------------

  function renderStatus() {
    const status = client.state.status;
    el.status.dataset.status = status;
    let text = STATUS_TEXT[status] || status;
    if ((status === "connecting" || status === "reconnecting") && client.state.failedAttempts >= 3) {
      text += ` (attempt ${client.state.failedAttempts + 1})`;
    }
    el.status.textContent = text;
    if (status === "replaced") {
      showNotice("This experiment was opened in another tab or window, so this page " +
        "stopped. Close it, or continue here instead.", true);
    } else if (status === "refused") {
      showNotice("This participant link is not valid. Check the address, or ask the " +
        "experimenter for your link.", false);
    } else {
      el.notice.hidden = true;
    }
  }

  function showNotice(text, offerReconnect) {
    el.noticeText.textContent = text;
    el.noticeButton.hidden = !offerReconnect;
    el.notice.hidden = false;
  }

  el.noticeButton.addEventListener("click", () => {
    client.reconnect();
  });

  // ---- period, countdown, waiting, paused ----------------------------------------

  function presentCount() {
    const presence = client.state.presence;
    const members = page.members();
    return members.filter((m) => presence[m] === true).length;
  }

  function renderPeriod() {
    const st = client.state;
    const p = st.period;
    const state = p ? p.state : "unknown";
    const n = p && p.number ? p.number : 1;
    const of = config.num_periods > 1 ? ` of ${config.num_periods}` : "";
    let text;
    if (!p) {
      text = st.status === "refused" || st.status === "replaced" ? "Not connected." :
        st.hello ? "Waiting for the experiment to start." : "Connecting to the experiment…";
    } else if (state === "lobby") {
      text = "Waiting for your group to form.";
    } else if (state === "waiting") {
      text = `Period ${n}${of}: waiting for everyone in your group to join.`;
    } else if (state === "running") {
      text = `Period ${n}${of} is running.`;
    } else if (state === "paused") {
      text = `Period ${n}${of} is paused.`;
    } else if (state === "ended") {
      text = `Period ${n}${of} has ended.`;
      const mine = p.payoffs ? p.payoffs[page.me()] : undefined;
      if (typeof mine === "number") text += ` Your payoff: ${mine.toFixed(2)}.`;
    } else {
      text = `Period ${n}: ${state}.`;
    }
    el.period.dataset.state = state;
    el.period.textContent = text;

    const members = page.members().length;
    const here = presentCount();
    const waiting = state === "waiting" || (!p && !!st.hello);
    el.waiting.hidden = !waiting;
    if (waiting) {
      el.waitingText.textContent = here < members ?
        `Waiting for everyone in your group to join: ${here} of ${members} here.` :
        `Everyone is here: period ${n} starts in a moment.`;
    }
    document.body.dataset.phase = page.finished ? "finished" : page.inLobby() ? "lobby" :
      !p ? "connecting" : state === "waiting" && n === 1 ? "waiting" : state;

    el.paused.hidden = state !== "paused";
    if (state === "paused") {
      const left = typeof p.remaining === "number" ? ` ${formatSeconds(p.remaining)} left.` : "";
      el.pausedText.textContent = "Someone in your group lost their connection; the period " +
        `goes on when everyone is back.${left}`;
    }

    const sub = st.subperiod;
    const subs = config.num_subperiods || 0;
    el.subperiod.hidden = !(subs > 0 && p);
    if (subs > 0) {
      let done = sub && p && sub.period === p.number ? sub.index : 0;
      if (p && state === "ended") done = subs;
      el.subperiod.textContent = done >= subs ? `All ${subs} sub-periods done.` :
        `Sub-period ${done + 1} of ${subs}.`;
      el.subperiod.dataset.done = String(done);
    }
    renderCountdown();
    renderResult();
  }

  // ---- the lobby (grouping "arrival") ---------------------------------------------

  let wasInLobby = false;
  let lobbyCountText = "";

  function people(n) {
    return n === 1 ? "1 more person" : `${n} more people`;
  }

  function renderLobby() {
    const inLobby = page.inLobby();
    el.lobby.hidden = !inLobby;
    if (wasInLobby && !inLobby && !page.finished) {
      // The lobby's live region is hidden now: say it where a screen reader still listens.
      el.lobbyAnnounce.textContent = "Your group is complete. The study starts when " +
        "everyone is connected.";
    }
    wasInLobby = inLobby;
    if (!inLobby) {
      if (document.title !== baseTitle) document.title = baseTitle;
      return;
    }
    const lobby = client.state.lobby;
    const size = lobby && typeof lobby.group_size === "number" ? lobby.group_size :
      config.group_size;
    const waiting = lobby && typeof lobby.waiting === "number" ? lobby.waiting : null;
    let text;
    if (waiting === null || typeof size !== "number") {
      text = "Joining the waiting room…"; // until the first count: one text, one announcement
    } else if (waiting < size) {
      text = `${waiting} of ${size} people are here. Waiting for ${people(size - waiting)}.`;
    } else {
      text = `${waiting} of ${size} people are here. Your group is being formed…`;
    }
    // Set only when it changes: a live region may read out even an unchanged text again.
    if (text !== lobbyCountText) {
      lobbyCountText = text;
      el.lobbyCount.textContent = text;
    }
    el.lobbyCount.dataset.waiting = waiting === null ? "" : String(waiting);
    el.lobbyCount.dataset.groupSize = typeof size === "number" ? String(size) : "";
    const dots = typeof size === "number" && size <= LOBBY_DOTS_MAX ? size : 0;
    if (el.lobbySeats.children.length !== dots) {
      const seats = [];
      for (let i = 0; i < dots; i++) seats.push(h("span", { class: "lobby-seat" }));
      el.lobbySeats.replaceChildren(...seats);
    }
    el.lobbySeats.hidden = dots === 0;
    [...el.lobbySeats.children].forEach((dot, i) => {
      dot.classList.toggle("here", waiting !== null && i < waiting);
    });
    const title = waiting !== null && typeof size === "number" ?
      `(${Math.min(waiting, size)}/${size}) Waiting · Canopy` : "Waiting · Canopy";
    if (document.title !== title) document.title = title;
    renderLobbyCountdown();
  }

  function renderLobbyCountdown() {
    const lobby = client.state.lobby;
    const at = lobby && typeof lobby.timeout_at === "number" ? lobby.timeout_at : null;
    el.lobbyDeadline.hidden = at === null || !page.inLobby();
    if (el.lobbyDeadline.hidden) return;
    const left = at - client.serverNow();
    el.lobbyCountdown.textContent = formatSeconds(left);
    el.lobbyCountdown.dataset.remaining = String(Math.max(0, Math.round(left)));
    el.lobbyDeadline.dataset.over = left <= 0 ? "true" : "false";
  }

  function renderCountdown() {
    const p = client.state.period;
    if (p && p.state === "running" && typeof p.ends_at === "number") {
      const left = p.ends_at - client.serverNow();
      el.countdown.textContent = formatSeconds(left);
      el.countdown.dataset.remaining = String(Math.max(0, Math.round(left)));
    } else if (p && p.state === "paused" && typeof p.remaining === "number") {
      el.countdown.textContent = formatSeconds(p.remaining);
      el.countdown.dataset.remaining = String(Math.round(p.remaining));
    } else if (p && p.state === "ended") {
      el.countdown.textContent = "0:00";
      el.countdown.dataset.remaining = "0";
    } else {
      el.countdown.textContent = "–:––";
      el.countdown.dataset.remaining = "";
    }
    el.progress.value = page.elapsed() / page.periodLength();
  }

  function renderResult() {
    const p = client.state.period;
    if (p && p.state === "ended" && p.payoffs) periodPayoffs[p.number] = p.payoffs;
    const numbers = Object.keys(periodPayoffs);
    const last = p && p.state === "ended" ? periodPayoffs[p.number] : null;
    el.result.hidden = numbers.length === 0 || !last || Object.keys(last).length === 0;
    if (el.result.hidden) return;
    const mine = last[page.me()];
    el.resultText.textContent = `Period ${p.number} has ended. Your payoff: ${formatNumber(mine)}.`;
    el.resultText.dataset.payoff = typeof mine === "number" ? String(mine) : "";
    const rows = page.members().map((member) => {
      const total = numbers.reduce((sum, n) => {
        const v = periodPayoffs[n][member];
        return sum + (typeof v === "number" ? v : 0);
      }, 0);
      return h("tr", { "data-participant": member, class: member === page.me() ? "you" : "" },
        h("th", { scope: "row", text: page.playerName(member) }),
        h("td", { class: "payoff", text: formatNumber(last[member]) }),
        h("td", { class: "total", text: formatNumber(total) }));
    });
    el.resultBody.replaceChildren(...rows);
  }

  // ---- the finished screen -------------------------------------------------------

  // Whether this page load saw the study being played: a `finished` that comes without it
  // (a seat that opened its link again after the end) says "you have already taken part".
  let sawPlay = false;
  let stopLeaving = null;

  function notePlay() {
    const p = client.state.period;
    if (p && (p.state === "running" || p.state === "paused")) sawPlay = true;
  }

  function onFinished(payload) {
    if (!payload || typeof payload !== "object") return;
    const first = page.finished === null;
    page.finished = payload;
    renderFinished();
    const target = safeTarget(payload.redirect);
    if (target !== null && stopLeaving === null) {
      el.leaveNow.href = target;
      stopLeaving = leaveAfter(target, LEAVE_SECONDS, el.leavingSeconds);
    }
    document.body.dataset.phase = "finished";
    // Move focus to the screen's heading once, so a screen reader reads it and the Tab key
    // goes on from there (the Copy button, the link); a repeat (reconnect) leaves focus be.
    if (first) el.finishedHeading.focus();
  }

  function renderFinished() {
    const f = page.finished;
    el.finished.hidden = !f;
    if (!f) return;
    const outcome = typeof f.outcome === "string" ? f.outcome : "";
    const kind = outcome === "completed" && !sawPlay ? "again" : outcome;
    const text = FINISHED_TEXT[kind] || ["The study has ended", "Thank you for taking part."];
    el.finished.dataset.outcome = outcome;
    el.finishedHeading.textContent = text[0];
    el.finishedText.textContent = text[1];
    const total = typeof f.total_payoff === "number" ? f.total_payoff : null;
    el.finishedTotal.textContent = `Your total payoff: ${formatNumber(total)}.`;
    el.finishedTotal.dataset.payoff = total === null ? "" : String(total);
    // Released from the lobby: no group ever played, so a total of 0.00 would only puzzle.
    el.finishedTotal.hidden = outcome === "lobby_timeout" && !total;

    // The period payoffs this page heard of (period_end), in period order.
    const me = page.me();
    const rows = Object.keys(periodPayoffs)
      .map(Number)
      .sort((a, b) => a - b)
      .filter((n) => typeof periodPayoffs[n][me] === "number")
      .map((n) => h("tr", { "data-period": String(n) },
        h("th", { scope: "row", text: `Period ${n}` }),
        h("td", { class: "payoff", text: formatNumber(periodPayoffs[n][me]) })));
    const body = el.finishedPeriods.querySelector("tbody");
    body.replaceChildren(...rows);
    el.finishedPeriods.hidden = rows.length < 2; // one period: the total says it all

    const code = typeof f.code === "string" && f.code ? f.code : null;
    el.finishedCode.hidden = code === null;
    if (el.completionCode.textContent !== (code || "")) el.completionCode.textContent = code || "";
    const target = safeTarget(f.redirect);
    el.leaving.hidden = target === null;
    el.finishedClose.hidden = code !== null || target !== null;
  }

  function selectCode() {
    const range = document.createRange();
    range.selectNodeContents(el.completionCode);
    const selection = window.getSelection();
    selection.removeAllRanges();
    selection.addRange(range);
  }

  el.copyCode.addEventListener("click", () => {
    const code = el.completionCode.textContent;
    function fallback() {
      // No clipboard access (an old browser, a page not served over https, a refusal): the
      // code is selected, ready for the keyboard's copy.
      selectCode();
      el.copyNote.textContent = "Selected: press Ctrl+C (⌘C on a Mac) to copy it.";
      el.copyNote.dataset.copied = "false";
    }
    if (!navigator.clipboard || !navigator.clipboard.writeText) {
      fallback();
      return;
    }
    navigator.clipboard.writeText(code).then(() => {
      el.copyNote.textContent = "Copied.";
      el.copyNote.dataset.copied = "true";
    }, fallback);
  });

  // ---- members -------------------------------------------------------------------

  function formatDecision(value, member) {
    if (spec.formatDecision) return spec.formatDecision(value, member, page);
    if (value === null || value === undefined) return "–";
    if (typeof value === "number") return value.toFixed(2);
    const text = JSON.stringify(value);
    return text.length > 24 ? `${text.slice(0, 23)}…` : text;
  }

  function memberRow(member) {
    let row = el.members.querySelector(`[data-participant="${CSS.escape(member)}"]`);
    if (row) return row;
    const you = member === page.me();
    row = h("li", { class: `member${you ? " you" : ""}`, "data-participant": member },
      h("span", { class: "name", text: page.playerName(member) }),
      h("span", { class: "presence" }),
      h("span", { class: "decision" }),
      h("span", { class: "bar", "aria-hidden": "true" },
        h("span", { class: "fill", style: `background:${page.color(member)}` })),
      h("span", { class: "payoff" }));
    return row;
  }

  function renderMembers() {
    const decisions = client.state.groupDecisions;
    const presence = client.state.presence;
    const period = client.state.period;
    const payoffs = period && period.state === "ended" && period.payoffs ? period.payoffs : {};
    const rows = page.members().map((member) => {
      const row = memberRow(member);
      const value = decisions[member];
      row.querySelector(".decision").textContent = formatDecision(value, member);
      row.dataset.decision = value === undefined || value === null ? "" : JSON.stringify(value);
      const width = spec.barWidth ? spec.barWidth(value, page) :
        typeof value === "number" ? Math.min(1, Math.max(0, value)) : null;
      const bar = row.querySelector(".bar");
      bar.hidden = width === null;
      row.querySelector(".fill").style.width = `${(width || 0) * 100}%`;

      const here = presence[member];
      const presenceText = here === true ? "connected" : here === false ? "away" : "unknown";
      const presenceEl = row.querySelector(".presence");
      presenceEl.textContent = presenceText;
      presenceEl.dataset.presence = presenceText;
      row.dataset.presence = presenceText;

      const pay = payoffs[member];
      row.querySelector(".payoff").textContent =
        typeof pay === "number" ? `payoff ${pay.toFixed(2)}` : "";
      return row;
    });
    // Keep id_in_group order; drop rows of codes no longer in the group.
    el.members.replaceChildren(...rows);
  }

  // ---- errors --------------------------------------------------------------------

  function showError(err) {
    const item = h("div", { class: "error", "data-code": err.code || "" },
      h("strong", { class: "error-code", text: err.code || "error" }),
      h("span", { class: "error-message", text: err.message || "" }));
    const close = h("button", { type: "button", class: "dismiss",
      "aria-label": "Dismiss this message", text: "×" });
    close.addEventListener("click", () => {
      item.remove();
      el.errors.hidden = el.errors.children.length === 0;
    });
    item.append(close);
    el.errors.appendChild(item);
    while (el.errors.children.length > MAX_ERRORS_SHOWN) el.errors.firstElementChild.remove();
    el.errors.hidden = false;
  }

  // ---- the chart -----------------------------------------------------------------

  const chartSpec = spec.chart || decisionsChart();
  page.chart = makeChart(page, chartSpec);
  if (chartSpec.caption) el.chartCaption.textContent = chartSpec.caption;

  // ---- wiring --------------------------------------------------------------------

  function renderAll() {
    renderStatus();
    renderLobby();
    renderPeriod();
    renderMembers();
    renderFinished();
    if (spec.render) spec.render(page);
  }

  // One render per burst of frames, after every listener (an experiment's own included) ran.
  let renderQueued = false;
  function scheduleRender() {
    if (renderQueued) return;
    renderQueued = true;
    queueMicrotask(() => {
      renderQueued = false;
      renderAll();
    });
  }

  if (spec.mount) spec.mount(page);
  let chartPeriod = null;
  let chartGroup = null;

  client.on("status", scheduleRender);
  client.on("hello", (hello) => {
    const p = client.state.period;
    // A new group (the lobby formed it) starts a new chart, whatever its period's number.
    const group = hello && typeof hello.group === "string" ? hello.group : null;
    if (!p || p.number !== chartPeriod || group !== chartGroup) {
      page.chart.reset(p ? p.number : null);
    }
    chartPeriod = p ? p.number : null;
    chartGroup = group;
    page.chart.record();
    notePlay();
    scheduleRender();
  });
  client.on("message", (channel, payload, ts) => {
    if (channel === "period_start") {
      chartPeriod = client.state.period.number;
      page.chart.reset(chartPeriod);
      page.chart.record(ts);
    } else if (channel === "group_decisions" || channel === "subperiod" ||
      channel === "period_end") {
      page.chart.record(ts);
    }
    notePlay();
    if (channel === "period_end") sawPlay = true;
    if (channel === "finished") onFinished(payload);
    scheduleRender();
  });
  client.on("error", (err) => {
    showError(err);
    scheduleRender();
  });

  renderAll();
  setInterval(() => {
    renderCountdown();
    renderLobbyCountdown();
    page.chart.draw();
  }, TICK_MS);
  return page;
}

/** The default chart: every member's decision over the period, stepped. */
export function decisionsChart(options) {
  options = options || {};
  return {
    caption: options.caption || "Your group's decisions over the period",
    yLabel: options.yLabel || "decision",
    range: options.range || null,
    series(page) {
      return page.members().map((member) => ({
        label: page.playerName(member),
        color: page.color(member),
      }));
    },
    sample(page) {
      const decisions = page.client.state.groupDecisions;
      return page.members().map((member) => {
        const v = decisions[member];
        return typeof v === "number" && isFinite(v) ? v : null;
      });
    },
  };
}

function makeChart(page, chartSpec) {
  const xs = [];
  const ys = []; // one array per series
  let plot = null;
  let seriesKey = "";

  function build() {
    const series = chartSpec.series(page);
    const key = JSON.stringify(series);
    if (plot && key === seriesKey) return;
    seriesKey = key;
    if (plot) plot.destroy();
    while (ys.length < series.length) ys.push(xs.map(() => null));
    ys.length = series.length;
    const width = Math.max(240, page.el.chart.clientWidth || 320);
    const range = typeof chartSpec.range === "function" ? chartSpec.range(page) : chartSpec.range;
    plot = new uPlot({
      width,
      height: 200,
      legend: { show: true, live: false },
      cursor: { show: false },
      scales: {
        x: { time: false, range: () => [0, page.periodLength()] },
        y: range ? { range } : { auto: true },
      },
      axes: [
        { label: "seconds into the period", size: 40, labelSize: 18 },
        // spec.chart.yAxis(page): more uPlot axis options (splits, values: a choice's labels).
        {
          label: chartSpec.yLabel,
          size: 50,
          labelSize: 18,
          ...(chartSpec.yAxis ? chartSpec.yAxis(page) : {}),
        },
      ],
      series: [{ label: "seconds" }, ...series.map((s) => s.points ? {
        label: s.label,
        stroke: s.color,
        paths: () => null,
        points: { show: true, size: 8, fill: s.color, stroke: s.color },
      } : {
        label: s.label,
        stroke: s.color,
        width: 2,
        spanGaps: true,
        paths: uPlot.paths.stepped({ align: 1 }),
        points: { show: false },
      })],
    }, data(), page.el.chart);
  }

  function data() {
    // The last values hold until now: one extra point at the current running time.
    const x = xs.slice();
    const out = ys.map((column) => column.slice());
    if (xs.length && page.running()) {
      x.push(Math.max(xs[xs.length - 1], page.elapsed()));
      const series = chartSpec.series(page);
      out.forEach((column, i) => {
        column.push(series[i] && series[i].points ? null : column[column.length - 1]);
      });
    }
    return [x, ...out];
  }

  const chart = {
    /** Forget the points of the last period. */
    reset() {
      xs.length = 0;
      ys.forEach((column) => { column.length = 0; });
      chart.draw();
    },
    /** Record the current values (chartSpec.sample, or `values`) at server time `ts`. */
    record(ts, values) {
      const p = page.client.state.period;
      if (!p || p.state === "waiting" || p.state === "lobby") return;
      build();
      const row = values || chartSpec.sample(page);
      let x = page.elapsed(ts);
      if (xs.length && x < xs[xs.length - 1]) x = xs[xs.length - 1];
      xs.push(x);
      for (let i = 0; i < ys.length; i++) ys[i].push(row[i] === undefined ? null : row[i]);
      chart.draw();
    },
    draw() {
      build();
      plot.setData(data());
    },
    points() {
      return xs.length;
    },
  };
  const resize = new ResizeObserver(() => {
    if (!plot) return;
    const width = Math.max(240, page.el.chart.clientWidth);
    if (width !== plot.width) plot.setSize({ width, height: 200 });
  });
  resize.observe(page.el.chart);
  return chart;
}

function makeSlider(page, options) {
  const client = page.client;
  const min = options.min;
  const max = options.max;
  const step = options.step;
  const digits = Math.max(0, Math.ceil(-Math.log10(step) - 1e-9));
  const format = options.format || ((v) => v.toFixed(digits));
  let lastSent = null;
  let sendTimer = null;
  let lastSendAt = 0;
  let dragging = false;
  let touched = false;

  const input = h("input", { type: "range", id: "slider", min: String(min), max: String(max),
    step: String(step), value: String(options.initial === undefined ? min : options.initial),
    disabled: true, "aria-describedby": "slider-help" });
  const output = h("output", { id: "slider-value", for: "slider", class: "slider-value", text: "–" });
  const row = h("div", { class: "slider-row" },
    h("label", { for: "slider", class: "visually-hidden", text: options.label }),
    h("span", { class: "slider-end", "aria-hidden": "true", text: options.minLabel || format(min) }),
    input,
    h("span", { class: "slider-end", "aria-hidden": "true", text: options.maxLabel || format(max) }),
    output);
  const help = h("p", { id: "slider-help", class: "help", text: options.help });

  function value() {
    const v = Math.round(parseFloat(input.value) / step) * step;
    return Math.min(max, Math.max(min, parseFloat(v.toFixed(digits))));
  }

  function send() {
    if (sendTimer !== null) {
      clearTimeout(sendTimer);
      sendTimer = null;
    }
    const v = value();
    if (v === lastSent) return;
    lastSent = v;
    lastSendAt = Date.now();
    client.decide(v);
    if (options.onChange) options.onChange(v);
  }

  input.addEventListener("input", () => {
    dragging = true;
    touched = true;
    output.textContent = format(value());
    if (options.onInput) options.onInput(value());
    if (sendTimer !== null) return; // coalesced into the frame already scheduled
    const wait = Math.max(0, SEND_INTERVAL_MS - (Date.now() - lastSendAt));
    sendTimer = setTimeout(() => {
      sendTimer = null;
      requestAnimationFrame(send);
    }, wait);
  });
  input.addEventListener("change", () => {
    dragging = false;
    touched = true;
    output.textContent = format(value());
    send(); // the final value always goes out, right away
  });

  function syncFromServer() {
    // Only when the participant is not moving it and nothing of theirs is still in flight:
    // otherwise their own newer value wins.
    if (dragging) return;
    const pending = client.state.pending.filter((f) => f.channel === "decisions");
    const v = pending.length ? pending[pending.length - 1].payload :
      client.state.groupDecisions[page.me()];
    if (typeof v !== "number") return;
    if (pending.length === 0 && touched && lastSent !== null && v !== lastSent) return;
    input.value = String(v);
    output.textContent = format(v);
    lastSent = v;
  }

  client.on("hello", syncFromServer);
  client.on("period_start", () => {
    // carry_decisions false: a new period starts from the initial decisions.
    touched = false;
    syncFromServer();
  });

  return {
    nodes: [row, help],
    input,
    value,
    render() {
      input.disabled = !page.running();
      if (!touched) syncFromServer();
    },
  };
}
