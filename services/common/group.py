"""A group's state machine: decisions, presence, periods, rate limit, payoffs. Pure: no I/O.

Shared (services/common) because two services fold a group's log with it: decisions, live
and when it rebuilds a group after a restart, and the store, for `/replay`.

`GroupState` receives the group's inputs in its one total order (frames, presence, timer ticks)
and returns effects for the adapter to carry out (broadcasts, control frames, a StartPeriod
command, a deferred flush). Time is passed in, so tests drive it without clocks or brokers.

Crash safety: the event log is the state's durable form. `rebuild(config, experiment, rows)`
folds a group's log rows (in its order) through the same methods that live inputs use, so a
restarted worker, and a replay, arrive at the state the live one had. What the log does not
hold is recovered otherwise: which connection a member is on (`UNKNOWN` until its gateway
announces it again, see `Resync`), and whether a `StartPeriod` had gone out for a group that
was complete (it is sent again; timers keeps one schedule per period, so that is harmless).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from services.common.directory import GroupConfig
from services.common.errors import ErrorCode
from services.common.experiments import Experiment
from services.common.messages import Channel

PeriodState = Literal["waiting", "starting", "running", "paused", "ended"]

# A member the log says is connected, whose connection this worker has not been told yet.
UNKNOWN = ""
# Steps between the `ts` of one group's consecutive log rows: strictly increasing, so the log
# sorted by `ts` is the group's order (and stays so at the export's µs resolution).
TICK = 1e-6
# Rows about the period's clock: the state machine stamps them itself (payoffs are integrated
# over their ts), and a fold re-applies them through the same methods.
CLOCK_ROWS = frozenset(
    {
        Channel.PERIOD_START,
        Channel.SUBPERIOD,
        Channel.PERIOD_END,
        Channel.PERIOD_PAUSED,
        Channel.PERIOD_RESUMED,
    }
)


@dataclass(frozen=True)
class Broadcast:
    """A logged server frame for the whole group, or for one member when `participant` is set.

    `ts`: the row's timestamp when the state machine chose it (ticks, whose times payoffs are
    integrated over); None: the adapter stamps it when it carries the broadcast out."""

    channel: str
    payload: Any
    participant: str | None = None
    seq: int | None = None
    ts: float | None = field(default=None, compare=False)


@dataclass(frozen=True)
class Control:
    """An unlogged frame for one connection (`hello`, `replaced`)."""

    channel: str
    payload: Any
    participant: str
    connection: str


@dataclass(frozen=True)
class StartPeriod:
    period: int
    period_length: float
    num_subperiods: int
    delay: float = 0.0  # start this many seconds from now (post_period_delay)


@dataclass(frozen=True)
class PausePeriod:
    """Timers: stop the period's clock (on_disconnect pause)."""

    period: int


@dataclass(frozen=True)
class ResumePeriod:
    """Timers: run the period's remaining ticks again, from tick `next_tick` of its schedule
    (0 period_start, 1 … n sub-periods, n + 1 period_end), so that it ends at `ends_at`."""

    period: int
    ends_at: float
    next_tick: int


@dataclass(frozen=True)
class FlushAt:
    """Call `GroupState.flush` at epoch time `at` (rate-limit trailing edge)."""

    at: float


TimersCommand = StartPeriod | PausePeriod | ResumePeriod
Effect = Broadcast | Control | StartPeriod | PausePeriod | ResumePeriod | FlushAt


@dataclass
class GroupState:
    config: GroupConfig
    experiment: Experiment
    decisions: dict[str, Any] = field(default_factory=dict)
    last_seq: dict[str, int] = field(default_factory=dict)
    connections: dict[str, str] = field(default_factory=dict)  # code → current connection
    period: int = 1
    state: PeriodState = "waiting"
    ends_at: float | None = None
    subperiod: int = 0
    last_broadcast_at: float = float("-inf")
    flush_pending: bool = False
    clock: float = float("-inf")  # the `ts` of the group's latest log row
    # Payoffs of the running period (PROTOCOL v1.1 "Payoffs"): ∫ u_i dt since its start,
    # the flow payoffs u_i(d) of the current decisions and since when they hold, and (discrete
    # mode) each sub-period's snapshot.
    period_started_at: float = 0.0
    flow: dict[str, float] = field(default_factory=dict)
    flow_since: float = 0.0
    area: dict[str, float] = field(default_factory=dict)
    snapshots: list[dict[str, float]] = field(default_factory=list)
    # on_disconnect pause: seconds left when the clock stopped, since when, and how long the
    # period has been paused in all (not counted in its payoffs).
    remaining: float | None = None
    paused_at: float = 0.0
    paused_total: float = 0.0
    # An experiment with channels of its own (the double auction): its state in the running
    # period (the book), and the payoff events of the period so far.
    market: Any = None
    earned: dict[str, float] = field(default_factory=dict)
    # Every ended period as the replay reports it: {"period", "group_decisions", "payoffs",
    # "subperiods": [{"index", "group_decisions", "payoffs"}]}.
    history: list[dict[str, Any]] = field(default_factory=list)
    subperiods: list[dict[str, Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        for code, decision in self._initial_decisions().items():
            self.decisions.setdefault(code, decision)
            self.last_seq.setdefault(code, 0)

    def _initial_decisions(self) -> dict[str, Any]:
        params = self.config.params
        return {
            code: self.experiment.initial_decision(index, params)
            for index, code in enumerate(self.config.members, start=1)
        }

    # -- time ------------------------------------------------------------------------------

    def stamp(self, now: float) -> float:
        """The `ts` of the group's next log row: `now`, but always after the previous row's."""
        self.clock = max(now, self.clock + TICK)
        return self.clock

    # -- inputs ------------------------------------------------------------------------------

    def seen(self, participant: str, seq: int) -> bool:
        """Whether this frame was applied already (a resent duplicate) or is not a member's."""
        return participant not in self.last_seq or seq <= self.last_seq[participant]

    def on_frame(
        self, participant: str, seq: int, channel: str, payload: Any, now: float
    ) -> list[Effect]:
        if self.seen(participant, seq):
            return []  # not a member, or a duplicate already applied: idempotent on (p, seq)
        self.last_seq[participant] = seq
        if channel != "decisions":
            if channel in self.experiment.channels and hasattr(self.experiment, "on_input"):
                return self._on_own_channel(participant, seq, channel, payload)
            return []
        if self.state != "running":
            return [
                self._error(
                    participant,
                    seq,
                    ErrorCode.PERIOD_NOT_RUNNING,
                    f"period {self.period} is {self._public_state()}",
                )
            ]
        problem = self.experiment.validate(payload, self.config.params)
        if problem is not None:
            return [self._error(participant, seq, ErrorCode.INVALID_DECISION, problem)]
        self._accrue(now)  # the old decisions held until this frame's row
        self.decisions[participant] = payload
        self.flow = self._payoffs()
        return self._decisions_changed(now)

    def _on_own_channel(
        self, participant: str, seq: int, channel: str, payload: Any
    ) -> list[Effect]:
        """An input on one of the experiment's own channels (orders, cancels)."""
        if self.state != "running":
            message = f"period {self.period} is {self._public_state()}"
            return [self._error(participant, seq, ErrorCode.PERIOD_NOT_RUNNING, message)]
        outcome = self.experiment.on_input(  # type: ignore[attr-defined]
            self.market,
            participant,
            self.config.id_in_group(participant),
            seq,
            channel,
            payload,
            self.config.params,
        )
        if outcome.problem is not None:
            return [self._error(participant, seq, ErrorCode.INVALID_DECISION, outcome.problem)]
        self.market = outcome.state
        for code, amount in outcome.earned.items():
            self.earned[code] = self.earned.get(code, 0.0) + amount
        return [Broadcast(name, body) for name, body in outcome.broadcasts]

    def on_presence(
        self, participant: str, connection: str, connected: bool, *, now: float = 0.0
    ) -> list[Effect]:
        if participant not in self.last_seq:
            return []
        effects: list[Effect] = []
        current = self.connections.get(participant)
        if connected:
            self.connections[participant] = connection
            effects.append(Control(Channel.HELLO, self.hello(participant), participant, connection))
            if current is None:
                effects.append(self._presence(participant, connected=True, now=now))
            elif current not in (connection, UNKNOWN):
                effects.append(Control(Channel.REPLACED, {}, participant, current))
            effects.extend(self._maybe_start())
            if self.state == "paused" and self._complete():
                effects.extend(self._resume(now))
        elif current in (connection, UNKNOWN):
            # UNKNOWN: the log said connected, and its gateway saw it go; it was this one.
            del self.connections[participant]
            effects.append(self._presence(participant, connected=False, now=now))
            if self.state == "running" and self.config.on_disconnect == "end_period":
                effects.extend(self._end_period(now, {}))  # the payoffs so far
            elif self.state == "running" and self.config.on_disconnect == "pause":
                effects.extend(self._pause(now))
        # else: a replaced connection closed; the participant is still connected.
        return effects

    def expire_unknown(self, now: float = 0.0) -> list[Effect]:
        """Members still UNKNOWN after the gateways re-announced theirs are gone."""
        effects: list[Effect] = []
        for participant in [p for p, c in self.connections.items() if c == UNKNOWN]:
            effects.extend(self.on_presence(participant, UNKNOWN, connected=False, now=now))
        return effects

    def disconnect(self, participant: str, connection: str, *, now: float = 0.0) -> list[Effect]:
        """The member's gateway died (liveness): as if its connection had closed."""
        return self.on_presence(participant, connection, connected=False, now=now)

    def on_timer(
        self,
        event: str,
        period: int,
        index: int,
        ends_at: float | None,
        *,
        now: float,
        late: bool = False,
    ) -> list[Effect]:
        """A tick at `now`. Idempotent: a tick applied already (timers re-sends those whose
        publish it could not record before a crash) changes nothing. `late`: fired after its
        deadline because timers was down; the broadcast says so (`"late": true`).

        Tick rows are stamped here, since the period's payoffs are integrated over their `ts`."""
        if period != self.period:
            return []  # a tick of another period (e.g. redelivered after it ended)
        mark = {"late": True} if late else {}
        if event == "period_start" and self.state in ("waiting", "starting"):
            self.state, self.ends_at, self.subperiod = "running", ends_at, 0
            ts = self.stamp(now)
            reset = period > 1 and not self.config.carry_decisions
            if reset:  # every period starts from the initial decisions
                self.decisions = self._initial_decisions()
            self.period_started_at = self.flow_since = ts
            self.flow, self.area, self.snapshots = self._payoffs(), {}, []
            self.paused_total, self.remaining = 0.0, None
            self.earned = {}
            if hasattr(self.experiment, "initial_state"):
                self.market = self.experiment.initial_state(self.config.params)
            self.subperiods = []
            length = self.config.period_length
            effects: list[Effect] = [
                Broadcast(
                    Channel.PERIOD_START,
                    {"period": period, "length": length, "ends_at": ends_at, **mark},
                    ts=ts,
                )
            ]
            if reset:  # announce the reset state
                ts = self.stamp(now)
                self.last_broadcast_at, self.flush_pending = ts, False
                effects.append(Broadcast(Channel.GROUP_DECISIONS, dict(self.decisions), ts=ts))
            return effects
        if event == "subperiod" and self.state == "running" and index > self.subperiod:
            self.subperiod = index
            snapshot = self._earned() if self._event_payoffs() else self._payoffs()
            self.snapshots.append(snapshot)
            self.subperiods.append(
                {"index": index, "group_decisions": dict(self.decisions), "payoffs": snapshot}
            )
            return [
                Broadcast(
                    Channel.SUBPERIOD,
                    {
                        "period": period,
                        "index": index,
                        "group_decisions": dict(self.decisions),
                        "payoffs": snapshot,
                        **mark,
                    },
                    ts=self.stamp(now),
                )
            ]
        if event == "period_end" and self.state == "running":
            return self._end_period(now, mark)
        return []

    def _end_period(self, now: float, mark: dict[str, Any]) -> list[Effect]:
        """End the running period at `now`: its last change, `period_end` with its payoffs,
        and the next period (started when the group is complete)."""
        period = self.period
        effects: list[Effect] = []
        if self.flush_pending:  # the last change is never dropped
            self.flush_pending = False
            ts = self.stamp(now)
            self.last_broadcast_at = ts
            effects.append(Broadcast(Channel.GROUP_DECISIONS, dict(self.decisions), ts=ts))
        ts = self.stamp(now)
        payoffs = self._period_payoffs(ts)
        self.state = "ended"
        if self.market is not None:  # the book is emptied at period_end
            self.market = self.experiment.initial_state(self.config.params)  # type: ignore[attr-defined]
        self.history.append(
            {
                "period": period,
                "group_decisions": dict(self.decisions),
                "payoffs": payoffs,
                "subperiods": self.subperiods,
            }
        )
        self.subperiods = []
        effects.append(
            Broadcast(
                Channel.PERIOD_END,
                {
                    "period": period,
                    "group_decisions": dict(self.decisions),
                    "payoffs": payoffs,
                    **mark,
                },
                ts=ts,
            )
        )
        if self.period < self.config.num_periods:
            self.period, self.state, self.ends_at = self.period + 1, "waiting", None
            effects.extend(self._maybe_start())
        return effects

    def flush(self, now: float) -> list[Effect]:
        if not self.flush_pending:
            return []
        self.flush_pending = False
        self.last_broadcast_at = now
        return [Broadcast(Channel.GROUP_DECISIONS, dict(self.decisions))]

    # -- the log -----------------------------------------------------------------------------

    def fold(self, row: Mapping[str, Any]) -> None:
        """Apply one log row (`{"ts", "participant", "direction", "channel", "seq", "value"}`)
        the way its input was applied live; the effects are already in the log."""
        ts = float(row["ts"])
        channel, value = row["channel"], row["value"]
        if row["direction"] == "out" and channel in CLOCK_ROWS:
            # These stamp their row themselves, as live: at `ts`, after the previous row's.
            if channel == Channel.PERIOD_PAUSED:
                if self.state == "running":
                    self._pause(ts)
            elif channel == Channel.PERIOD_RESUMED:
                if self.state == "paused":
                    self._resume(ts)
            else:
                period, index = int(value["period"]), int(value.get("index", 0))
                self.on_timer(channel, period, index, value.get("ends_at"), now=ts)
            self.clock = max(self.clock, ts)
            return
        self.clock = max(self.clock, ts)
        if row["direction"] == "in":
            self.on_frame(str(row["participant"]), int(row["seq"]), channel, value, ts)
        elif channel == Channel.GROUP_DECISIONS:
            self.last_broadcast_at, self.flush_pending = ts, False
        elif channel == Channel.PRESENCE:
            participant = str(value["participant"])
            if value["connected"]:
                self.connections.setdefault(participant, UNKNOWN)
            else:
                self.connections.pop(participant, None)
        # `error` rows follow from the frames they answer; other channels carry no state.

    # -- views -------------------------------------------------------------------------------

    def hello(self, participant: str) -> dict[str, Any]:
        return {
            "participant": participant,
            "group": self.config.group,
            "id_in_group": self.config.id_in_group(participant),
            "members": list(self.config.members),
            "group_decisions": dict(self.decisions),
            "period": {
                "number": self.period,
                "state": self._public_state(),
                "ends_at": self.ends_at,
                **({"remaining": self.remaining} if self.state == "paused" else {}),
            },
            "last_seq": self.last_seq[participant],
            "presence": {code: code in self.connections for code in self.config.members},
            **(self.experiment.hello(self.market) if hasattr(self.experiment, "hello") else {}),
        }

    # -- helpers -----------------------------------------------------------------------------

    def _public_state(self) -> str:
        return "waiting" if self.state == "starting" else self.state

    def _decisions_changed(self, now: float) -> list[Effect]:
        rate_limit = self.config.rate_limit
        if rate_limit <= 0 or now - self.last_broadcast_at >= rate_limit:
            self.last_broadcast_at = now
            self.flush_pending = False
            return [Broadcast(Channel.GROUP_DECISIONS, dict(self.decisions))]
        if self.flush_pending:
            return []  # the scheduled flush will carry this change too
        self.flush_pending = True
        return [FlushAt(self.last_broadcast_at + rate_limit)]

    def _complete(self) -> bool:
        """Every member connected (and known: after a rebuild, announced again)."""
        return len(self.connections) == len(self.config.members) and (
            UNKNOWN not in self.connections.values()
        )

    def _pause(self, now: float) -> list[Effect]:
        """Stop the running period's clock (a member dropped under on_disconnect pause)."""
        ts = self.stamp(now)
        self._accrue(ts)
        self.state, self.paused_at = "paused", ts
        self.remaining = max(0.0, (self.ends_at or ts) - ts)
        self.ends_at = None
        payload = {"period": self.period, "remaining": self.remaining}
        return [Broadcast(Channel.PERIOD_PAUSED, payload, ts=ts), PausePeriod(self.period)]

    def _resume(self, now: float) -> list[Effect]:
        """The whole group is back: the clock runs again, the end moves by the pause."""
        ts = self.stamp(now)
        self.paused_total += ts - self.paused_at
        self.flow_since = ts
        self.state, self.ends_at = "running", ts + (self.remaining or 0.0)
        self.remaining = None
        payload = {"period": self.period, "ends_at": self.ends_at}
        return [
            Broadcast(Channel.PERIOD_RESUMED, payload, ts=ts),
            ResumePeriod(self.period, self.ends_at, 1 + self.subperiod),
        ]

    def _maybe_start(self) -> list[Effect]:
        if self.state != "waiting" or len(self.connections) < len(self.config.members):
            return []
        if UNKNOWN in self.connections.values():
            return []  # after a rebuild: wait until every member was announced again
        self.state = "starting"
        config = self.config
        delay = config.post_period_delay if self.period > 1 else 0.0
        return [StartPeriod(self.period, config.period_length, config.num_subperiods, delay)]

    def _presence(self, participant: str, *, connected: bool, now: float) -> Broadcast:
        payload = {"participant": participant, "connected": connected}
        return Broadcast(Channel.PRESENCE, payload, ts=self.stamp(now))

    def _error(self, participant: str, seq: int, code: ErrorCode, message: str) -> Broadcast:
        return Broadcast(
            Channel.ERROR,
            {"code": code.value, "message": message, "seq": seq},
            participant=participant,
            seq=seq,
        )

    def _accrue(self, now: float) -> None:
        """Add the current flow payoffs from `flow_since` until `now` to the period's area."""
        if self.state != "running":
            return
        held = now - self.flow_since
        for code, value in self.flow.items():
            self.area[code] = self.area.get(code, 0.0) + value * held
        self.flow_since = now

    def _period_payoffs(self, ended_at: float) -> dict[str, float]:
        """Continuous: the time average of u_i over the period; discrete: the mean over its
        sub-periods' snapshots (0 before the first one)."""
        self._accrue(ended_at)
        if self._event_payoffs():
            return self._earned()  # the period's trades, in discrete mode too
        codes = list(self.flow)
        if self.config.num_subperiods > 0:
            count = len(self.snapshots)
            return {
                c: sum(s.get(c, 0.0) for s in self.snapshots) / count if count else 0.0
                for c in codes
            }
        duration = ended_at - self.period_started_at - self.paused_total
        if duration <= 0:
            return dict(self.flow)
        return {c: self.area.get(c, 0.0) / duration for c in codes}

    def _event_payoffs(self) -> bool:
        return bool(getattr(self.experiment, "event_payoffs", False))

    def _earned(self) -> dict[str, float]:
        return {code: self.earned.get(code, 0.0) for code in self.config.members}

    def _payoffs(self) -> dict[str, float]:
        roles = {code: i for i, code in enumerate(self.config.members, start=1)}
        return self.experiment.payoffs(self.decisions, roles, self.config.params)


def rebuild(
    config: GroupConfig, experiment: Experiment, rows: Iterable[Mapping[str, Any]]
) -> GroupState:
    """A group's state from its log rows, in the group's order (the fold of `GroupState.fold`).

    A group left `starting` (complete, `StartPeriod` maybe sent) goes back to `waiting`, so
    the command is sent again once its members are announced."""
    state = GroupState(config, experiment)
    for row in rows:
        state.fold(row)
    if state.state == "starting":
        state.state = "waiting"
    return state
