"""`canopy`: the researchers' command line, for what oTree's `otree` command does.

Owns the console script (pyproject `[project.scripts]`): each subcommand is a client of the
researchers' HTTP API (PROTOCOL.md), except `reset`, which wipes the local stack's folder.

    canopy create-session [CONFIG] [--name N] [--experiment E ...]   a session, its links
    canopy sessions                                                  the list, live status
    canopy export SESSION [--format csv|jsonl] [-o FILE]              the event log
    canopy payments SESSION [--format csv|json|prolific] [-o FILE]   what to pay each seat
    canopy replay SESSION                                            ended periods rebuilt
    canopy bots SESSION... [--strategy S --rate HZ --count N | --all-but N --duration S]
    canopy dead-letters list [--state dead|redriven] [--json]         what consumers gave up on
    canopy dead-letters redrive ID... | --all                         send them back again
    canopy reset [--yes]                                             wipe .run/'s data

Where the API is, strongest first: `--api` / `--token`, then `CANOPY_STORE_URL` /
`CANOPY_ADMIN_TOKEN` (the names the services use for the store's URL and its token), then the
state file of a running `make run` (`.run/devstack-state.json`), then
`http://127.0.0.1:8001` (the store's default port). Failures exit with status 1 and one
line saying why (the API's own error code and message when it answered); a refused
confirmation exits with status 1 and changes nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import shutil
import signal
import sys
import time
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, NoReturn

import click
import httpx
from rich import box
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    DownloadColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
    TransferSpeedColumn,
)
from rich.table import Table

from services.bots.runner import BotFleet, BotsError, fill_session
from services.bots.strategies import STRATEGIES, StrategyError
from services.common.experiments import Registry

DEFAULT_API = "http://127.0.0.1:8001"
# devstack (make run's supervisor) is imported only by `reset`, which needs it: the installed
# wheel (the container image) has services/ alone, and `canopy` must start there. Its two names
# used by every command are written here; tests/packaging/test_dependencies.py checks they agree.
RUN_DIR = Path(__file__).resolve().parent.parent / ".run"  # devstack.stack.PROJECT_ROOT / ".run"
STATE_FILE = "devstack-state.json"  # devstack.supervisor.STATE_FILE: make run's state file
API_ENV, TOKEN_ENV = "CANOPY_STORE_URL", "CANOPY_ADMIN_TOKEN"
TIMEOUT = 30.0
REFRESH = 0.25  # seconds between two redraws of a progress display
# What `reset` deletes inside the run folder: the database's files and the broker's queues
# (messages of sessions that would no longer exist). Logs stay.
DATA_PATHS = ("mongo", "rabbitmq/mnesia")

stderr = Console(stderr=True)


def _stdout() -> Console:
    # Piped (a script, a file): no width limit, so ids and links are never wrapped.
    terminal = sys.stdout.isatty()
    return Console(highlight=False, width=None if terminal else 10_000)


def _table(*columns: str, ids: tuple[str, ...] = ()) -> Table:
    """Boxed on a terminal; plain columns when piped, easy to read with awk. The `ids`
    columns (session ids, codes) are never wrapped or cut: other columns give way."""
    table = Table(box=box.HEAVY_HEAD if sys.stdout.isatty() else None)
    for name in columns:
        table.add_column(name, no_wrap=name in ids)
    return table


class Failure(click.ClickException):
    """One line on stderr, exit status 1."""

    def show(self, file: IO[Any] | None = None) -> None:
        click.echo(f"canopy: {self.format_message()}", err=True)


# --------------------------------------------------------------------------------------------
# Where the API is


@dataclass(frozen=True)
class Target:
    api_url: str
    token: str


def _state_file(run_dir: Path) -> dict[str, Any] | None:
    try:
        state: dict[str, Any] = json.loads((run_dir / STATE_FILE).read_text())
    except (OSError, ValueError):
        return None
    return state


def resolve_target(api: str | None, token: str | None, run_dir: Path) -> Target:
    """Flags, then the environment, then a running `make run`'s state file, then defaults."""
    state = _state_file(run_dir) or {}
    api = api or os.environ.get(API_ENV) or state.get("urls", {}).get("store") or DEFAULT_API
    token = token or os.environ.get(TOKEN_ENV) or state.get("admin_token")
    if not token:
        raise Failure(
            f"no admin token: pass --token, set {TOKEN_ENV}, or start `make run` "
            f"(its token is in {run_dir / STATE_FILE})"
        )
    return Target(api.rstrip("/"), token)


def _client(target: Target, timeout: float | None = TIMEOUT) -> httpx.Client:
    return httpx.Client(
        base_url=target.api_url,
        headers={"Authorization": f"Bearer {target.token}"},
        timeout=timeout,
    )


def _api_failure(response: httpx.Response) -> NoReturn:
    request = response.request
    where = f"{request.method} {request.url.path}"
    try:
        error = response.json()["error"]
        field = f" (field {error['field']})" if error.get("field") else ""
        message = f"{error['code']}: {error['message']}{field}"
    except (ValueError, KeyError, TypeError):
        message = response.text[:300]
    raise Failure(f"{where} -> {response.status_code} {message}")


def _call(target: Target, method: str, path: str, **kwargs: Any) -> Any:
    try:
        with _client(target) as client:
            response = client.request(method, path, **kwargs)
    except httpx.HTTPError as exc:
        raise Failure(f"cannot reach the researchers' API at {target.api_url}: {exc}") from exc
    if response.status_code >= 400:
        _api_failure(response)
    return response.json()


def _remember(ctx: click.Context, param: click.Parameter, value: Any) -> None:
    # Given to the group or to a subcommand (`canopy --api X sessions` or `canopy sessions
    # --api X`, and `python -m services.bots S --api X`): the last one given counts.
    if value is not None and param.name is not None:
        ctx.find_root().ensure_object(dict)[param.name] = value


def connection_options(command: Any) -> Any:
    for option in reversed(
        [
            click.option(
                "--api",
                metavar="URL",
                expose_value=False,
                callback=_remember,
                help=f"the researchers' API (the store's URL); env {API_ENV}",
            ),
            click.option(
                "--token",
                metavar="TOKEN",
                expose_value=False,
                callback=_remember,
                help=f"the admin token; env {TOKEN_ENV}",
            ),
            click.option(
                "--run-dir",
                type=click.Path(file_okay=False, path_type=Path),
                expose_value=False,
                callback=_remember,
                help=f"make run's folder (default {RUN_DIR}): its state file names the API and "
                "token when nothing else does; `reset` wipes it",
            ),
        ]
    ):
        command = option(command)
    return command


CONTEXT = {"help_option_names": ["-h", "--help"]}


@click.group(context_settings=CONTEXT)
@connection_options
def main() -> None:
    """Canopy's command line: sessions, exports, payments, replays, bots, reset.

    Each command talks to the researchers' API: --api / --token, else CANOPY_STORE_URL /
    CANOPY_ADMIN_TOKEN, else the running `make run` (.run/devstack-state.json)."""


def _settings(ctx: click.Context) -> dict[str, Any]:
    obj: dict[str, Any] = ctx.find_root().ensure_object(dict)
    obj.setdefault("run_dir", RUN_DIR)
    return obj


def _target(ctx: click.Context) -> Target:
    obj = _settings(ctx)
    return resolve_target(obj.get("api"), obj.get("token"), obj["run_dir"])


# --------------------------------------------------------------------------------------------
# create-session


def load_session_configs(path: Path) -> list[dict[str, Any]]:
    """Session configs from a JSON or TOML file, oTree's SESSION_CONFIGS style.

    The file holds either one config (the body of `POST /api/sessions`, plus an optional
    `name`), a list of them (JSON), or `session_configs` (a list; TOML `[[session_configs]]`)
    with optional `session_config_defaults` merged under each."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise Failure(f"cannot read {path}: {exc.strerror}") from exc
    try:
        data: Any = tomllib.loads(text) if path.suffix == ".toml" else json.loads(text)
    except (ValueError, tomllib.TOMLDecodeError) as exc:
        kind = "TOML" if path.suffix == ".toml" else "JSON"
        raise Failure(f"{path} is not valid {kind}: {exc}") from exc
    defaults: dict[str, Any] = {}
    if isinstance(data, dict) and "session_configs" in data:
        defaults = data.get("session_config_defaults") or {}
        configs = data["session_configs"]
    elif isinstance(data, list):
        configs = data
    else:
        configs = [data]
    if not isinstance(configs, list) or not all(isinstance(c, dict) for c in configs):
        raise Failure(f"{path}: session configs must be objects (tables)")
    if not isinstance(defaults, dict):
        raise Failure(f"{path}: session_config_defaults must be an object (a table)")
    return [_merge(defaults, config) for config in configs]


def _merge(defaults: dict[str, Any], config: dict[str, Any]) -> dict[str, Any]:
    merged = defaults | config
    if isinstance(defaults.get("params"), dict) and isinstance(config.get("params"), dict):
        merged["params"] = defaults["params"] | config["params"]
    return merged


def pick_config(configs: list[dict[str, Any]], name: str | None, path: Path) -> dict[str, Any]:
    names = [str(c.get("name")) for c in configs if c.get("name") is not None]
    if name is None:
        if len(configs) == 1:
            return dict(configs[0])
        raise Failure(
            f"{path} holds {len(configs)} session configs: pick one with --name ({_list(names)})"
        )
    for config in configs:
        if config.get("name") == name:
            return dict(config)
    raise Failure(f"no session config named {name!r} in {path} ({_list(names)})")


def _list(names: list[str]) -> str:
    return ", ".join(names) if names else "none has a name"


def _json_value(text: str) -> Any:
    """A flag's value: JSON when it parses (numbers, true, lists), else the text itself."""
    try:
        return json.loads(text)
    except ValueError:
        return text


def _pairs(values: tuple[str, ...], flag: str) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for item in values:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise Failure(f"{flag} takes KEY=VALUE, not {item!r}")
        result[key] = _json_value(value)
    return result


def print_links(answer: dict[str, Any], label: str, out: Console) -> None:
    session = answer["session"]
    # The id alone after "Session": scripts take it with `awk 'NR==1 {print $2}'`.
    out.print(f"Session {session}" + (f" ({label})" if label else ""), soft_wrap=True)
    if answer.get("join_url"):  # one link for everyone (PROTOCOL v2 "Online studies")
        out.print(f"  study link: {answer['join_url']}", soft_wrap=True)
    by_group: dict[str, list[dict[str, Any]]] = {}
    for participant in answer["participants"]:
        by_group.setdefault(participant["group"], []).append(participant)
    for group, members in by_group.items():
        if group is None:  # grouping "arrival": the lobby forms the groups as people arrive
            out.print("  seats (no group yet: the lobby forms the groups as people arrive):")
            for number, p in enumerate(members, 1):
                out.print(f"    seat {number}: {p['url']}", soft_wrap=True)
            continue
        out.print(f"  group {group}:")
        for p in sorted(members, key=lambda p: p["id_in_group"]):
            out.print(f"    participant {p['id_in_group']}: {p['url']}", soft_wrap=True)


@main.command("create-session", context_settings=CONTEXT)
@connection_options
@click.argument("config", required=False, type=click.Path(dir_okay=False, path_type=Path))
@click.option("--name", help="which config of the file (its `name`)")
@click.option("--experiment", help="bimatrix, public_goods, double_auction, decisions, a plug-in")
@click.option("--num-participants", type=int)
@click.option("--group-size", type=int)
@click.option("--num-periods", type=int)
@click.option("--period-length", type=float, help="seconds")
@click.option("--num-subperiods", type=int, help="0: continuous time")
@click.option("--rate-limit", type=float, help="seconds between two group_decisions")
@click.option("--label")
@click.option("--on-disconnect", type=click.Choice(["continue", "pause", "end_period", "bots"]))
@click.option("--carry-decisions/--no-carry-decisions", default=None)
@click.option("--post-period-delay", type=float, help="seconds")
@click.option("--param", "params", multiple=True, metavar="KEY=VALUE", help="a param (JSON value)")
@click.option("--params", "params_json", metavar="JSON", help="all params as a JSON object")
@click.option("--json", "as_json", is_flag=True, help="print the API's answer as JSON")
@click.pass_context
def create_session(
    ctx: click.Context,
    /,
    config: Path | None,
    name: str | None,
    params: tuple[str, ...],
    params_json: str | None,
    as_json: bool,
    **fields: Any,
) -> None:
    """Create a session from flags and/or a session-config file (JSON or TOML); print the
    participants' links. Flags override the file's values."""
    body: dict[str, Any] = {}
    if config is not None:
        body = pick_config(load_session_configs(config), name, config)
    elif name is not None:
        raise Failure("--name picks a config of a file: give the file too")
    config_name = body.pop("name", None)
    body.update({k: v for k, v in fields.items() if v is not None})
    if params_json is not None:
        given = _json_value(params_json)
        if not isinstance(given, dict):
            raise Failure("--params takes a JSON object")
        body["params"] = given
    if params:
        body["params"] = dict(body.get("params") or {}) | _pairs(params, "--param")
    if not body.get("label") and config_name:
        body["label"] = str(config_name)
    missing = [k for k in ("experiment", "num_participants", "group_size", "period_length")
               if k not in body]  # fmt: skip
    if missing:
        flags = ", ".join("--" + k.replace("_", "-") for k in missing)
        raise Failure(f"missing {flags} (or a config file that sets them)")
    answer = _call(_target(ctx), "POST", "/api/sessions", json=body)
    if as_json:
        click.echo(json.dumps(answer, indent=2))
    else:
        print_links(answer, str(body.get("label") or ""), _stdout())


# --------------------------------------------------------------------------------------------
# sessions, replay


def _periods(groups: list[dict[str, Any]]) -> str:
    states: dict[str, int] = {}
    for group in groups:
        period = group.get("period") or {}
        key = f"{period.get('state', 'waiting')} {period.get('number', 1)}"
        states[key] = states.get(key, 0) + 1
    return ", ".join(f"{n}× {state}" if n > 1 else state for state, n in sorted(states.items()))


@main.command(context_settings=CONTEXT)
@connection_options
@click.option("--json", "as_json", is_flag=True, help="print the API's answer as JSON")
@click.pass_context
def experiments(ctx: click.Context, as_json: bool) -> None:
    """List the experiments the store has loaded: built-in or plug-in (and which package and
    version), their channels, what a decision is, and the first line of their description."""
    answer = _call(_target(ctx), "GET", "/api/experiments")
    if as_json:
        click.echo(json.dumps(answer, indent=2))
        return
    table = _table("experiment", "source", "channels", "decision", "description")
    for info in answer["experiments"]:
        table.add_row(
            info["name"],
            info.get("source") or "",
            ", ".join(info.get("channels") or []),
            _decision_text(info.get("decision")),
            (info.get("description") or "").split("\n\n")[0].replace("\n", " "),
        )
    _stdout().print(table)
    for failure in answer.get("failures") or []:  # left out of the registry: say why
        stderr.print(
            f"[red]plug-in {escape(failure['plugin'])} failed to load:[/] "
            f"{escape(failure['error'])}",
            highlight=False,
            soft_wrap=True,
        )
    if answer.get("failures"):
        raise SystemExit(1)


def _decision_text(decision: Any) -> str:
    """A declared decision in a few words (docs/experiments.md: number, choice, mix, compound);
    empty for an experiment that declares none."""
    if not isinstance(decision, dict) or not isinstance(decision.get("input"), dict):
        return ""
    return _input_text(decision["input"])


def _input_text(spec: dict[str, Any]) -> str:
    kind = spec.get("kind")
    if kind == "number":
        unit = f" {spec['unit']}" if spec.get("unit") else ""
        return f"number {spec.get('min', 0):g}–{spec.get('max', 0):g}{unit}"
    if kind == "choice":
        options = spec.get("options") or []
        return "one of " + ", ".join(str(o.get("label", o.get("value"))) for o in options)
    if kind == "mix":
        return "a mix of " + ", ".join(str(a) for a in spec.get("actions") or [])
    if kind == "compound":
        fields = spec.get("fields") or {}
        return "; ".join(f"{name}: {_input_text(sub)}" for name, sub in fields.items())
    return str(kind or "")


@main.command(context_settings=CONTEXT)
@connection_options
@click.option("--json", "as_json", is_flag=True, help="print the API's answer as JSON")
@click.pass_context
def sessions(ctx: click.Context, as_json: bool) -> None:
    """List the sessions with their live status (who is connected, each group's period)."""
    answer = _call(_target(ctx), "GET", "/api/sessions")
    if as_json:
        click.echo(json.dumps(answer, indent=2))
        return
    table = _table(
        "session", "label", "experiment", "created", "connected", "periods", ids=("session",)
    )
    for s in answer["sessions"]:
        table.add_row(
            s["session"],
            s.get("label") or "",
            s["experiment"],
            s["created_at"][:19].replace("T", " "),
            f"{s['connected']}/{len(s['participants'])}",
            _periods(s["groups"]),
        )
    out = _stdout()
    out.print(table if answer["sessions"] else "No sessions.")


@main.command(context_settings=CONTEXT)
@connection_options
@click.argument("session")
@click.option("--json", "as_json", is_flag=True, help="print the API's answer as JSON")
@click.pass_context
def replay(ctx: click.Context, session: str, as_json: bool) -> None:
    """Every group's ended periods, rebuilt from the event log: final decisions, payoffs."""
    answer = _call(_target(ctx), "GET", f"/api/sessions/{session}/replay")
    if as_json:
        click.echo(json.dumps(answer, indent=2))
        return
    out = _stdout()
    table = _table(
        "group", "period", "participant", "decision", "payoff", "sub-periods",
        ids=("group", "participant", "decision", "payoff"),
    )  # fmt: skip
    rows = 0
    for group in answer["groups"]:
        for period in group["periods"]:
            payoffs = period.get("payoffs") or {}
            for code in sorted(set(period.get("group_decisions") or {}) | set(payoffs)):
                decision = (period.get("group_decisions") or {}).get(code)
                payoff = payoffs.get(code)
                table.add_row(
                    group["group"],
                    str(period["period"]),
                    code,
                    json.dumps(decision),
                    "" if payoff is None else f"{payoff:.4f}",
                    str(len(period.get("subperiods") or [])),
                )
                rows += 1
    out.print(table if rows else "No ended period yet.")


# --------------------------------------------------------------------------------------------
# export


@main.command(context_settings=CONTEXT)
@connection_options
@click.argument("session")
@click.option(
    "--format", "fmt", type=click.Choice(["csv", "jsonl"]), default="csv", show_default=True
)
@click.option(
    "-o", "--output", type=click.Path(dir_okay=False, path_type=Path), help="file (default: stdout)"
)
@click.pass_context
def export(ctx: click.Context, session: str, fmt: str, output: Path | None) -> None:
    """Download the session's event log, exactly as `GET /api/sessions/{id}/events` sends it."""
    target = _target(ctx)
    path = f"/api/sessions/{session}/events"
    sink = output.with_name(f".{output.name}.part") if output else None
    rows = size = 0
    progress = Progress(
        SpinnerColumn(),
        TextColumn("export {task.fields[rows]} rows"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        console=stderr,
        transient=True,
        disable=not stderr.is_terminal,
    )
    try:
        with (
            _client(target, timeout=None) as client,
            client.stream("GET", path, params={"format": fmt}) as response,
        ):
            if response.status_code >= 400:
                response.read()
                _api_failure(response)
            with progress, _open_sink(sink) as out:
                task = progress.add_task("export", total=None, rows=0)
                for chunk in response.iter_bytes():
                    out.write(chunk)
                    rows += chunk.count(b"\n")
                    size += len(chunk)
                    progress.update(task, completed=size, rows=rows)
    except httpx.HTTPError as exc:
        if sink is not None:
            sink.unlink(missing_ok=True)
        raise Failure(f"export from {target.api_url} failed: {exc}") from exc
    except BaseException:
        if sink is not None:
            sink.unlink(missing_ok=True)
        raise
    if output is not None and sink is not None:
        sink.replace(output)  # a complete file or none: never half an export under its name
        lines = rows - 1 if fmt == "csv" else rows
        stderr.print(f"{lines} events ({size} bytes) written to {output}", highlight=False)


# --------------------------------------------------------------------------------------------
# payments


@main.command(context_settings=CONTEXT)
@connection_options
@click.argument("session")
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["csv", "json", "prolific"]),
    default="csv",
    show_default=True,
    help="prolific: Prolific's bulk-bonus text (<label>,<bonus> a line)",
)
@click.option(
    "-o", "--output", type=click.Path(dir_okay=False, path_type=Path), help="file (default: stdout)"
)
@click.pass_context
def payments(ctx: click.Context, session: str, fmt: str, output: Path | None) -> None:
    """Download the session's payments file (label, outcome, payoff, bonus per seat), exactly
    as `GET /api/sessions/{id}/payments` sends it."""
    target = _target(ctx)
    try:
        with _client(target) as client:
            response = client.get(f"/api/sessions/{session}/payments", params={"format": fmt})
    except httpx.HTTPError as exc:
        raise Failure(f"payments from {target.api_url} failed: {exc}") from exc
    if response.status_code >= 400:
        _api_failure(response)
    if output is None:
        sys.stdout.buffer.write(response.content)
        sys.stdout.buffer.flush()
        return
    sink = output.with_name(f".{output.name}.part")
    try:
        sink.write_bytes(response.content)
        sink.replace(output)  # a complete file or none
    except OSError as exc:
        sink.unlink(missing_ok=True)
        raise Failure(f"cannot write {output}: {exc.strerror}") from exc
    rows = response.content.count(b"\n") - (1 if fmt == "csv" else 0)
    if fmt == "json":
        rows = len(response.json().get("payments", []))
    stderr.print(f"{rows} payment rows written to {output}", highlight=False)


@contextlib.contextmanager
def _open_sink(path: Path | None) -> Iterator[IO[bytes]]:
    if path is None:
        yield sys.stdout.buffer
        sys.stdout.buffer.flush()
        return
    with path.open("wb") as f:
        yield f


# --------------------------------------------------------------------------------------------
# bots


@main.command(context_settings=CONTEXT)
@connection_options
@click.argument("session_ids", metavar="SESSION...", nargs=-1, required=True)
@click.option(
    "--strategy",
    type=click.Choice(STRATEGIES),
    default="default",
    show_default=True,
    help="default: random_walk (zi for double_auction)",
)
@click.option(
    "--rate", type=click.FloatRange(min=0), default=1.0, show_default=True, help="turns per second"
)
@click.option("--count", type=click.IntRange(min=1), help="at most this many bots per session")
@click.option(
    "--all-but", type=click.IntRange(min=0), help="leave this many open slots per session"
)
@click.option(
    "--duration",
    type=click.FloatRange(min=0, min_open=True),
    help="seconds; default: until the last period ended",
)
@click.option("--value", type=float, help="fixed: the decision; zi: the buyers' value")
@click.option("--cost", type=float, help="zi: the sellers' cost")
@click.option("--low", type=float, help="random_walk: lowest decision; zi: lowest bid")
@click.option("--high", type=float, help="random_walk: highest decision; zi: highest ask")
@click.option("--seed", type=int, help="the same moves on every run")
@click.pass_context
def bots(
    ctx: click.Context,
    /,
    session_ids: tuple[str, ...],
    strategy: str,
    rate: float,
    count: int | None,
    all_but: int | None,
    duration: float | None,
    seed: int | None,
    **options: float | None,
) -> None:
    """Bots in the open slots (participants not connected) of one or more sessions, playing
    until each session's last period ended (or --duration, or Ctrl-C); then their counts."""
    if count is not None and all_but is not None:
        raise Failure("give --count or --all-but, not both")
    target = _target(ctx)
    # The experiments the bots know (their declared decisions): the built-ins and the plug-ins
    # installed where the bots run, loaded once for every session.
    registry = Registry.standard()
    try:
        fleets = asyncio.run(
            _run_bots(
                target,
                session_ids,
                strategy,
                rate,
                count,
                all_but,
                duration,
                seed,
                options,
                registry,
            )
        )
    except (BotsError, StrategyError) as exc:
        raise Failure(str(exc)) from exc
    table = _table("session", "bot", "sent", "acked", "errors", "state", ids=("session", "bot"))
    for session, fleet in fleets.items():
        for bot in fleet.bots:
            state = bot.gave_up or ("done" if bot.finished else "stopped")
            table.add_row(
                session, bot.code, str(bot.sent), str(len(bot.acked)), str(len(bot.errors)), state
            )
    _stdout().print(table)


async def _run_bots(
    target: Target,
    session_ids: tuple[str, ...],
    strategy: str,
    rate: float,
    count: int | None,
    all_but: int | None,
    duration: float | None,
    seed: int | None,
    options: dict[str, float | None],
    registry: Registry,
) -> dict[str, BotFleet]:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    fleets: dict[str, BotFleet] = {}
    try:
        for session in session_ids:
            fleets[session] = await fill_session(
                target.api_url, target.token, session, count=count, all_but=all_but,
                strategy=strategy, rate=rate, options=options, seed=seed, registry=registry,
            )  # fmt: skip
            fleet = fleets[session]
            stderr.print(
                f"session {session}: {len(fleet.bots)} bot{'s' * (len(fleet.bots) != 1)} "
                f"({fleet.experiment}, "
                f"{fleet.strategy}, {rate:g} turns/s) in {', '.join(fleet.codes)}",
                highlight=False,
                soft_wrap=True,
            )
            if fleet.note:
                stderr.print(
                    f"[yellow]warning:[/] {escape(fleet.note)}", highlight=False, soft_wrap=True
                )
        everyone = [bot for fleet in fleets.values() for bot in fleet.bots]
        deadline = None if duration is None else time.monotonic() + duration
        progress = Progress(
            SpinnerColumn(),
            TextColumn("bots done"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[counts]}"),
            TimeElapsedColumn(),
            console=stderr,
            disable=not stderr.is_terminal,
        )
        with progress:
            task = progress.add_task("bots", total=len(everyone), counts="")
            while not stop.is_set():
                totals = {"connected": 0, "sent": 0, "acked": 0, "errors": 0}
                for fleet in fleets.values():
                    totals["connected"] += fleet.connected()
                    for key, value in fleet.totals().items():
                        totals[key] += value
                done = sum(1 for bot in everyone if bot.finished)
                counts = " ".join(f"{k} {v}" for k, v in totals.items())
                progress.update(task, completed=done, counts=counts)
                if done == len(everyone):
                    break
                if deadline is not None and time.monotonic() >= deadline:
                    break
                # Redraw pace; the stop signal ends the wait at once.
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), REFRESH)
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        await asyncio.gather(*(fleet.stop() for fleet in fleets.values()))
    return fleets


# --------------------------------------------------------------------------------------------
# dead-letters


@main.group("dead-letters", context_settings=CONTEXT)
@connection_options
def dead_letters() -> None:
    """Messages a consumer gave up on (malformed, a newer version), kept by the store.

    The alert CanopyDeadLetters says when one comes; docs/operations.md "Dead letters" says
    what to do."""


def _when(ts: Any) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts)) if ts else ""


@dead_letters.command("list", context_settings=CONTEXT)
@connection_options
@click.option("--state", type=click.Choice(["dead", "redriven"]), help="only these")
@click.option("--limit", type=click.IntRange(1, 1000), default=100, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="print the API's answer as JSON")
@click.pass_context
def dead_letters_list(ctx: click.Context, state: str | None, limit: int, as_json: bool) -> None:
    """The kept dead letters, newest first: where each died, why, and whether it was redriven."""
    params: dict[str, Any] = {"limit": limit} | ({"state": state} if state else {})
    answer = _call(_target(ctx), "GET", "/api/dead-letters", params=params)
    if as_json:
        click.echo(json.dumps(answer, indent=2))
        return
    table = _table("id", "kept", "state", "queue", "reason", "cause", ids=("id",))
    for letter in answer["dead_letters"]:
        redrives = f" ×{letter['redrives']}" if letter.get("redrives") else ""
        table.add_row(
            letter["id"],
            _when(letter.get("kept_at")),
            f"{letter['state']}{redrives}",
            letter.get("queue") or "",
            letter.get("reason") or "",
            letter.get("cause") or "",
        )
    out = _stdout()
    out.print(table if answer["dead_letters"] else "No dead letters.")
    out.print(f"{answer['dead']} dead, {answer['total']} kept in all.")


@dead_letters.command("redrive", context_settings=CONTEXT)
@connection_options
@click.argument("ids", nargs=-1)
@click.option("--all", "every", is_flag=True, help="every dead letter still dead, oldest first")
@click.pass_context
def dead_letters_redrive(ctx: click.Context, ids: tuple[str, ...], every: bool) -> None:
    """Publish dead letters again to the exchange and routing key they came by, and mark them
    redriven. Do it once their cause is gone: one that fails again comes back as a new one."""
    target = _target(ctx)
    if every == bool(ids):
        raise click.UsageError("give dead-letter ids, or --all")
    if every:
        found = _call(target, "GET", "/api/dead-letters", params={"state": "dead", "limit": 1000})
        ids = tuple(letter["id"] for letter in reversed(found["dead_letters"]))
    for dead_letter in ids:
        answer = _call(target, "POST", f"/api/dead-letters/{dead_letter}/redrive")
        where = answer.get("exchange") or "the default exchange"
        click.echo(
            f"Redrove {dead_letter} to {where} with key {answer.get('routing_key')!r} "
            f"(redrive {answer.get('redrives')})."
        )
    if not ids:
        click.echo("No dead letters to redrive.")


# --------------------------------------------------------------------------------------------
# reset


@main.command(context_settings=CONTEXT)
@connection_options
@click.option("--yes", is_flag=True, help="do not ask for confirmation")
@click.pass_context
def reset(ctx: click.Context, yes: bool) -> None:
    """Delete every session, participant and event of the local stack (like `otree resetdb`).

    Refuses while a `make run` uses the folder: it takes make run's own lock for as long as it
    deletes, so no stack can start on half a database either."""
    from devstack.infra import LOCK_NAME, owned_processes  # a source checkout's command

    run_dir: Path = _settings(ctx)["run_dir"]
    present = [run_dir / p for p in DATA_PATHS if (run_dir / p).exists()]
    lock_path = run_dir / LOCK_NAME
    with _folder_lock(lock_path) as held_by:
        if held_by is not None:
            raise Failure(
                f"{run_dir} is in use by a running `make run` (pid {held_by}): "
                "stop it first (Ctrl-C in its terminal), then reset"
            )
        leftovers = owned_processes(run_dir)
        if leftovers:
            raise Failure(
                f"processes of an earlier `make run` still run on {run_dir} (pids "
                f"{', '.join(map(str, leftovers))}): start and stop `make run` once (it ends "
                "them), then reset"
            )
        if not present:
            click.echo(f"Nothing to reset in {run_dir}.")
            return
        if not yes:
            what = ", ".join(str(p.relative_to(run_dir)) for p in present)
            click.confirm(
                f"Delete every session and event in {run_dir} ({what})?",
                abort=True,
                err=True,
            )
        for path in present:
            shutil.rmtree(path)
    click.echo(f"Reset {run_dir}: the next `make run` starts with an empty database.")


@contextlib.contextmanager
def _folder_lock(path: Path) -> Iterator[str | None]:
    """make run's flock on the folder (devstack.infra): yields None while we hold it, or the
    pid written in it when someone else does."""
    if not path.parent.exists():
        yield None
        return
    with path.open("a+") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            yield lock.read().strip() or "?"
            return
        try:
            yield None
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


if __name__ == "__main__":
    main()
