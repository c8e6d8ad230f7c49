/*
 * Canopy participant client: one WebSocket to the gateway, per PROTOCOL.md
 * ("Participants' WebSocket"). One ES module, no dependencies, no build step; the participant
 * pages (page.js) are built on it, and so can a plug-in experiment's own page (docs/pages.md).
 *
 *   import { connect, connectHere } from "/static/canopy.js";
 *   const client = connectHere();            // the seat key and socket URL from /p/<key>
 *   // or connect("ws://host/ws/<key>", "<key>", handlers?, options?)
 *   client.code                              // the participant's public code (from hello)
 *   client.on("status", (status) => {});     // "connecting" | "connected" | "reconnecting"
 *                                            // | "replaced" (4409) | "refused" (4403) | "closed"
 *   client.on("hello", (payload) => {});     // after every (re)connect, pending frames resent
 *   client.on("group_decisions", (payload, ts) => {});  // any channel the server sends on
 *   client.on("message", (channel, payload, ts) => {}); // every broadcast / server event
 *   client.on("error", (payload) => {});     // {code, message, seq}
 *   client.on("ack", (seq) => {});
 *   client.decide(0.42);                     // = send("decisions", 0.42) -> seq
 *   client.send("orders", {side: "bid", price: 40, quantity: 1});
 *   client.serverNow()                       // server clock, epoch seconds
 *   client.state                             // live view, see the constructor
 *   client.inLobby()                         // waiting for a group (grouping "arrival")
 *
 * `on` returns a function that removes the listener. "status" and "message" are the client's
 * own events; every other name is a server channel. The older `handlers` object
 * (onStatus, onHello, onError, onAck, onMessage, and one key per channel) still works.
 *
 * What it guarantees:
 * - Every frame gets the next seq of this participant (counter in localStorage under
 *   "canopy.seq.<key>", holding the next seq to use). A frame stays pending (sessionStorage
 *   "canopy.pending.<key>", so a reload keeps it) until an `ack` with seq >= its own, a `hello`
 *   whose last_seq >= its own, or an `error` naming its seq. After every hello the remaining
 *   pending frames are sent again, in seq order, with their original seq; the gateway drops
 *   duplicates. `state.lastSeq` only grows: the largest seq an ack or a hello confirmed.
 * - Reconnects forever with exponential backoff and jitter (250 ms doubling to 5 s), except
 *   after close code 4403 (unknown seat key: status "refused") or 4409 (replaced by a newer
 *   connection with the same key: status "replaced"; client.reconnect() takes over again).
 *   After 4429 (too many connections of this seat within a minute) it waits the longest
 *   backoff before it tries again.
 * - Seats (PROTOCOL v2): the link and the socket carry the seat's secret key; every payload
 *   names members by their public code. The client learns its own code from `hello`
 *   (`options.code` may give it earlier, as the page does from its embedded configuration).
 * - Frames leave at most `maxRate` per second with bursts of `maxBurst`, under the gateway's
 *   flood limit, so a long offline queue does not come back as `too_many_messages`.
 * - A connection that leaves sent frames without any answer for `ackTimeoutMs` is treated as
 *   dead (a browser cannot ping) and replaced by a new one.
 * - The lobby (PROTOCOL v2, `grouping: "arrival"`): a seat without a group gets a `hello` with
 *   `group` null, `members` [] and `period.state` "lobby", then `lobby` frames
 *   ({waiting, group_size, timeout_at}: `state.lobby`, the latest). When the group forms, the
 *   same connection gets a second `hello`, the group's: `state` is rebuilt from it and "hello"
 *   is emitted again (listen to "hello" for every change of group, not just reconnects). The
 *   group's own frames (presence, period_start) may come before its hello: they are kept
 *   and applied over it, as before a first hello.
 * - The server clock: every server frame's `ts` was stamped before it arrived, so
 *   `ts - arrival` is a lower bound of the offset (server minus local clock); a `hello`, `ack`
 *   or `error` was stamped after the connect or frame that caused it left, so
 *   `ts - departure` is an upper bound. The client keeps the tightest bounds (the least
 *   delayed frames and round trips win, as in NTP) and uses the lower one, which a broadcast
 *   makes tight (a few ms): `state.serverOffset`; the true offset is at most
 *   `state.clockError` seconds above it. So every member's countdown shows the same time left,
 *   whatever their own clocks say. A sample outside the bounds (a clock was set) restarts them.
 */

const global = typeof window !== "undefined" ? window : globalThis;

const DEFAULTS = {
  minDelayMs: 250,
  maxDelayMs: 5000,
  ackTimeoutMs: 15000,
  maxRate: 40,
  maxBurst: 50,
  floodPauseMs: 1000,
  maxFrameBytes: 65000,
};
const CLOSE_REFUSED = 4403;
const CLOSE_REPLACED = 4409;
const CLOSE_TOO_MANY_CONNECTIONS = 4429; // a reconnect storm: wait the longest backoff
const CLOSE_CLIENT_GAVE_UP = 4000;
const PERIOD_RANK = { lobby: -1, waiting: 0, running: 1, paused: 1, ended: 2 };
// Names of the handlers object (the older API) for the events of `on`.
const LEGACY_HANDLER = {
  status: "onStatus",
  hello: "onHello",
  error: "onError",
  ack: "onAck",
  message: "onMessage",
};

function storageOrNull(name) {
  try {
    const s = global[name];
    const probe = "canopy.probe";
    s.setItem(probe, "1");
    s.removeItem(probe);
    return s;
  } catch {
    return null; // disabled storage (privacy mode, sandboxed frame): keep state in memory
  }
}

function isSeq(value) {
  return typeof value === "number" && Number.isInteger(value) && value >= 1;
}

function isObject(value) {
  return value !== null && typeof value === "object" && !Array.isArray(value);
}

function periodIsOlder(a, b) {
  // Is period snapshot `a` behind `b`? Periods only move forward: number, then state.
  if (!b) return false;
  if (!a) return true;
  if (a.number !== b.number) return (a.number || 0) < (b.number || 0);
  return (PERIOD_RANK[a.state] || 0) < (PERIOD_RANK[b.state] || 0);
}

export class CanopyClient {
  constructor(wsUrl, seatKey, handlers, options) {
    this.url = wsUrl;
    this.handlers = handlers || {};
    const o = { ...DEFAULTS, ...options };
    this.code = typeof o.code === "string" && o.code ? o.code : null; // set again by hello
    this.options = o;
    this._WebSocket = o.WebSocket || global.WebSocket;
    if (typeof o.random !== "function") o.random = Math.random;
    this._local = "localStorage" in o ? o.localStorage : storageOrNull("localStorage");
    this._session = "sessionStorage" in o ? o.sessionStorage : storageOrNull("sessionStorage");
    this._seqKey = `canopy.seq.${seatKey}`;
    this._pendingKey = `canopy.pending.${seatKey}`;

    this.state = {
      status: "connecting",
      lastSeq: 0, // the server's last_seq, as far as this client knows
      nextSeq: 1,
      pending: this._loadPending(),
      hello: null,
      lobby: null, // the latest `lobby` frame while in the lobby, else null
      groupDecisions: {},
      period: null, // {number, state, ends_at, length?, payoffs?}
      subperiod: null,
      presence: {}, // code -> true | false | null (unknown)
      serverOffset: null, // server clock minus local clock, seconds (its lower bound)
      clockError: null, // the width of its bounds, seconds (null: no upper bound yet)
      connections: 0, // hellos received
      failedAttempts: 0, // connection attempts in a row that never got a hello
      retryInMs: null,
    };
    const maxPending = this.state.pending.reduce((m, f) => Math.max(m, f.seq), 0);
    this.state.nextSeq = Math.max(1, this._storedNextSeq(), maxPending + 1);

    this._ws = null;
    this._helloReceived = false;
    this._everConnected = false;
    this._stopped = false;
    this._attempt = 0;
    this._retryTimer = null;
    this._flushTimer = null;
    this._ackTimer = null;
    this._sentSeqs = new Set(); // seqs sent on the current connection, not yet answered
    this._tokens = o.maxBurst;
    this._tokensAt = Date.now();
    this._pausedUntil = 0;
    this._preHello = null;
    this._inLobby = false; // the last hello was a lobby hello: the group's frames may come first
    this._listeners = new Map(); // event name -> [fn]
    this._openedAt = 0; // local ms when the current socket was opened
    this._sentAt = new Map(); // seq -> local ms it first left on the current connection
    this._clockLow = -Infinity; // bounds of the server offset, seconds
    this._clockHigh = Infinity;

    this._onOnline = this._retryNow.bind(this);
    this._onVisible = () => {
      if (!global.document || global.document.visibilityState === "visible") this._retryNow();
    };
    if (typeof global.addEventListener === "function") {
      global.addEventListener("online", this._onOnline);
      if (global.document) global.document.addEventListener("visibilitychange", this._onVisible);
    }
    this._open();
  }

  // ---- public API ----------------------------------------------------------------

  /**
   * Listen to `name`: a server channel ("hello", "group_decisions", "period_end", "book", …,
   * called with (payload, ts)), "message" (every broadcast: channel, payload, ts), "status"
   * (the connection's status), "error" (payload) or "ack" (seq). Returns the remover.
   */
  on(name, fn) {
    if (typeof fn !== "function") throw new TypeError("Canopy: on() needs a function");
    if (!this._listeners.has(name)) this._listeners.set(name, []);
    this._listeners.get(name).push(fn);
    return () => {
      this.off(name, fn);
    };
  }

  off(name, fn) {
    const list = this._listeners.get(name);
    if (!list) return;
    const i = list.indexOf(fn);
    if (i >= 0) list.splice(i, 1);
  }

  /** Send a decision on the `decisions` channel; delivered at least once. Returns its seq. */
  decide(value) {
    return this.send("decisions", value);
  }

  /** Queue a frame on `channel`; it is sent now if connected, else after the next hello. */
  send(channel, payload) {
    if (typeof channel !== "string" || channel === "") {
      throw new TypeError("Canopy: channel must be a non-empty string");
    }
    if (payload === undefined) payload = null;
    const seq = Math.max(this.state.nextSeq, this._storedNextSeq());
    const frame = { channel, payload, seq };
    if (JSON.stringify(frame).length > this.options.maxFrameBytes) {
      // The gateway would close the socket (1009) and the resend would loop forever.
      throw new RangeError("Canopy: frame too large");
    }
    this._setNextSeq(seq + 1);
    this.state.pending.push(frame);
    this._savePending();
    this._flush();
    return seq;
  }

  /** Whether this seat waits in the lobby for its group (its hello had no group). */
  inLobby() {
    return this._inLobby;
  }

  /** Server time now (epoch seconds), from the offset seen in the server's `ts`. */
  serverNow() {
    return Date.now() / 1000 + (this.state.serverOffset || 0);
  }

  /** Start again after "replaced" / "refused" / close(): takes the participant back. */
  reconnect() {
    this._stopped = false;
    this._attempt = 0;
    this._detach();
    this._open();
  }

  /** Drop the current socket as a network failure would; the client reconnects itself. */
  dropConnection() {
    if (this._stopped) return;
    this._detach();
    this._connectionLost();
  }

  /** Stop for good (no reconnect). Pending frames stay stored for the next page load. */
  close() {
    this._stopped = true;
    this._detach();
    this._clearTimers();
    if (typeof global.removeEventListener === "function") {
      global.removeEventListener("online", this._onOnline);
      if (global.document) {
        global.document.removeEventListener("visibilitychange", this._onVisible);
      }
    }
    this._setStatus("closed");
  }

  // ---- connection ----------------------------------------------------------------

  _open() {
    this._clearTimers();
    this.state.retryInMs = null;
    this._helloReceived = false;
    this._sentSeqs.clear();
    this._sentAt.clear();
    this._preHello = { period: null, presence: [] };
    this._inLobby = false;
    this._setStatus(this._everConnected ? "reconnecting" : "connecting");
    let ws;
    this._openedAt = Date.now();
    try {
      ws = new this._WebSocket(this.url);
    } catch (e) {
      this._warn("cannot open WebSocket", e);
      this._connectionLost();
      return;
    }
    this._ws = ws;
    ws.onmessage = (ev) => {
      if (ws === this._ws) this._onFrame(ev.data);
    };
    ws.onclose = (ev) => {
      if (ws !== this._ws) return;
      this._ws = null;
      this._onClose(ev.code);
    };
    ws.onerror = () => {}; // a close event always follows
  }

  _detach() {
    const ws = this._ws;
    if (!ws) return;
    this._ws = null;
    this._helloReceived = false;
    ws.onmessage = ws.onclose = ws.onerror = ws.onopen = null;
    try {
      ws.close(CLOSE_CLIENT_GAVE_UP, "client reconnects");
    } catch {
      /* already closing */
    }
  }

  _onClose(code) {
    this._helloReceived = false;
    if (this._stopped) return;
    if (code === CLOSE_REFUSED) {
      this._stopped = true;
      this._clearTimers();
      this._setStatus("refused");
      return;
    }
    if (code === CLOSE_REPLACED) {
      this._stopped = true;
      this._clearTimers();
      this._setStatus("replaced");
      return;
    }
    // Too many connections of this seat within a minute (PROTOCOL v2): the gateway lets it in
    // again once its window allows; come back after the longest backoff, not sooner.
    if (code === CLOSE_TOO_MANY_CONNECTIONS) this._attempt = 30;
    this._connectionLost();
  }

  _connectionLost() {
    this._clearTimers();
    this._helloReceived = false;
    this.state.failedAttempts += 1;
    if (this._everConnected) this._setStatus("reconnecting");
    // Equal jitter: half the nominal delay fixed, half random, so a room full of browsers
    // that lost the same gateway does not come back in one burst.
    const o = this.options;
    const nominal = Math.min(o.maxDelayMs, o.minDelayMs * Math.pow(2, this._attempt));
    this._attempt = Math.min(this._attempt + 1, 30);
    const delay = nominal / 2 + (o.random() * nominal) / 2;
    this.state.retryInMs = delay;
    this._retryTimer = setTimeout(() => {
      this._retryTimer = null;
      this._open();
    }, delay);
  }

  _retryNow() {
    // The network came back or the tab became visible: no need to wait out the backoff.
    if (this._stopped || this._retryTimer === null) return;
    this._attempt = 0;
    clearTimeout(this._retryTimer);
    this._retryTimer = null;
    this._open();
  }

  // ---- inbound -------------------------------------------------------------------

  _onFrame(data) {
    if (typeof data !== "string") return;
    let msg;
    try {
      msg = JSON.parse(data);
    } catch {
      this._warn("ignoring a frame that is not JSON", data);
      return;
    }
    if (!isObject(msg) || typeof msg.channel !== "string") return;
    if (typeof msg.ts === "number") this._clockSample(msg, Date.now());
    this._heardFromServer();
    const payload = msg.payload;
    switch (msg.channel) {
      case "hello":
        this._onHello(payload);
        break;
      case "ack":
        this._onAck(payload);
        break;
      case "error":
        this._onError(payload);
        break;
      default:
        this._onBroadcast(msg.channel, payload, msg.ts);
    }
    this._armAckTimer(); // the connection is alive: give what is still unanswered more time
  }

  _onHello(p) {
    if (!isObject(p)) return;
    const st = this.state;
    // The larger of what this client knows (acks) and what the hello says: a hello that was
    // overtaken (an older connection's) must not make it resend or renumber acked frames.
    const last = Math.max(st.lastSeq, isSeq(p.last_seq) ? p.last_seq : 0);
    st.lastSeq = last;
    st.hello = p;
    st.groupDecisions = isObject(p.group_decisions) ? { ...p.group_decisions } : {};

    // `period_start` may overtake the hello (PROTOCOL.md, "Order"): keep the newer one.
    let period = isObject(p.period) ? { ...p.period } : null;
    if (periodIsOlder(period, this._preHello.period)) period = this._preHello.period;
    st.period = period;

    // Presence: unknown until heard of, unless the gateway says (an optional `presence`
    // map in the hello) or a period_start implies it; then what came before this hello.
    const presence = {};
    (Array.isArray(p.members) ? p.members : []).forEach((m) => {
      presence[m] = null;
    });
    if (isObject(p.presence)) {
      Object.keys(p.presence).forEach((m) => {
        presence[m] = !!p.presence[m];
      });
    }
    st.presence = presence;
    for (const [participant, connected] of this._preHello.presence) {
      this._applyPresence(participant, connected);
    }
    if (typeof p.participant === "string" && p.participant) this.code = p.participant;
    if (this.code) presence[this.code] = true;

    // A lobby hello (PROTOCOL v2 "The lobby"): no group yet. Until the group's hello comes,
    // the group's frames are kept as before a first hello (see _setPeriod, _presenceChange).
    this._inLobby = p.group === null || (isObject(p.period) && p.period.state === "lobby");
    this._preHello = { period: null, presence: [] };
    if (!this._inLobby) st.lobby = null;

    this._dropPendingUpTo(last);
    if (st.nextSeq <= last) this._setNextSeq(last + 1);

    this._helloReceived = true;
    this._everConnected = true;
    this._attempt = 0;
    st.failedAttempts = 0;
    st.connections += 1;
    this._sentSeqs.clear();
    this._sentAt.clear();
    this._flush();
    this._setStatus("connected");
    this._emit("hello", p);
  }

  _onAck(p) {
    if (!isObject(p) || !isSeq(p.seq)) return;
    if (p.seq > this.state.lastSeq) this.state.lastSeq = p.seq;
    this._dropPendingUpTo(p.seq);
    this._sentAt.delete(p.seq); // its clock sample is taken (_onFrame)
    this._emit("ack", p.seq);
  }

  _onError(p) {
    if (isObject(p) && isSeq(p.seq)) {
      const i = this._pendingIndex(p.seq);
      if (i >= 0) {
        if (p.code === "too_many_messages") {
          // Not applied, but sending it again later will be: keep it and slow down.
          this._sentSeqs.delete(p.seq);
          this._pausedUntil = Date.now() + this.options.floodPauseMs;
          this._flush();
        } else {
          // Rejected for good (bad frame, invalid decision, period not running).
          this._sentSeqs.delete(p.seq);
          this.state.pending.splice(i, 1);
          this._savePending();
        }
      }
    }
    if (isObject(p)) this._sentAt.delete(p.seq);
    this._emit("error", isObject(p) ? p : { code: "unknown", message: String(p), seq: null });
  }

  _onBroadcast(channel, p, ts) {
    const st = this.state;
    if (channel === "group_decisions" && isObject(p)) {
      st.groupDecisions = { ...st.groupDecisions, ...p };
    } else if (channel === "period_start" && isObject(p)) {
      // A period starts when every member is connected (PROTOCOL.md).
      this._presenceChange(null, true);
      this._setPeriod({
        number: p.period,
        state: "running",
        ends_at: typeof p.ends_at === "number" ? p.ends_at : null,
        length: p.length,
        payoffs: null,
      });
    } else if (channel === "period_end" && isObject(p)) {
      if (isObject(p.group_decisions)) {
        st.groupDecisions = { ...st.groupDecisions, ...p.group_decisions };
      }
      this._setPeriod({
        number: p.period,
        state: "ended",
        ends_at: null,
        payoffs: isObject(p.payoffs) ? p.payoffs : {},
      });
    } else if (channel === "period_paused" && isObject(p)) {
      // on_disconnect "pause": the clock stops with `remaining` seconds left.
      this._setPeriod({
        number: p.period,
        state: "paused",
        ends_at: null,
        remaining: typeof p.remaining === "number" ? p.remaining : null,
        length: st.period ? st.period.length : undefined,
        payoffs: null,
      });
    } else if (channel === "period_resumed" && isObject(p)) {
      this._setPeriod({
        number: p.period,
        state: "running",
        ends_at: typeof p.ends_at === "number" ? p.ends_at : null,
        length: st.period ? st.period.length : undefined,
        payoffs: null,
      });
    } else if (channel === "subperiod" && isObject(p)) {
      st.subperiod = p;
      if (isObject(p.group_decisions)) {
        st.groupDecisions = { ...st.groupDecisions, ...p.group_decisions };
      }
    } else if (channel === "presence" && isObject(p) && typeof p.participant === "string") {
      this._presenceChange(p.participant, !!p.connected);
    } else if (channel === "lobby" && isObject(p) && this._inLobby) {
      st.lobby = p; // one that was on its way when the group formed is not kept
    }
    this._emit("message", channel, p, ts);
    if (channel !== "message" && channel !== "status") this._emit(channel, p, ts);
  }

  _presenceChange(participant, connected) {
    // participant null: every member. Before the hello (or the group's, in the lobby), also
    // kept to replay onto it.
    if (!this._helloReceived || this._inLobby) {
      this._preHello.presence.push([participant, connected]);
    }
    this._applyPresence(participant, connected);
  }

  _applyPresence(participant, connected) {
    const presence = this.state.presence;
    const members = participant === null ? Object.keys(presence) : [participant];
    for (let i = 0; i < members.length; i++) {
      // This client knows best whether it is connected itself.
      if (members[i] !== this.code) presence[members[i]] = connected;
    }
  }

  _setPeriod(period) {
    if (!this._helloReceived || this._inLobby) this._preHello.period = period;
    if (!periodIsOlder(period, this.state.period)) this.state.period = period;
  }

  _clockSample(msg, arrivedMs) {
    // Every frame was stamped before it arrived: offset >= ts - arrival. A hello was stamped
    // after this socket was opened, an ack or error after the frame it answers first left on
    // this connection: offset <= ts - departure (the module docstring has the argument).
    const ts = msg.ts;
    const low = ts - arrivedMs / 1000;
    let high = Infinity;
    const seq = isObject(msg.payload) ? msg.payload.seq : null;
    if (msg.channel === "hello") {
      high = ts - this._openedAt / 1000;
    } else if ((msg.channel === "ack" || msg.channel === "error") && this._sentAt.has(seq)) {
      high = ts - this._sentAt.get(seq) / 1000;
    }
    let newLow = Math.max(this._clockLow, low);
    let newHigh = Math.min(this._clockHigh, high);
    if (newLow > newHigh) {
      // Not compatible with what came before: the local clock (or the server's) was set.
      // Start again from this sample.
      newLow = low;
      newHigh = high;
    }
    this._clockLow = newLow;
    this._clockHigh = newHigh;
    // The lower edge is the estimate: a broadcast reaches the browser a few ms after its ts,
    // while every upper bound also holds the server's own work (a hello waits for the store
    // and decisions, an ack for the broker's confirm), so the middle would be further off.
    this.state.serverOffset = newLow;
    this.state.clockError = newHigh !== Infinity ? newHigh - newLow : null;
  }

  // ---- outbound ------------------------------------------------------------------

  _flush() {
    const ws = this._ws;
    if (!ws || !this._helloReceived || ws.readyState !== 1 || this._flushTimer !== null) return;
    const o = this.options;
    const now = Date.now();
    if (now < this._pausedUntil) {
      this._scheduleFlush(this._pausedUntil - now);
      return;
    }
    this._tokens = Math.min(o.maxBurst, this._tokens + ((now - this._tokensAt) / 1000) * o.maxRate);
    this._tokensAt = now;
    const pending = this.state.pending;
    for (let i = 0; i < pending.length; i++) {
      const frame = pending[i];
      if (this._sentSeqs.has(frame.seq)) continue;
      if (this._tokens < 1) {
        this._scheduleFlush(((1 - this._tokens) / o.maxRate) * 1000);
        break;
      }
      try {
        ws.send(JSON.stringify(frame));
      } catch (e) {
        this._warn("send failed", e);
        return; // the close event will follow; the frame stays pending
      }
      this._tokens -= 1;
      this._sentSeqs.add(frame.seq);
      if (!this._sentAt.has(frame.seq)) this._sentAt.set(frame.seq, Date.now());
    }
    this._armAckTimer();
  }

  _scheduleFlush(delayMs) {
    this._flushTimer = setTimeout(() => {
      this._flushTimer = null;
      this._flush();
    }, Math.max(1, Math.ceil(delayMs)));
  }

  _armAckTimer() {
    if (this._ackTimer !== null || this._sentSeqs.size === 0) return;
    this._ackTimer = setTimeout(() => {
      this._ackTimer = null;
      if (this._sentSeqs.size > 0 && this._ws) {
        this._warn("no answer from the server, reconnecting");
        this.dropConnection();
      }
    }, this.options.ackTimeoutMs);
  }

  _heardFromServer() {
    if (this._ackTimer !== null) {
      clearTimeout(this._ackTimer);
      this._ackTimer = null;
    }
  }

  _dropPendingUpTo(seq) {
    const before = this.state.pending.length;
    const sent = this._sentSeqs;
    this.state.pending = this.state.pending.filter((f) => {
      if (f.seq > seq) return true;
      sent.delete(f.seq);
      return false;
    });
    if (this.state.pending.length !== before) this._savePending();
    this._armAckTimer();
  }

  _pendingIndex(seq) {
    const pending = this.state.pending;
    for (let i = 0; i < pending.length; i++) if (pending[i].seq === seq) return i;
    return -1;
  }

  // ---- storage -------------------------------------------------------------------

  _storedNextSeq() {
    if (!this._local) return 1;
    const n = parseInt(this._local.getItem(this._seqKey), 10);
    return isSeq(n) ? n : 1;
  }

  _setNextSeq(n) {
    this.state.nextSeq = n;
    if (!this._local) return;
    try {
      // Another tab of the same participant may have gone further: never go back.
      if (this._storedNextSeq() < n) this._local.setItem(this._seqKey, String(n));
    } catch (e) {
      this._warn("cannot store seq", e);
    }
  }

  _loadPending() {
    if (!this._session) return [];
    try {
      const frames = JSON.parse(this._session.getItem(this._pendingKey) || "[]");
      if (!Array.isArray(frames)) return [];
      return frames
        .filter((f) => isObject(f) && typeof f.channel === "string" && isSeq(f.seq))
        .map((f) => ({ channel: f.channel, payload: f.payload, seq: f.seq }))
        .sort((a, b) => a.seq - b.seq);
    } catch {
      return [];
    }
  }

  _savePending() {
    if (!this._session) return;
    try {
      if (this.state.pending.length === 0) this._session.removeItem(this._pendingKey);
      else this._session.setItem(this._pendingKey, JSON.stringify(this.state.pending));
    } catch (e) {
      this._warn("cannot store pending frames", e);
    }
  }

  // ---- helpers -------------------------------------------------------------------

  _clearTimers() {
    [this._retryTimer, this._flushTimer, this._ackTimer].forEach((t) => {
      if (t !== null) clearTimeout(t);
    });
    this._retryTimer = this._flushTimer = this._ackTimer = null;
  }

  _setStatus(status) {
    if (this.state.status === status) return;
    this.state.status = status;
    this._emit("status", status);
  }

  _emit(name, ...args) {
    const fns = (this._listeners.get(name) || []).slice();
    const legacy = this.handlers[LEGACY_HANDLER[name] || name];
    if (typeof legacy === "function") fns.unshift(legacy.bind(this.handlers));
    for (const fn of fns) {
      try {
        fn(...args);
      } catch (e) {
        // A broken handler must not break the connection or lose frames.
        if (global.console) global.console.error(`Canopy handler ${name} failed`, e);
      }
    }
  }

  _warn(...args) {
    if (global.console) {
      global.console.warn("Canopy:", ...args);
    }
  }
}

/** Open a client for `wsUrl`, the socket of the seat whose key is `seatKey`. */
export function connect(wsUrl, seatKey, handlers, options) {
  return new CanopyClient(wsUrl, seatKey, handlers, options);
}

/** The seat key of a page served at /p/<key>. */
export function pageKey(loc) {
  loc = loc || global.location;
  const segments = loc.pathname.split("/").filter(Boolean);
  return decodeURIComponent(segments[segments.length - 1] || "");
}

/** The WebSocket URL of the seat with key `key` on the server that served this page. */
export function socketUrl(key, loc) {
  loc = loc || global.location;
  const scheme = loc.protocol === "https:" ? "wss:" : "ws:";
  return `${scheme}//${loc.host}/ws/${encodeURIComponent(key)}`;
}

/** A client for the seat whose page this is (/p/<key>). */
export function connectHere(handlers, options) {
  const key = pageKey();
  return connect(socketUrl(key), key, handlers, options);
}

export const version = "4";
