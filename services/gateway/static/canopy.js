/*
 * Canopy participant client: one WebSocket to the gateway, per PROTOCOL.md
 * ("Participants' WebSocket"). Plain ES2017, no dependencies, no build step.
 *
 *   const client = Canopy.connect("ws://host/ws/<code>", "<code>", {
 *     onStatus(status) {},        // "connecting" | "connected" | "reconnecting"
 *                                 // | "replaced" (4409) | "refused" (4403) | "closed"
 *     onHello(payload) {},        // after every (re)connect, pending frames already resent
 *     onError(payload) {},        // {code, message, seq}
 *     onMessage(channel, payload, ts) {},  // every broadcast / server event
 *     group_decisions(payload, ts) {},     // optional, one per channel name
 *   });
 *   client.send("decisions", 0.42);        // -> seq; delivered at least once
 *   client.state                           // live view, see below
 *
 * What it guarantees:
 * - Every frame gets the next seq of this participant (counter in localStorage under
 *   "canopy.seq.<code>", holding the next seq to use). A frame stays pending (sessionStorage
 *   "canopy.pending.<code>", so a reload keeps it) until an `ack` with seq >= its own, a `hello`
 *   whose last_seq >= its own, or an `error` naming its seq. After every hello the remaining
 *   pending frames are sent again, in seq order, with their original seq; the gateway drops
 *   duplicates.
 * - Reconnects forever with exponential backoff and jitter (250 ms doubling to 5 s), except
 *   after close code 4403 (unknown participant: status "refused") or 4409 (replaced by a newer
 *   connection with the same code: status "replaced"; client.reconnect() takes over again).
 * - Frames leave at most `maxRate` per second with bursts of `maxBurst`, under the gateway's
 *   flood limit, so a long offline queue does not come back as `too_many_messages`.
 * - A connection that leaves sent frames without any answer for `ackTimeoutMs` is treated as
 *   dead (a browser cannot ping) and replaced by a new one.
 */
(function (global) {
  "use strict";

  var DEFAULTS = {
    minDelayMs: 250,
    maxDelayMs: 5000,
    ackTimeoutMs: 15000,
    maxRate: 40,
    maxBurst: 50,
    floodPauseMs: 1000,
    maxFrameBytes: 65000,
  };
  var CLOSE_REFUSED = 4403;
  var CLOSE_REPLACED = 4409;
  var CLOSE_CLIENT_GAVE_UP = 4000;
  var PERIOD_RANK = { waiting: 0, running: 1, paused: 1, ended: 2 };

  function storageOrNull(name) {
    try {
      var s = global[name];
      var probe = "canopy.probe";
      s.setItem(probe, "1");
      s.removeItem(probe);
      return s;
    } catch (e) {
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

  class CanopyClient {
    constructor(wsUrl, participantCode, handlers, options) {
      this.url = wsUrl;
      this.code = participantCode;
      this.handlers = handlers || {};
      var o = Object.assign({}, DEFAULTS, options || {});
      this.options = o;
      this._WebSocket = o.WebSocket || global.WebSocket;
      if (typeof o.random !== "function") o.random = Math.random;
      this._local = "localStorage" in o ? o.localStorage : storageOrNull("localStorage");
      this._session = "sessionStorage" in o ? o.sessionStorage : storageOrNull("sessionStorage");
      this._seqKey = "canopy.seq." + participantCode;
      this._pendingKey = "canopy.pending." + participantCode;

      this.state = {
        status: "connecting",
        lastSeq: 0, // the server's last_seq, as far as this client knows
        nextSeq: 1,
        pending: this._loadPending(),
        hello: null,
        groupDecisions: {},
        period: null, // {number, state, ends_at, length?, payoffs?}
        subperiod: null,
        presence: {}, // code -> true | false | null (unknown)
        serverOffset: null, // server clock minus local clock, seconds
        connections: 0, // hellos received
        failedAttempts: 0, // connection attempts in a row that never got a hello
        retryInMs: null,
      };
      var maxPending = this.state.pending.reduce(function (m, f) {
        return Math.max(m, f.seq);
      }, 0);
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

      this._onOnline = this._retryNow.bind(this);
      this._onVisible = function () {
        if (!global.document || global.document.visibilityState === "visible") this._retryNow();
      }.bind(this);
      if (typeof global.addEventListener === "function") {
        global.addEventListener("online", this._onOnline);
        if (global.document) global.document.addEventListener("visibilitychange", this._onVisible);
      }
      this._open();
    }

    // ---- public API ----------------------------------------------------------------

    /** Queue a frame on `channel`; it is sent now if connected, else after the next hello. */
    send(channel, payload) {
      if (typeof channel !== "string" || channel === "") {
        throw new TypeError("Canopy: channel must be a non-empty string");
      }
      if (payload === undefined) payload = null;
      var seq = Math.max(this.state.nextSeq, this._storedNextSeq());
      var frame = { channel: channel, payload: payload, seq: seq };
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
      this._preHello = { period: null, presence: [] };
      this._setStatus(this._everConnected ? "reconnecting" : "connecting");
      var ws;
      try {
        ws = new this._WebSocket(this.url);
      } catch (e) {
        this._warn("cannot open WebSocket", e);
        this._connectionLost();
        return;
      }
      this._ws = ws;
      var self = this;
      ws.onmessage = function (ev) {
        if (ws === self._ws) self._onFrame(ev.data);
      };
      ws.onclose = function (ev) {
        if (ws !== self._ws) return;
        self._ws = null;
        self._onClose(ev.code);
      };
      ws.onerror = function () {}; // a close event always follows
    }

    _detach() {
      var ws = this._ws;
      if (!ws) return;
      this._ws = null;
      this._helloReceived = false;
      ws.onmessage = ws.onclose = ws.onerror = ws.onopen = null;
      try {
        ws.close(CLOSE_CLIENT_GAVE_UP, "client reconnects");
      } catch (e) {
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
      this._connectionLost();
    }

    _connectionLost() {
      this._clearTimers();
      this._helloReceived = false;
      this.state.failedAttempts += 1;
      if (this._everConnected) this._setStatus("reconnecting");
      // Equal jitter: half the nominal delay fixed, half random, so a room full of browsers
      // that lost the same gateway does not come back in one burst.
      var o = this.options;
      var nominal = Math.min(o.maxDelayMs, o.minDelayMs * Math.pow(2, this._attempt));
      this._attempt = Math.min(this._attempt + 1, 30);
      var delay = nominal / 2 + (o.random() * nominal) / 2;
      this.state.retryInMs = delay;
      var self = this;
      this._retryTimer = setTimeout(function () {
        self._retryTimer = null;
        self._open();
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
      var msg;
      try {
        msg = JSON.parse(data);
      } catch (e) {
        this._warn("ignoring a frame that is not JSON", data);
        return;
      }
      if (!isObject(msg) || typeof msg.channel !== "string") return;
      if (typeof msg.ts === "number") this._clockSample(msg.ts);
      this._heardFromServer();
      var payload = msg.payload;
      switch (msg.channel) {
        case "hello":
          this._onHello(payload, msg.ts);
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

    _onHello(p, ts) {
      if (!isObject(p)) return;
      var st = this.state;
      var last = isSeq(p.last_seq) ? p.last_seq : 0;
      st.lastSeq = last;
      st.hello = p;
      if (typeof ts === "number") st.serverOffset = ts - Date.now() / 1000;
      st.groupDecisions = Object.assign({}, isObject(p.group_decisions) ? p.group_decisions : {});

      // `period_start` may overtake the hello (PROTOCOL.md, "Order"): keep the newer one.
      var period = isObject(p.period) ? Object.assign({}, p.period) : null;
      if (periodIsOlder(period, this._preHello.period)) period = this._preHello.period;
      st.period = period;

      // Presence: unknown until heard of, unless the gateway says (an optional `presence`
      // map in the hello) or a period_start implies it; then what came before this hello.
      var presence = {};
      (Array.isArray(p.members) ? p.members : []).forEach(function (m) {
        presence[m] = null;
      });
      if (isObject(p.presence)) {
        Object.keys(p.presence).forEach(function (m) {
          presence[m] = !!p.presence[m];
        });
      }
      st.presence = presence;
      var self = this;
      this._preHello.presence.forEach(function (change) {
        self._applyPresence(change[0], change[1]);
      });
      presence[p.participant || this.code] = true;

      this._dropPendingUpTo(last);
      if (st.nextSeq <= last) this._setNextSeq(last + 1);

      this._helloReceived = true;
      this._everConnected = true;
      this._attempt = 0;
      st.failedAttempts = 0;
      st.connections += 1;
      this._sentSeqs.clear();
      this._flush();
      this._setStatus("connected");
      this._emit("onHello", p);
    }

    _onAck(p) {
      if (!isObject(p) || !isSeq(p.seq)) return;
      if (p.seq > this.state.lastSeq) this.state.lastSeq = p.seq;
      this._dropPendingUpTo(p.seq);
      this._emit("onAck", p.seq);
    }

    _onError(p) {
      if (isObject(p) && isSeq(p.seq)) {
        var i = this._pendingIndex(p.seq);
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
      this._emit("onError", isObject(p) ? p : { code: "unknown", message: String(p), seq: null });
    }

    _onBroadcast(channel, p, ts) {
      var st = this.state;
      if (channel === "group_decisions" && isObject(p)) {
        st.groupDecisions = Object.assign({}, st.groupDecisions, p);
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
          st.groupDecisions = Object.assign({}, st.groupDecisions, p.group_decisions);
        }
        this._setPeriod({
          number: p.period,
          state: "ended",
          ends_at: null,
          payoffs: isObject(p.payoffs) ? p.payoffs : {},
        });
      } else if (channel === "subperiod" && isObject(p)) {
        st.subperiod = p;
        if (isObject(p.group_decisions)) {
          st.groupDecisions = Object.assign({}, st.groupDecisions, p.group_decisions);
        }
      } else if (channel === "presence" && isObject(p) && typeof p.participant === "string") {
        this._presenceChange(p.participant, !!p.connected);
      }
      this._emit("onMessage", channel, p, ts);
      if (Object.prototype.hasOwnProperty.call(this.handlers, channel)) {
        this._emit(channel, p, ts);
      }
    }

    _presenceChange(participant, connected) {
      // participant null: every member. Before the hello, also kept to replay onto it.
      if (!this._helloReceived) this._preHello.presence.push([participant, connected]);
      this._applyPresence(participant, connected);
    }

    _applyPresence(participant, connected) {
      var presence = this.state.presence;
      var members = participant === null ? Object.keys(presence) : [participant];
      for (var i = 0; i < members.length; i++) {
        // This client knows best whether it is connected itself.
        if (members[i] !== this.code) presence[members[i]] = connected;
      }
    }

    _setPeriod(period) {
      if (!this._helloReceived) this._preHello.period = period;
      if (!periodIsOlder(period, this.state.period)) this.state.period = period;
    }

    _clockSample(ts) {
      // A frame's ts is at most "now" on the server when it arrives, so the largest offset
      // seen is the closest to the truth; the hello resets it (see _onHello).
      var offset = ts - Date.now() / 1000;
      if (this.state.serverOffset === null || offset > this.state.serverOffset) {
        this.state.serverOffset = offset;
      }
    }

    // ---- outbound ------------------------------------------------------------------

    _flush() {
      var ws = this._ws;
      if (!ws || !this._helloReceived || ws.readyState !== 1 || this._flushTimer !== null) return;
      var o = this.options;
      var now = Date.now();
      if (now < this._pausedUntil) {
        this._scheduleFlush(this._pausedUntil - now);
        return;
      }
      this._tokens = Math.min(o.maxBurst, this._tokens + ((now - this._tokensAt) / 1000) * o.maxRate);
      this._tokensAt = now;
      var pending = this.state.pending;
      for (var i = 0; i < pending.length; i++) {
        var frame = pending[i];
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
      }
      this._armAckTimer();
    }

    _scheduleFlush(delayMs) {
      var self = this;
      this._flushTimer = setTimeout(function () {
        self._flushTimer = null;
        self._flush();
      }, Math.max(1, Math.ceil(delayMs)));
    }

    _armAckTimer() {
      if (this._ackTimer !== null || this._sentSeqs.size === 0) return;
      var self = this;
      this._ackTimer = setTimeout(function () {
        self._ackTimer = null;
        if (self._sentSeqs.size > 0 && self._ws) {
          self._warn("no answer from the server, reconnecting");
          self.dropConnection();
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
      var before = this.state.pending.length;
      var sent = this._sentSeqs;
      this.state.pending = this.state.pending.filter(function (f) {
        if (f.seq > seq) return true;
        sent.delete(f.seq);
        return false;
      });
      if (this.state.pending.length !== before) this._savePending();
      this._armAckTimer();
    }

    _pendingIndex(seq) {
      var pending = this.state.pending;
      for (var i = 0; i < pending.length; i++) if (pending[i].seq === seq) return i;
      return -1;
    }

    // ---- storage -------------------------------------------------------------------

    _storedNextSeq() {
      if (!this._local) return 1;
      var n = parseInt(this._local.getItem(this._seqKey), 10);
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
        var frames = JSON.parse(this._session.getItem(this._pendingKey) || "[]");
        if (!Array.isArray(frames)) return [];
        return frames
          .filter(function (f) {
            return isObject(f) && typeof f.channel === "string" && isSeq(f.seq);
          })
          .map(function (f) {
            return { channel: f.channel, payload: f.payload, seq: f.seq };
          })
          .sort(function (a, b) {
            return a.seq - b.seq;
          });
      } catch (e) {
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
      [this._retryTimer, this._flushTimer, this._ackTimer].forEach(function (t) {
        if (t !== null) clearTimeout(t);
      });
      this._retryTimer = this._flushTimer = this._ackTimer = null;
    }

    _setStatus(status) {
      if (this.state.status === status) return;
      this.state.status = status;
      this._emit("onStatus", status);
    }

    _emit(name) {
      var fn = this.handlers[name];
      if (typeof fn !== "function") return;
      try {
        fn.apply(this.handlers, Array.prototype.slice.call(arguments, 1));
      } catch (e) {
        // A broken handler must not break the connection or lose frames.
        if (global.console) global.console.error("Canopy handler " + name + " failed", e);
      }
    }

    _warn() {
      if (global.console) {
        global.console.warn.apply(
          global.console,
          ["Canopy:"].concat(Array.prototype.slice.call(arguments)),
        );
      }
    }
  }

  global.Canopy = {
    version: "1",
    Client: CanopyClient,
    connect: function (wsUrl, participantCode, handlers, options) {
      return new CanopyClient(wsUrl, participantCode, handlers, options);
    },
  };
})(typeof window !== "undefined" ? window : this);
