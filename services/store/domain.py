"""The store's pure logic: session layout, event documents, export rows."""

from __future__ import annotations

import math
import secrets
from datetime import UTC, datetime
from typing import Annotated, Any, ClassVar, Literal, NoReturn, cast

import orjson
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic.config import JsonDict
from pydantic_core import InitErrorDetails, PydanticCustomError

from services.common.directory import GroupConfig
from services.common.experiments import Registry
from services.common.lobby import LobbyConfig
from services.common.messages import LogRecord
from services.common.outcomes import Completion, Outcome, Payment
from services.common.seats import new_key

EXPORT_COLUMNS = ("ts", "session", "group", "participant", "direction", "channel", "seq", "value")


# Experiment params are stored as a MongoDB document and sent to every decisions worker:
# plain JSON only, and shallow (MongoDB itself refuses documents nested 100 deep).
MAX_PARAMS_DEPTH = 16


def _params_problem(value: Any, where: str, depth: int = 0) -> str | None:
    """Why `value` (part of `params`) cannot be stored and sent on, or None."""
    if isinstance(value, dict):
        if depth >= MAX_PARAMS_DEPTH:
            return f"{where}: nested deeper than {MAX_PARAMS_DEPTH} levels"
        for key, item in value.items():
            if not key or key.startswith("$") or "." in key or "\x00" in key:
                return f"{where}: {key!r} is not a valid key (empty, '$…', '.' or NUL)"
            problem = _params_problem(item, f"{where}.{key}", depth + 1)
            if problem is not None:
                return problem
    elif isinstance(value, list):
        if depth >= MAX_PARAMS_DEPTH:
            return f"{where}: nested deeper than {MAX_PARAMS_DEPTH} levels"
        for index, item in enumerate(value):
            problem = _params_problem(item, f"{where}.{index}", depth + 1)
            if problem is not None:
                return problem
    elif isinstance(value, float) and not math.isfinite(value):
        return f"{where}: numbers must be finite (JSON has no NaN or Infinity)"
    elif isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 2**63:
        return f"{where}: integers must fit in 64 bits"
    return None


def _whole_number(value: Any) -> Any:
    """JSON has one number type: 8.0 is the integer 8 (as in JSON Schema); 8.5, "8" and true
    are not integers."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


WholeNumber = Annotated[int, BeforeValidator(_whole_number)]


def _experiment_names(schema: JsonDict, model: type[BaseModel]) -> None:
    """The schema of `experiment` lists the experiments a session may be of, the model's
    registry's (for API clients and generated tests); the model validator is what refuses
    another one."""
    properties = cast(dict[str, JsonDict], schema.get("properties", {}))
    if "experiment" in properties:
        registry = cast("type[CreateSession]", model).experiments
        properties["experiment"]["enum"] = list(registry.names())


class CreateSession(BaseModel):
    """Body of `POST /api/sessions` (PROTOCOL.md).

    The experiments it knows are its `experiments` registry's: the built-ins alone on this
    class, the store's (built-ins and plug-ins, made at its start) on `CreateSession.of(it)`.

    Strict: a number where a number belongs (`"8"`, `true` or `8.5` for an integer → 422; `8.0`
    is 8), no NaN / Infinity (the HTTP layer's JSON parser accepts them; JSON has none), no
    unknown fields; `params` plain JSON (see `_params_problem`), kept as the experiment's
    params model dumps them (defaults filled in: PROTOCOL v2). Bounded (PROTOCOL v2 "Limits"):
    a sub-period lasts at least `MIN_SUBPERIOD_SECONDS`, a session has at most `MAX_TICKS`
    periods and sub-periods in all (`num_periods · max(1, num_subperiods)`), a group at most
    1,000 members.
    """

    model_config = ConfigDict(
        extra="forbid", strict=True, allow_inf_nan=False, json_schema_extra=_experiment_names
    )
    experiments: ClassVar[Registry] = Registry.builtin()

    experiment: str
    num_participants: WholeNumber = Field(ge=1, le=10_000)
    group_size: WholeNumber = Field(ge=1, le=1_000)
    num_periods: WholeNumber = Field(default=1, ge=1, le=1_000)
    period_length: float = Field(gt=0, le=86_400)
    num_subperiods: WholeNumber = Field(default=0, ge=0, le=100_000)
    rate_limit: float = Field(default=0.0, ge=0, le=3_600)
    params: dict[str, Any] = Field(default_factory=dict, validate_default=True)  # defaults too
    label: str = Field(default="", max_length=200)
    # PROTOCOL v1.1 "Session settings".
    on_disconnect: Literal["continue", "pause", "end_period", "bots"] = "continue"
    carry_decisions: bool = True
    post_period_delay: float = Field(default=0.0, ge=0, le=86_400)
    # PROTOCOL v2 "Online studies" (services/common/outcomes.py): seat i's external id, the
    # study link's label parameter, where each outcome sends the person, and the money.
    labels: list[Annotated[str, Field(min_length=1, max_length=128)]] | None = Field(
        default=None, max_length=10_000
    )
    label_param: str = Field(default="label", pattern=r"^[A-Za-z0-9_.\-]{1,64}$")
    completion: dict[Outcome, Completion] = Field(default_factory=dict)
    payment: Payment = Field(default_factory=Payment)
    # PROTOCOL v2 "The lobby" (services/common/lobby.py): groups formed as people arrive.
    grouping: Literal["fixed", "arrival"] = "fixed"
    lobby_timeout: float = Field(default=300.0, gt=0, le=86_400)
    on_lobby_timeout: Literal["release", "bots"] = "release"
    # `on_disconnect: bots`: how long a member is away before a bot plays for them.
    dropout_grace: float = Field(default=15.0, gt=0, le=3_600)

    @classmethod
    def of(cls, registry: Registry) -> type[CreateSession]:
        """This model for the sessions of `registry`'s experiments (the store's): the body of
        its `POST /api/sessions`. The registry may gain plug-ins later (at the store's start):
        the model asks it at each validation."""
        namespace = {"experiments": registry, "__doc__": cls.__doc__, "__module__": cls.__module__}
        return type(cls.__name__, (cls,), namespace)

    @model_validator(mode="after")
    def _check(self) -> CreateSession:
        experiments = self.experiments
        if self.experiment not in experiments:
            failed = experiments.failures()
            # A plug-in that failed to load is left out of the registry; say so here, where
            # a researcher meets it, not only in the services' logs.
            broken = (
                f"; {len(failed)} plug-in(s) failed to load: "
                + "; ".join(f"{spec} ({error})" for spec, error in sorted(failed.items()))
                if failed
                else ""
            )
            raise ValueError(
                f"unknown experiment {self.experiment!r}; known: "
                f"{', '.join(experiments.names())}{broken}"
            )
        if self.num_participants % self.group_size:
            raise ValueError("num_participants must be a multiple of group_size")
        if self.labels is not None:
            if len(self.labels) != self.num_participants:
                _refuse("labels", "give exactly num_participants labels", self.labels)
            if len(set(self.labels)) != len(self.labels):
                _refuse("labels", "labels must be distinct", self.labels)
        if self.num_subperiods > 0 and self.period_length < MIN_SUBPERIOD_SECONDS * (
            self.num_subperiods * (1 - 1e-9)  # 0.3 s in 6 is 0.05 s, whatever floats say
        ):
            _refuse(
                "num_subperiods",
                f"a sub-period lasts at least {MIN_SUBPERIOD_SECONDS} s "
                "(period_length / num_subperiods)",
                self.num_subperiods,
            )
        if self.num_periods * max(1, self.num_subperiods) > MAX_TICKS:
            where = "num_subperiods" if self.num_subperiods > 1 else "num_periods"
            _refuse(
                where,
                f"num_periods · max(1, num_subperiods) is at most {MAX_TICKS:,}",
                getattr(self, where),
            )
        experiment = experiments.get(self.experiment)
        problem = experiment.check_group(
            experiment.params_model.model_validate(self.params), self.group_size
        )
        if problem is not None:  # reported at the field it names ("params.game", "group_size")
            where, message = problem
            _refuse(
                where,
                message,
                self.params if where.startswith("params") else self.group_size,
                kind="invalid_group",
            )
        return self

    @field_validator("params")
    @classmethod
    def _plain_params(cls, params: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        problem = _params_problem(params, "params")
        if problem is not None:
            raise ValueError(problem)
        name = info.data.get("experiment")
        experiments = cls.experiments
        if isinstance(name, str) and name in experiments:
            # The experiment's own params model: a ValidationError raised here is reported at
            # params.<its field> (e.g. params.payoff_matrix.0.1). Kept as it dumps them: what
            # the hooks get, with the defaults filled in.
            model = experiments.get(name).params_model.model_validate(params)
            dumped: dict[str, Any] = model.model_dump(mode="json")
            return dumped
        return params


# PROTOCOL v2 "Limits": session settings that bound the timers' and decisions' work.
MIN_SUBPERIOD_SECONDS = 0.05
MAX_TICKS = 100_000


def _refuse(where: str, message: str, value: Any, *, kind: str = "invalid_setting") -> NoReturn:
    """Refuse a session at the dotted field `where` (the 422's `field`)."""
    raise ValidationError.from_exception_data(
        "CreateSession",
        [
            InitErrorDetails(
                type=PydanticCustomError(kind, message),
                loc=tuple(where.split(".")),
                input=value,
            )
        ],
    )


def new_session_id() -> str:
    return secrets.token_hex(6)


def new_group_id() -> str:
    return secrets.token_hex(8)


def new_participant_code() -> str:
    return secrets.token_hex(10)  # 80 random bits: public within the session, never a key


def participant_url(public_url: str, key: str) -> str:
    """A participant's link: the page of their seat (PROTOCOL v2: `/p/{key}`)."""
    return f"{public_url.rstrip('/')}/p/{key}"


def layout_session(request: CreateSession, public_url: str, seat_secret: bytes) -> dict[str, Any]:
    """The session, group and participant documents of a new session: each participant's
    public code and secret seat key (services.common.seats), its link made of the key."""
    session_id = new_session_id()
    created_at = datetime.now(UTC)
    config = request.model_dump(exclude={"completion"})
    # Each outcome's one way on: {"url": …} or {"code": …}, as given.
    config["completion"] = {
        outcome: target.model_dump(exclude_none=True)
        for outcome, target in request.completion.items()
    }
    labels = iter(request.labels or [])
    arrival = request.grouping == "arrival"
    groups, participants = [], []
    for _ in range(request.num_participants // request.group_size):
        group_id = new_group_id()
        codes = [new_participant_code() for _ in range(request.group_size)]
        groups.append(
            {
                "_id": group_id,
                "session": session_id,
                # Arrival grouping: no members until the lobby forms the group.
                "members": [] if arrival else codes,
                **({"formed": False} if arrival else {}),
                "period": {"number": 1, "state": "waiting", "ends_at": None},
            }
        )
        for index, code in enumerate(codes, start=1):
            key = new_key(seat_secret)
            participant = {
                "_id": code,
                "key": key,
                "session": session_id,
                "group": None if arrival else group_id,
                "id_in_group": None if arrival else index,
                "experiment": request.experiment,
                "url": participant_url(public_url, key),
                "connected": False,
            }
            label = next(labels, None)
            if label is not None:
                participant["label"] = label
            participants.append(participant)
    join_key = new_key(seat_secret)  # the study link's: secret like a seat key
    session = {
        "_id": session_id,
        "created_at": created_at,
        **config,
        "join_key": join_key,
        "join_url": f"{public_url.rstrip('/')}/join/{join_key}",
        "groups": [g["_id"] for g in groups],
    }
    return {"session": session, "groups": groups, "participants": participants}


def lobby_config(
    session: dict[str, Any],
    groups: list[dict[str, Any]],
    labels: dict[str, str] | None = None,
) -> LobbyConfig:
    """An arrival session's lobby (what decisions asks for over /internal): its groups in
    order, those formed already with their members, and the settings a seat's page shows."""
    order = list(session["groups"])
    return LobbyConfig(
        session=session["_id"],
        experiment=session["experiment"],
        group_size=session["group_size"],
        lobby_timeout=float(session.get("lobby_timeout", 300.0)),
        on_lobby_timeout=session.get("on_lobby_timeout", "release"),
        groups=order,
        formed={g["_id"]: list(g["members"]) for g in groups if g.get("members")},
        completion=session.get("completion") or {},
        labels=labels or {},
        num_periods=session["num_periods"],
        period_length=session["period_length"],
        num_subperiods=session["num_subperiods"],
        on_disconnect=session.get("on_disconnect", "continue"),
        params=session["params"],
    )


def event_document(record: LogRecord) -> dict[str, Any]:
    """The MongoDB document of a log record; its `_id` makes a re-sent record a duplicate."""
    return {
        "_id": record.id,
        "ts": record.ts,
        "session": record.session,
        "group": record.group,
        "participant": record.participant,
        "direction": record.direction,
        "channel": record.channel,
        "seq": record.seq,
        # JSON text: participants' keys may hold "$" or "." that a document field may not.
        "value": orjson.dumps(record.value).decode(),
    }


def iso_ts(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def group_config(
    session: dict[str, Any], group: dict[str, Any], labels: dict[str, str] | None = None
) -> GroupConfig:
    """A group's configuration from its session's and group's documents (what decisions asks
    for over /internal, and what the replay folds the group's log with); `labels`: the
    members' labels known now (code → label; a study link gives labels as people arrive)."""
    return GroupConfig(
        labels=labels or {},
        completion=session.get("completion") or {},
        session=session["_id"],
        group=group["_id"],
        experiment=session["experiment"],
        members=group["members"],
        num_periods=session["num_periods"],
        period_length=session["period_length"],
        num_subperiods=session["num_subperiods"],
        rate_limit=session["rate_limit"],
        params=session["params"],
        on_disconnect=session.get("on_disconnect", "continue"),
        carry_decisions=session.get("carry_decisions", True),
        post_period_delay=session.get("post_period_delay", 0.0),
        dropout_grace=float(session.get("dropout_grace", 15.0)),
        bots=list(group.get("bots") or []),
    )
