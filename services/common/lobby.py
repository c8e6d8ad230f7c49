"""A session's arrival lobby (PROTOCOL v2 "Online studies", `grouping: "arrival"`). Pure: no I/O.

Under arrival grouping a seat has no group until the lobby forms one. The lobby of session S is
addressed on the bus like a group whose id is `lobby_group(S)` ("lobby:S"): the gateway sends
the presence of a group-less seat's connection there, the shard queue of that id orders the
lobby's inputs, and one decisions worker owns it, as it owns a group. Its log rows carry the
group "" (the contract: "`group` empty until the group exists").

`LobbyState` takes the lobby's inputs in that one order (connections opening and closing,
a gateway's death, a person's timeout) and returns effects, as `GroupState` does:
- `lobby_join` / `lobby_leave` rows (logged, not sent: `Record`) and a `lobby` frame for each
  person waiting whenever the number waiting changes (`Control`: not logged);
- `hello` for a person who connects (`group` null, `period.state` "lobby");
- a durable wake-up at a person's deadline (`WakeAt`, run by the timers service):
  `lobby_timeout` seconds after their FIRST arrival (someone who leaves keeps their place
  until then). Deadlines follow the order of arrival, so one wake-up at a time is enough: the
  one for the person first in line (`wake`). When it fires, everyone whose deadline passed
  is handled and the next first in line gets theirs; a wake-up whose person was grouped
  meanwhile fires early for the new first in line, and only asks for theirs. So a launch
  where groups form at once costs a wake-up per `lobby_timeout`, not one per person;
- at the deadline, under `on_lobby_timeout: release`, a `lobby_timeout` row and a logged
  `finished` for that person (outcome `lobby_timeout`).

Forming a group needs MongoDB's word, so it is not an effect: `proposal()` names the next group
and the `group_size` longest-waiting people connected now; the adapter asks the store to form
it (`POST /internal/lobbies/{session}/groups/{group}`: the first caller's members win, a
repeated call answers the members it has) and hands the answer to `form()`, which logs
`group_formed {"group", "members"}` and tells each member's connection (`Control`
`group_formed`: its gateway moves the connection to the group, whose `hello` follows). A group
is therefore formed once, whatever crashes: a worker that formed it in the store and died
before logging it learns it from the store when it rebuilds the lobby (`LobbyConfig.formed`).

Crash safety: `rebuild(config, rows)` folds the lobby's log. A person the log says is
connected is `UNKNOWN` until their gateway announces them again (as in a group); the wake-up
of the first in line is asked for again (the timers keep one per person, so a repeated
request is harmless).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from services.common import outcomes
from services.common.group import TICK, UNKNOWN, Broadcast, Control
from services.common.messages import (
    LOBBY_PREFIX,
    Channel,
    GroupFormed,
    Lobby,
    is_lobby,
    lobby_group,
)

__all__ = ["LOBBY_PREFIX", "is_lobby", "lobby_group"]

# Log rows of the lobby (PROTOCOL v2: every lobby event is an `out` row, group "").
LOBBY_JOIN = "lobby_join"
LOBBY_LEAVE = "lobby_leave"
GROUP_FORMED = "group_formed"
LOBBY_TIMEOUT = "lobby_timeout"
# The frame that tells the people waiting how far the lobby is.
LOBBY = "lobby"
# A deadline counts as passed this close to it (the clocks of timers and decisions).
DEADLINE_SLACK = 1e-3


class LobbyConfig(BaseModel):
    """What the lobby of an arrival session works with (`GET /internal/lobbies/{session}`)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    session: str
    experiment: str
    group_size: int
    lobby_timeout: float
    on_lobby_timeout: Literal["release", "bots"] = "release"
    groups: list[str]  # the session's groups, in the order the lobby forms them
    # What a seat's page shows before its group exists (as `GroupConfig` has them).
    num_periods: int = 1
    period_length: float = 60.0
    num_subperiods: int = 0
    on_disconnect: str = "continue"
    params: dict[str, Any] = {}
    # Groups the store holds as formed when this was read (group → members in id order).
    formed: dict[str, list[str]] = {}
    completion: dict[str, dict[str, Any]] = {}
    labels: dict[str, str] = {}  # seats' labels known when this was read (code → label)

    @property
    def group(self) -> str:
        return lobby_group(self.session)


@dataclass(frozen=True)
class Record:
    """A logged `out` row that goes to nobody (the lobby's own events)."""

    channel: str
    payload: Any
    participant: str | None = None
    ts: float | None = field(default=None, compare=False)


@dataclass(frozen=True)
class WakeAt:
    """Timers: send the lobby a `lobby_timeout` tick for `participant` at epoch time `at`."""

    participant: str
    at: float


LobbyEffect = Broadcast | Control | Record | WakeAt


@dataclass
class Waiter:
    arrived: float  # first arrival: the deadline counts from it
    connection: str | None  # None: away (keeps their place); UNKNOWN: not announced again


@dataclass
class LobbyState:
    config: LobbyConfig
    waiting: dict[str, Waiter] = field(default_factory=dict)  # in order of arrival
    formed: dict[str, list[str]] = field(default_factory=dict)  # group → members
    grouped: dict[str, str] = field(default_factory=dict)  # code → its group
    finished: dict[str, dict[str, Any]] = field(default_factory=dict)  # code → `finished`
    # `on_lobby_timeout: bots`: people whose deadline passed, for whom a group with bots is to
    # be formed now (the adapter asks the store: `bot_proposal`). Not logged: the tick that
    # put them here is acknowledged only once their group (or their release) is.
    overdue: list[str] = field(default_factory=list)
    # The time of the wake-up asked for and not fired yet (None: none; see the docstring).
    # Not logged: a rebuilt lobby asks for the first in line's again.
    wake: float | None = None
    clock: float = float("-inf")
    labels: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.labels = {**self.config.labels, **self.labels}

    # -- time ------------------------------------------------------------------------------

    def stamp(self, now: float) -> float:
        """The `ts` of the lobby's next log row: after the previous row's (as in a group)."""
        self.clock = max(now, self.clock + TICK)
        return self.clock

    def deadline(self, code: str) -> float:
        return self.waiting[code].arrived + self.config.lobby_timeout

    # -- inputs ------------------------------------------------------------------------------

    def on_presence(
        self, participant: str, connection: str, connected: bool, *, now: float
    ) -> list[LobbyEffect]:
        if connected:
            return self._connected(participant, connection, now)
        waiter = self.waiting.get(participant)
        if waiter is None or waiter.connection not in (connection, UNKNOWN):
            return []  # not waiting, or a replaced connection closed
        waiter.connection = None
        effects: list[LobbyEffect] = [
            Record(LOBBY_LEAVE, {"participant": participant}, participant, self.stamp(now))
        ]
        return effects + self._counts()

    def _connected(self, participant: str, connection: str, now: float) -> list[LobbyEffect]:
        group = self.grouped.get(participant)
        if group is not None:  # grouped already: its gateway moves the connection there
            payload = GroupFormed(group=group, members=list(self.formed[group])).model_dump()
            return [Control(GROUP_FORMED, payload, participant, connection)]
        finished = self.finished.get(participant)
        if finished is not None:  # over for them: the end again, not logged again
            return [
                Control(Channel.HELLO, self.hello_for(participant), participant, connection),
                Control(Channel.FINISHED, finished, participant, connection),
            ]
        waiter = self.waiting.get(participant)
        hello = Control(Channel.HELLO, self.hello_for(participant), participant, connection)
        if waiter is not None and waiter.connection == connection:
            # Announced again (a resync): the same connection, nothing changed for anyone.
            return [hello, self._count_for(participant)]
        effects: list[LobbyEffect] = []
        present_before = len(self.present())
        if waiter is None:  # a first arrival: their place, and their deadline, start now
            arrived = self.stamp(now)
            waiter = Waiter(arrived, connection)
            self.waiting[participant] = waiter
            effects.append(
                Record(
                    LOBBY_JOIN,
                    {"participant": participant, "arrived": arrived},
                    participant,
                    arrived,
                )
            )
        elif waiter.connection is None:  # back after leaving: the same place and deadline
            waiter.connection = connection
            effects.append(
                Record(
                    LOBBY_JOIN,
                    {"participant": participant, "arrived": waiter.arrived},
                    participant,
                    self.stamp(now),
                )
            )
        else:
            if waiter.connection != UNKNOWN:  # a newer connection (a reload) replaces it
                effects.append(Control(Channel.REPLACED, {}, participant, waiter.connection))
            waiter.connection = connection
        effects.append(hello)
        effects.extend(self.ensure_wake())
        if len(self.present()) != present_before:
            effects.extend(self._counts())
        else:  # the count is unchanged for the others: only this connection learns it
            effects.append(self._count_for(participant))
        return effects

    def expire_unknown(self, now: float) -> list[LobbyEffect]:
        """People the log said were connected whose gateways did not announce them again."""
        effects: list[LobbyEffect] = []
        for code, waiter in list(self.waiting.items()):
            if waiter.connection == UNKNOWN:
                effects.extend(self.on_presence(code, UNKNOWN, connected=False, now=now))
        return effects

    def on_timer(
        self, event: str, participant: str, *, now: float, at: float | None = None
    ) -> list[LobbyEffect]:
        """A wake-up fired (`lobby_timeout`, asked for `at`, for `participant`): everyone whose
        deadline passed by then (`at` or now, the later), in order of arrival. `release`: they
        finish with outcome `lobby_timeout`; `bots`: a group is to form at once with each (see
        `bot_proposal`). Then the next first in line gets their wake-up. Idempotent: a
        repeated tick finds nobody overdue again."""
        if event != LOBBY_TIMEOUT:
            return []
        due = max(now, at if at is not None else now)
        if participant in self.waiting:  # its deadline is due whatever the clocks say
            due = max(due, self.deadline(participant))
        if self.wake is not None and due >= self.wake - DEADLINE_SLACK:
            self.wake = None  # the wake-up asked for fired (or a later one did)
        effects: list[LobbyEffect] = []
        for code in [c for c in self.waiting if self.deadline(c) <= due + DEADLINE_SLACK]:
            if self.config.on_lobby_timeout == "bots" and self.next_group() is not None:
                if code not in self.overdue:
                    self.overdue.append(code)
            else:
                effects.extend(self.release(code, now=now))
        return effects + self.ensure_wake()

    def ensure_wake(self) -> list[LobbyEffect]:
        """A wake-up for the first in line (not overdue yet), unless one is asked for."""
        if self.wake is not None:
            return []
        for code in self.waiting:
            if code not in self.overdue:
                self.wake = self.deadline(code)
                return [WakeAt(code, self.wake)]
        return []

    def release(self, participant: str, *, now: float) -> list[LobbyEffect]:
        """`participant` leaves the lobby without a group: outcome `lobby_timeout`."""
        if participant in self.overdue:
            self.overdue.remove(participant)
        waiter = self.waiting.pop(participant, None)
        if waiter is None:
            return []
        effects: list[LobbyEffect] = [
            Record(LOBBY_TIMEOUT, {"participant": participant}, participant, self.stamp(now))
        ]
        effects.append(self._finish(participant, "lobby_timeout", now))
        if waiter.connection not in (None, UNKNOWN):
            effects.extend(self._counts())
        return effects

    def bot_proposal(self) -> tuple[str, list[str], int] | None:
        """`on_lobby_timeout: bots`: the group to form now for the first overdue person, its
        people (them and the longest-waiting others connected, in order of arrival) and how
        many bots fill it; None when nobody is overdue."""
        self.overdue = [code for code in self.overdue if code in self.waiting]
        group = self.next_group()
        if not self.overdue or group is None:
            return None
        first = self.overdue[0]
        others = [code for code in self.present() if code != first]
        chosen = {first, *others[: self.config.group_size - 1]}
        people = [code for code in self.waiting if code in chosen]  # in order of arrival
        return group, people, self.config.group_size - len(people)

    # -- forming groups ----------------------------------------------------------------------

    def present(self) -> list[str]:
        """The people waiting with a known open connection, in order of arrival."""
        return [c for c, w in self.waiting.items() if w.connection not in (None, UNKNOWN)]

    def next_group(self) -> str | None:
        """The next group to form (the session's groups in order), if any is left."""
        for group in self.config.groups:
            if group not in self.formed:
                return group
        return None

    def proposal(self) -> tuple[str, list[str]] | None:
        """The group to form now and its members (the longest-waiting `group_size` people
        connected, first to arrive first), or None when fewer wait or no group is left."""
        present = self.present()
        group = self.next_group()
        if group is None or len(present) < self.config.group_size:
            return None
        return group, present[: self.config.group_size]

    def form(
        self, group: str, members: list[str], *, now: float, bots: list[str] | None = None
    ) -> list[LobbyEffect]:
        """`group` was formed with `members` (as the store holds it; `bots`: those of them
        bots play): log it, and tell each member's connection that waits here. Idempotent."""
        if group in self.formed:
            return []
        present_before = len(self.present())
        self.formed[group] = list(members)
        formed: dict[str, Any] = {"group": group, "members": list(members)}
        if bots:
            formed["bots"] = list(bots)
        # A member the store grouped whose arrival this lobby never saw: a worker died after
        # the store formed the group, before the log held that input's rows (the arrival's
        # `lobby_join` with the `group_formed`). Their arrival is logged now, before the group.
        unseen = [c for c in members if c not in self.waiting and c not in (bots or [])]
        effects: list[LobbyEffect] = []
        for code in unseen:
            arrived = self.stamp(now)
            join = {"participant": code, "arrived": arrived}
            effects.append(Record(LOBBY_JOIN, join, code, arrived))
        effects.append(Record(GROUP_FORMED, formed, None, self.stamp(now)))
        for code in members:
            self.grouped[code] = group
            if code in self.overdue:
                self.overdue.remove(code)
            waiter = self.waiting.pop(code, None)
            if waiter is not None and waiter.connection not in (None, UNKNOWN):
                payload = GroupFormed(group=group, members=list(members)).model_dump()
                effects.append(Control(GROUP_FORMED, payload, code, waiter.connection))
        if len(self.present()) != present_before:
            effects.extend(self._counts())
        return effects

    # -- views -------------------------------------------------------------------------------

    def hello_for(self, participant: str) -> dict[str, Any]:
        """A lobby `hello`: no group yet (PROTOCOL v2 "The lobby")."""
        return {
            "participant": participant,
            "group": None,
            "id_in_group": None,
            "members": [],
            "group_decisions": {},
            "period": {"number": 1, "state": "lobby", "ends_at": None},
            "last_seq": 0,
            "presence": {},
        }

    def count(self, participant: str) -> dict[str, Any]:
        count = Lobby(
            waiting=len(self.present()),
            group_size=self.config.group_size,
            timeout_at=self.deadline(participant),
        )
        return count.model_dump()

    def _count_for(self, participant: str) -> Control:
        waiter = self.waiting[participant]
        return Control(LOBBY, self.count(participant), participant, waiter.connection or "")

    def _counts(self) -> list[LobbyEffect]:
        """A `lobby` frame for every person waiting with an open connection."""
        return [self._count_for(code) for code in self.present()]

    def _finish(self, participant: str, outcome: str, now: float) -> Broadcast:
        config = self.config
        payload = outcomes.finished_payload(
            outcome,
            0.0,
            config.completion,
            label=self.labels.get(participant),
            code=participant,
            session=config.session,
        )
        self.finished[participant] = payload
        return Broadcast(Channel.FINISHED, payload, participant=participant, ts=self.stamp(now))

    # -- the log -----------------------------------------------------------------------------

    def fold(self, row: Mapping[str, Any]) -> None:
        """Apply one of the lobby's log rows as it was applied live."""
        ts = float(row["ts"])
        self.clock = max(self.clock, ts)
        if row["direction"] != "out":
            return
        channel, value = row["channel"], row["value"]
        if not isinstance(value, dict):
            return
        if channel == LOBBY_JOIN:
            code = str(value["participant"])
            if code in self.grouped or code in self.finished:
                return
            waiter = self.waiting.get(code)
            if waiter is None:
                self.waiting[code] = Waiter(float(value.get("arrived", ts)), UNKNOWN)
            else:
                waiter.connection = UNKNOWN
        elif channel == LOBBY_LEAVE:
            waiter = self.waiting.get(str(value["participant"]))
            if waiter is not None:
                waiter.connection = None
        elif channel == GROUP_FORMED:
            group, members = str(value["group"]), [str(m) for m in value["members"]]
            self.formed[group] = members
            for code in members:
                self.grouped[code] = group
                self.waiting.pop(code, None)
        elif channel == LOBBY_TIMEOUT:
            self.waiting.pop(str(value["participant"]), None)
        elif channel == Channel.FINISHED and row.get("participant"):
            code = str(row["participant"])
            self.finished[code] = dict(value)
            self.waiting.pop(code, None)


def rebuild(config: LobbyConfig, rows: Iterable[Mapping[str, Any]]) -> LobbyState:
    """A lobby's state from its log rows, in their order."""
    state = LobbyState(config)
    for row in rows:
        state.fold(row)
    return state
