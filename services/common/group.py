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

Experiment code is not trusted to succeed (PROTOCOL v2 "The ack holds through everything"). Its
hooks get `params` validated by the experiment's `params_model`, as the model instance or
dumped (defaults filled in) as the experiment asks (`Experiment.hook_params`, once per group,
see `validated_params`), and what a hook returns is checked (flow payoffs: code
→ finite number; broadcasts: JSON). An input is a transaction: every hook it needs runs first
(`payoffs` on a copy of the decisions; `on_input` gets the market, which hooks must never
change, and returns a new one), and the group's state (decisions, market, flow / area, earned,
rate-limit fields) changes only after all of them returned. So when a hook raises on an input,
the frame still counts as seen (`last_seq` moves: it is acknowledged and its `in` row is
logged), it is answered with an `error` `experiment_error` for its sender and seq, and nothing
else changes; the group goes on. An input whose broadcasts would exceed `MAX_PAYLOAD_BYTES`
(PROTOCOL v2 "Size") is refused the same way, with `invalid_decision`. Hooks called outside an
input (ticks, connections) cannot refuse anything, so there a failing hook counts as an empty
answer: `payoffs` → no payoffs (`{}`), `initial_decision` → `None`, `initial_state` → `None`
(no market), `hello` → nothing added. Live and the fold run these same methods, so they agree;
a fold also takes the log's word for an `in` row answered by `experiment_error` (`rebuild`
skips it), in case the hook is not as deterministic as it must be. Each failure is logged once
with its traceback (a fold, which re-runs it, logs one line at debug level); logs name the
participant's public code, never a key.

The end for everyone (PROTOCOL v2 "Online studies"): when the group's last period ends, each
member's outcome is decided right there, `completed` if connected then and `dropout` if away,
and each gets a logged `finished` row addressed to them, right after `period_end`, in member
order. "Connected" is what the group's own order of inputs says: after a rebuild, a member the
log says is connected and whose gateway has not announced it again yet (`UNKNOWN`) counts as
connected. The end cannot wait for the announcements: they are inputs queued behind the
`period_end` tick that fired while the worker was down, so waiting for them would end every
such group with dropouts only; and a member who left meanwhile has their disconnection queued
ahead of the tick (only a gateway that died with the worker, unseen, is taken for connected,
as a live worker does for its liveness timeout). `finished` keeps what was sent, so a member
who connects later gets it again after `hello`. The `{label}` of a redirect comes from
`labels`, which the adapter refreshes from the store just before applying an input that can
end the last period (`may_finish`): labels are given as people arrive through the study link,
so the configuration read when the group started may not have them yet. The state builds the
payloads itself from that mapping, rather than emitting an effect for the adapter to turn into
broadcasts later, because effects are carried out synchronously after the input while the
read needs an await: done after the input, it would let another input of the group (a flush,
a gateway's death) go out between `period_end` and its `finished` rows. Read before, the
labels are just one more input, like time, and the state stays pure, one place that decides
and stamps the rows. A fold never decides outcomes: it takes them from the logged `finished`
rows (a log written before outcomes existed gives none, and a label given after the end
cannot rewrite what was sent), so it needs no store.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

import orjson

from services.common import outcomes
from services.common.directory import GroupConfig
from services.common.errors import ErrorCode
from services.common.experiments import Experiment, wrap
from services.common.messages import Channel

log = logging.getLogger(__name__)

T = TypeVar("T")

# PROTOCOL v2 "Size": no broadcast and no log row carries more than this many bytes of JSON.
MAX_PAYLOAD_BYTES = 262_144
# A log row around its value (ts, ids, channel, seq): kept free under the cap.
ROW_OVERHEAD_BYTES = 1_024
# An `invalid_decision` message from an experiment is cut to this many characters.
MAX_MESSAGE_CHARS = 500

PeriodState = Literal["waiting", "starting", "running", "paused", "ended"]

# A member the log says is connected, whose connection this worker has not been told yet.
UNKNOWN = ""
# Steps between the `ts` of one group's consecutive log rows: strictly increasing, so the log
# sorted by `ts` is the group's order, and stays so at the export's µs resolution. Two µs, not
# one: near today's epoch a float's step is about 0.24 µs, so `clock + 1e-6` could land less
# than 1 µs later and round to the same microsecond in the export (seen in ~4 % of bursts).
TICK = 2e-6
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
    """An unlogged frame for one connection (`hello`, `finished` again, `replaced`)."""

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


@dataclass(frozen=True)
class BotAfter:
    """Call `GroupState.bot_takes_over(participant)` at epoch time `at` (on_disconnect bots:
    the member's `dropout_grace` is over then, unless they came back)."""

    participant: str
    at: float


TimersCommand = StartPeriod | PausePeriod | ResumePeriod
Effect = Broadcast | Control | StartPeriod | PausePeriod | ResumePeriod | FlushAt | BotAfter


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
    # Members' labels (code → label) for the `finished` redirect: the config's, refreshed by
    # the adapter before an input that may end the last period (see the module docstring).
    labels: dict[str, str] = field(default_factory=dict)
    # The `finished` payload each member was sent when the last period ended (code → payload).
    finished: dict[str, dict[str, Any]] = field(default_factory=dict)
    # PROTOCOL v2 "Online studies", bots: the members a bot plays now, when each member who is
    # away left (the grace before a bot takes over counts from it), and the members the log
    # has a presence row of (a seat in `config.bots` without one is seated on the first input).
    bots: set[str] = field(default_factory=set)
    away_since: dict[str, float] = field(default_factory=dict)
    present_once: set[str] = field(default_factory=set)
    # `config.params` as the experiment's model validates and dumps them, and as its hooks
    # get them (that dict, or the model instance: `Experiment.hook_params`).
    params: dict[str, Any] = field(init=False, default_factory=dict)
    hook_params: Any = field(init=False, default=None, repr=False)
    # (participant, seq) of inputs the log answers with `experiment_error` (set by `rebuild`):
    # their fold changes nothing, whatever the hook does this time.
    failed_inputs: set[tuple[str, int]] = field(default_factory=set, repr=False)
    folding: bool = field(default=False, repr=False)  # re-applying logged rows (quiet logs)

    def __post_init__(self) -> None:
        self.experiment = wrap(self.experiment)  # a plug-in handed in as is: every hook there
        self.params = validated_params(self.experiment, self.config)
        self.hook_params = self.experiment.hook_params(self.params)
        self.labels = {**self.config.labels, **self.labels}
        for code, decision in self._initial_decisions().items():
            self.decisions.setdefault(code, decision)
            self.last_seq.setdefault(code, 0)

    def _initial_decisions(self) -> dict[str, Any]:
        """Every member's initial decision; a member whose hook fails (or answers something
        that is not JSON) starts from `None`."""
        decisions: dict[str, Any] = {}
        failure: Exception | None = None
        for index, code in enumerate(self.config.members, start=1):
            try:
                decision = self.experiment.initial_decision(index, self.hook_params)
                orjson.dumps(decision)  # it is broadcast: plain JSON only
            except Exception as exc:
                decision, failure = None, failure or exc
            decisions[code] = decision
        if failure is not None:
            self._report("initial_decision", failure)
        return decisions

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
        """Apply one frame, as a transaction: see the module's docstring."""
        if self.seen(participant, seq):
            return []  # not a member, or a duplicate already applied: idempotent on (p, seq)
        self.last_seq[participant] = seq  # seen (and acknowledged) whatever happens next
        if (participant, seq) in self.failed_inputs:
            self.failed_inputs.discard((participant, seq))
            return []  # the log says the experiment failed on it: it changed nothing
        try:
            return self._apply_frame(participant, seq, channel, payload, now)
        except Exception as exc:  # experiment code; nothing was changed before it raised
            self._report("a hook", exc, participant=participant, seq=seq)
            message = "the experiment failed on this input; it changed nothing"
            return [self._error(participant, seq, ErrorCode.EXPERIMENT_ERROR, message)]

    def _apply_frame(
        self, participant: str, seq: int, channel: str, payload: Any, now: float
    ) -> list[Effect]:
        """Every hook first, then the changes (which call no experiment code)."""
        if channel != "decisions":
            if channel in self.experiment.own_channels:
                return self._on_own_channel(participant, seq, channel, payload)
            return []
        if self.state != "running":
            return [
                self._error(
                    participant,
                    seq,
                    ErrorCode.PERIOD_NOT_RUNNING,
                    f"period {self.period} is {self.public_state()}",
                )
            ]
        if _json_size(payload) > MAX_PAYLOAD_BYTES - ROW_OVERHEAD_BYTES:
            return [self._too_big(participant, seq, "this decision")]
        # The plug-in's own hooks (`Experiment.hooks`), params in their form: per frame, no
        # wrapper's call between.
        problem = self.experiment.hooks.validate(payload, self.hook_params)  # or declaration
        if problem is not None:
            return [self._error(participant, seq, ErrorCode.INVALID_DECISION, problem)]
        decisions = dict(self.decisions)
        decisions[participant] = payload
        flow = self._payoffs(decisions)
        # The largest rows these decisions go out in: `subperiod` / `period_end` (decisions
        # and payoffs); `group_decisions` is smaller. Checked whether it goes out now or later.
        widest = {"period": self.period, "index": self.subperiod, "late": True}
        if _json_size({**widest, "group_decisions": decisions, "payoffs": flow}) > (
            MAX_PAYLOAD_BYTES - ROW_OVERHEAD_BYTES
        ):
            return [self._too_big(participant, seq, "the group's decisions with this one")]
        self._accrue(now)  # the old decisions held until this frame's row
        self.decisions, self.flow = decisions, flow
        return self._decisions_changed(now)

    def _on_own_channel(
        self, participant: str, seq: int, channel: str, payload: Any
    ) -> list[Effect]:
        """An input on one of the experiment's own channels (orders, cancels)."""
        if self.state != "running":
            message = f"period {self.period} is {self.public_state()}"
            return [self._error(participant, seq, ErrorCode.PERIOD_NOT_RUNNING, message)]
        if _json_size(payload) > MAX_PAYLOAD_BYTES - ROW_OVERHEAD_BYTES:
            return [self._too_big(participant, seq, f"this {channel} input")]
        outcome = self.experiment.hooks.on_input(
            self.market,
            participant,
            self.config.id_in_group(participant),
            seq,
            channel,
            payload,
            self.hook_params,
        )
        if outcome.problem is not None:
            return [self._error(participant, seq, ErrorCode.INVALID_DECISION, outcome.problem)]
        broadcasts = [(str(name), body) for name, body in outcome.broadcasts]
        earned = {str(code): _finite(amount, "earned") for code, amount in outcome.earned.items()}
        for name, body in broadcasts:
            if _json_size(body) > MAX_PAYLOAD_BYTES - ROW_OVERHEAD_BYTES:
                return [self._too_big(participant, seq, f"the {name} this input makes")]
        self.market = outcome.state
        for code, amount in earned.items():
            self.earned[code] = self.earned.get(code, 0.0) + amount
        return [Broadcast(name, body) for name, body in broadcasts]

    def on_presence(
        self, participant: str, connection: str, connected: bool, *, now: float = 0.0
    ) -> list[Effect]:
        if participant not in self.last_seq:
            return []
        effects: list[Effect] = self._seat_bots(now)
        current = self.connections.get(participant)
        self.present_once.add(participant)
        if connected:
            self.away_since.pop(participant, None)
            self.bots.discard(participant)  # back: the person takes the seat from its bot
            self.connections[participant] = connection
            effects.append(Control(Channel.HELLO, self.hello(participant), participant, connection))
            finished = self.finished.get(participant)
            if finished is not None:  # over for them: the end again, not logged again
                effects.append(Control(Channel.FINISHED, finished, participant, connection))
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
            left = self._presence(participant, connected=False, now=now)
            effects.append(left)
            if self.config.on_disconnect == "bots" and not self._over():
                assert left.ts is not None
                self.away_since[participant] = left.ts
                effects.append(BotAfter(participant, left.ts + self.config.dropout_grace))
            if self.state == "running" and self.config.on_disconnect == "end_period":
                effects.extend(self._end_period(now, {}))  # the payoffs so far
            elif self.state == "running" and self.config.on_disconnect == "pause":
                effects.extend(self._pause(now))
        # else: a replaced connection closed; the participant is still connected.
        return effects

    # -- bots (PROTOCOL v2 "Online studies") ---------------------------------------------------

    def _over(self) -> bool:
        """The group's last period ended: nobody is played any more."""
        return self.state == "ended" and self.period == self.config.num_periods

    def _seat_bots(self, now: float) -> list[Effect]:
        """Seats a bot plays from the start (`config.bots`): seated, and logged as such, on
        the group's first input."""
        effects: list[Effect] = []
        for code in self.config.bots:
            if code in self.last_seq and code not in self.present_once and not self._over():
                self.present_once.add(code)
                self.bots.add(code)
                effects.append(self._presence(code, connected=True, now=now, bot=True))
        return effects

    def bot_takes_over(self, participant: str, now: float) -> list[Effect]:
        """A member away for `dropout_grace` is played by a bot until they come back: a
        `presence` with `"bot": true`; a group that waited for them starts."""
        if (
            participant not in self.away_since
            or participant in self.connections
            or participant in self.bots
            or self._over()
        ):
            return []
        del self.away_since[participant]
        self.bots.add(participant)
        effects: list[Effect] = [self._presence(participant, connected=True, now=now, bot=True)]
        effects.extend(self._maybe_start())
        if self.state == "paused" and self._complete():
            effects.extend(self._resume(now))
        return effects

    def on_bot_input(
        self, participant: str, channel: str, payload: Any, now: float
    ) -> list[Effect]:
        """A bot's input for the member it plays (logged as an `in` row without a seq): applied
        as the member's frame would be, a refusal answered to nobody."""
        if participant not in self.bots:
            return []
        try:
            effects = self._apply_frame(participant, 0, channel, payload, now)
        except Exception as exc:  # experiment code; nothing was changed before it raised
            self._report("a hook", exc, participant=participant, seq=0)
            return []
        return [e for e in effects if not (isinstance(e, Broadcast) and e.channel == Channel.ERROR)]

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
            self.flow, self.area, self.snapshots = self._tick_payoffs(), {}, []
            self.paused_total, self.remaining = 0.0, None
            self.earned = {}
            self.market = self._initial_state()
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
            snapshot = self._earned() if self._event_payoffs() else self._tick_payoffs()
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
            self.market = self._initial_state()
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
        elif not self.folding:  # a fold takes the outcomes from the logged `finished` rows
            effects.extend(self._finish(now))
        return effects

    def may_finish(self, event: Literal["period_end", "disconnect"]) -> bool:
        """Whether a `period_end` tick, or a member's disconnection, would now end the group's
        last period: the adapter refreshes `labels` before applying such an input."""
        if self.state != "running" or self.period != self.config.num_periods:
            return False
        return event == "period_end" or self.config.on_disconnect == "end_period"

    def learn_labels(self, labels: Mapping[str, str]) -> None:
        """Labels the store has now (given since the configuration was read), over those known:
        the adapter's read before an input that may end the last period (`may_finish`)."""
        self.labels = {**self.labels, **labels}

    def _finish(self, now: float) -> list[Effect]:
        """Each member's outcome as the last period ends, in member order: `completed` if
        connected now (UNKNOWN included: see the module docstring), else `dropout`; total
        payoff = the sum of their period payoffs. Logged `finished` rows, each addressed to
        its member."""
        config = self.config
        effects: list[Effect] = []
        for code in config.members:
            if code in config.bots and code in self.bots:
                continue  # a seat only a bot ever played: nobody to tell, nobody to pay
            connection = self.connections.get(code)
            outcome = "completed" if connection is not None else "dropout"
            total = sum(float(period["payoffs"].get(code, 0.0)) for period in self.history)
            payload = outcomes.finished_payload(
                outcome,
                total,
                config.completion,
                label=self.labels.get(code),
                code=code,
                session=config.session,
            )
            self.finished[code] = payload
            effects.append(
                Broadcast(Channel.FINISHED, payload, participant=code, ts=self.stamp(now))
            )
        return effects

    def flush(self, now: float) -> list[Effect]:
        if not self.flush_pending:
            return []
        self.flush_pending = False
        self.last_broadcast_at = now
        return [Broadcast(Channel.GROUP_DECISIONS, dict(self.decisions))]

    def flush_failed(self) -> None:
        """The broadcast `flush` returned did not go out (the bus is reconnecting): the change
        is pending again, and the next flush sends the decisions as they are then."""
        self.flush_pending = True

    # -- the log -----------------------------------------------------------------------------

    def fold(self, row: Mapping[str, Any]) -> None:
        """Apply one log row (`{"ts", "participant", "direction", "channel", "seq", "value"}`)
        the way its input was applied live; the effects are already in the log."""
        self.folding = True
        try:
            self._fold(row)
        finally:
            self.folding = False

    def _fold(self, row: Mapping[str, Any]) -> None:
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
            if row.get("seq") is None:  # a bot's input (PROTOCOL v2 "Online studies")
                self.on_bot_input(str(row["participant"]), channel, value, ts)
            else:
                self.on_frame(str(row["participant"]), int(row["seq"]), channel, value, ts)
        elif channel == Channel.GROUP_DECISIONS:
            self.last_broadcast_at, self.flush_pending = ts, False
        elif channel == Channel.PRESENCE:
            participant = str(value["participant"])
            self.present_once.add(participant)
            if value.get("bot"):
                self.bots.add(participant)
                self.away_since.pop(participant, None)
            elif value["connected"]:
                self.bots.discard(participant)
                self.away_since.pop(participant, None)
                self.connections.setdefault(participant, UNKNOWN)
            else:
                self.connections.pop(participant, None)
                if self.config.on_disconnect == "bots" and not self._over():
                    self.away_since[participant] = ts
        elif channel == Channel.FINISHED and row.get("participant"):
            self.finished[str(row["participant"])] = value
        # `error` rows follow from the frames they answer (an `experiment_error` one: see
        # `failed_inputs`); other channels carry no state.

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
                "state": self.public_state(),
                "ends_at": self.ends_at,
                **({"remaining": self.remaining} if self.state == "paused" else {}),
            },
            "last_seq": self.last_seq[participant],
            "presence": {
                code: code in self.connections or code in self.bots for code in self.config.members
            },
            # Members a bot plays now (PROTOCOL v2 "Online studies"): present, but not a person.
            **({"bots": sorted(self.bots)} if self.bots else {}),
            **self.hello_extra(),
        }

    # -- helpers -----------------------------------------------------------------------------

    def public_state(self) -> str:
        """The period's state as the contract and the console name it (`starting` is `waiting`)."""
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
        """Every member connected or played by a bot (and known: after a rebuild, announced
        again)."""
        return self._everyone_here() and UNKNOWN not in self.connections.values()

    def _everyone_here(self) -> bool:
        return all(c in self.connections or c in self.bots for c in self.config.members)

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
        if self.state != "waiting" or not self._everyone_here():
            return []
        if UNKNOWN in self.connections.values():
            return []  # after a rebuild: wait until every member was announced again
        self.state = "starting"
        config = self.config
        delay = config.post_period_delay if self.period > 1 else 0.0
        return [StartPeriod(self.period, config.period_length, config.num_subperiods, delay)]

    def _presence(
        self, participant: str, *, connected: bool, now: float, bot: bool = False
    ) -> Broadcast:
        payload: dict[str, Any] = {"participant": participant, "connected": connected}
        if bot:
            payload["bot"] = True
        return Broadcast(Channel.PRESENCE, payload, ts=self.stamp(now))

    def _error(self, participant: str, seq: int, code: ErrorCode, message: Any) -> Broadcast:
        text = str(message)  # an experiment's message: any length, maybe not even a str
        if len(text) > MAX_MESSAGE_CHARS:
            text = text[: MAX_MESSAGE_CHARS - 1] + "…"
        return Broadcast(
            Channel.ERROR,
            {"code": code.value, "message": text, "seq": seq},
            participant=participant,
            seq=seq,
        )

    def _too_big(self, participant: str, seq: int, what: str) -> Broadcast:
        message = f"{what} would exceed {MAX_PAYLOAD_BYTES // 1024} KiB of JSON"
        return self._error(participant, seq, ErrorCode.INVALID_DECISION, message)

    def _report(
        self, hook: str, exc: BaseException, *, participant: str | None = None, seq: int = 0
    ) -> None:
        """Log an experiment's failure once: with its traceback live, one line in a fold
        (which re-runs what live already reported). Codes only: never a participant's key."""
        config = self.config
        if participant is not None:
            where, outcome = f" on {participant}'s input {seq}", "the input changed nothing"
        else:
            where, outcome = "", "its answer counts as empty"
        if self.folding:
            log.debug(
                "experiment %s: %s failed again%s while folding group %s's log: %r",
                config.experiment,
                hook,
                where,
                config.group,
                exc,
            )
            return
        log.error(
            "experiment %s: %s failed%s (session %s, group %s); %s",
            config.experiment,
            hook,
            where,
            config.session,
            config.group,
            outcome,
            exc_info=exc,
        )

    def _safely(self, hook: str, empty: T, call: Callable[[], T]) -> T:
        """A hook called outside any input (a tick, a connection): its failure is `empty`."""
        try:
            return call()
        except Exception as exc:
            self._report(hook, exc)
            return empty

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
        return self.experiment.event_payoffs

    def _earned(self) -> dict[str, float]:
        return {code: self.earned.get(code, 0.0) for code in self.config.members}

    def _payoffs(self, decisions: Mapping[str, Any]) -> dict[str, float]:
        """The experiment's flow payoffs of `decisions`, checked: raises if it failed."""
        roles = {code: i for i, code in enumerate(self.config.members, start=1)}
        result = self.experiment.hooks.payoffs(decisions, roles, self.hook_params)
        if not isinstance(result, Mapping):
            raise TypeError(f"payoffs returned {type(result).__name__}, not a mapping")
        return {str(code): _finite(value, "payoff") for code, value in result.items()}

    def _tick_payoffs(self) -> dict[str, float]:
        """The flow payoffs of the current decisions at a tick; none if the hook failed."""
        return self._safely("payoffs", {}, lambda: self._payoffs(dict(self.decisions)))

    def _initial_state(self) -> Any:
        """The experiment's state at a period's start or end; `None` if the hook failed."""
        initial = self.experiment.initial_state
        return self._safely("initial_state", None, lambda: initial(self.hook_params))

    def hello_extra(self) -> dict[str, Any]:
        """What the experiment adds to `hello` (its own state: the auction's book); nothing if
        the hook failed. For views of the group too (the store's live monitor)."""
        hello = self.experiment.hello
        return self._safely("hello", {}, lambda: dict(hello(self.market)))


def _finite(value: Any, what: str) -> float:
    """A number an experiment returned, as a finite float; raises otherwise."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"{what} {value!r} is not a finite number")
    return float(value)


def _json_size(value: Any) -> int:
    """Bytes of `value` as JSON. Raises (TypeError) for what JSON cannot hold: only an
    experiment can produce that (inputs are parsed JSON), so it is the experiment's failure."""
    return len(orjson.dumps(value))


def validated_params(experiment: Experiment, config: GroupConfig) -> dict[str, Any]:
    """`config.params` as the experiment's `params_model` validates and dumps them: what the
    hooks get, as this dict or as the model made from it (`Experiment.hook_params`; PROTOCOL
    v2: hooks see validated params only).

    Sessions stored since v2 hold exactly that dump. One stored before may hold `null` for a
    param (v1 accepted it, and the hook then failed): such keys are left out, so their default
    applies. Params the model refuses even so (a plug-in whose model changed since) are passed
    on as stored, with an error in the log: the group still runs, and a hook that fails on
    them fails safely."""
    model = experiment.params_model
    params = config.params
    try:
        return dict(model.model_validate(params).model_dump(mode="json"))
    except Exception:  # a pydantic ValidationError, or a plug-in validator's own exception
        pass
    without_nulls = {key: value for key, value in params.items() if value is not None}
    try:
        return dict(model.model_validate(without_nulls).model_dump(mode="json"))
    except Exception as exc:
        log.error(
            "group %s: its stored params do not validate as %s's params (%s); hooks get them "
            "as stored",
            config.group,
            config.experiment,
            exc,
        )
        return dict(params)


def rebuild(
    config: GroupConfig, experiment: Experiment, rows: Iterable[Mapping[str, Any]]
) -> GroupState:
    """A group's state from its log rows, in the group's order (the fold of `GroupState.fold`).

    A group left `starting` (complete, `StartPeriod` maybe sent) goes back to `waiting`, so
    the command is sent again once its members are announced. An `in` row that an
    `experiment_error` row answers changes nothing, as it did live."""
    rows = list(rows)
    # Quiet if there is a log: the worker that wrote it reported the hooks' failures already.
    state = GroupState(config, experiment, folding=bool(rows))
    state.folding = False
    state.failed_inputs = {
        (str(row["participant"]), int(row["seq"]))
        for row in rows
        if row["direction"] == "out"
        and row["channel"] == Channel.ERROR
        and row.get("seq") is not None
        and isinstance(row["value"], dict)
        and row["value"].get("code") == ErrorCode.EXPERIMENT_ERROR
    }
    for row in rows:
        state.fold(row)
    if state.state == "starting":
        state.state = "waiting"
    return state
