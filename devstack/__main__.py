"""`python -m devstack run` (what `make run` calls): the whole system on this machine.

Owns the foreground life of a development stack: start the persistent infrastructure in a run
folder (`<project>/.run/`, or --run-dir), the four services, demo sessions (unless
--no-demo); print the links; then supervise what it started (`devstack.supervisor`: a process
that exits is started again, the same way) until SIGINT / SIGTERM / SIGHUP; then stop the
services, then the infrastructure — also when anything fails on the way.

While it supervises, `<run folder>/devstack-state.json` says the PID of every process, its
restarts, the URLs and the admin token; `<run folder>/logs/devstack.log` lists every restart.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import time
from pathlib import Path
from types import FrameType
from typing import Any
from urllib.parse import urlsplit

import httpx

from devstack.infra import InfraError, InfraHandle, MongoStorage, start_infra, stop_process
from devstack.monitoring import PrometheusHandle, start_prometheus
from devstack.stack import (
    PROJECT_ROOT,
    STOP_GRACE,
    StackError,
    StackHandle,
    StackUrls,
    start_bots_process,
    start_stack,
)
from devstack.supervisor import (
    LOG_FILE,
    STATE_FILE,
    STOP_SIGNALS,
    Child,
    Supervisor,
    adopt,
    children,
)

RUN_DIR = PROJECT_ROOT / ".run"
_DEMO_COMMON: dict[str, Any] = {
    "num_periods": 1,
    "period_length": 120,
    "num_subperiods": 0,
    "rate_limit": 0.0,
}
# One session of each built-in experiment (PROTOCOL v1.1), each with its own groups.
DEMO_SESSIONS: list[dict[str, Any]] = [
    {"experiment": "decisions", "num_participants": 4, "group_size": 2, "label": "demo"},
    {
        "experiment": "bimatrix",
        "num_participants": 2,
        "group_size": 2,
        "label": "demo: prisoner's dilemma",
        "params": {"game": "prisoners_dilemma"},
    },
    {
        "experiment": "public_goods",
        "num_participants": 4,
        "group_size": 4,
        "label": "demo: public goods",
        "num_subperiods": 4,
    },
    {
        "experiment": "double_auction",
        "num_participants": 4,
        "group_size": 4,
        "label": "demo: double auction",
    },
]


class Stop(BaseException):
    """Raised from a signal handler: unwinds through the `with` blocks that stop things."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)


def _on_stop_signal(signum: int, frame: FrameType | None) -> None:
    # Stop once: a second Ctrl-C must not interrupt the clean shutdown halfway.
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    raise Stop(signum)


def create_demo_sessions(urls: StackUrls) -> list[dict[str, Any]]:
    """One session of each built-in experiment; their answers (with `label` added)."""
    sessions = []
    for demo in DEMO_SESSIONS:
        body = _DEMO_COMMON | demo
        response = httpx.post(
            f"{urls.store_url}/api/sessions",
            json=body,
            headers={"Authorization": f"Bearer {urls.admin_token}"},
            timeout=30,
        )
        if response.status_code != 201:
            raise StackError(
                f"creating the demo session {body['label']!r} failed: POST /api/sessions -> "
                f"{response.status_code} {response.text[:1000]}"
            )
        sessions.append(response.json() | {"label": body["label"]})
    return sessions


def print_banner(
    urls: StackUrls,
    sessions: list[dict[str, Any]],
    management_url: str | None,
    timings: dict[str, float],
    run_dir: Path,
    prometheus_url: str | None = None,
    bots: bool = False,
    amqp_url: str | None = None,
) -> None:
    token = urls.admin_token
    if sessions:
        lines = ["", "Canopy is running. Demo sessions, one of each built-in experiment:"]
    else:
        lines = ["", "Canopy is running (no demo session: --no-demo)."]
    for session in sessions:
        lines.append(f"  {session['label']} (session {session['session']}):")
        by_group: dict[Any, list[dict[str, Any]]] = {}
        for participant in session["participants"]:
            by_group.setdefault(participant["group"], []).append(participant)
        for group, members in by_group.items():
            lines.append(f"    group {group}:")
            for p in sorted(members, key=lambda p: p["id_in_group"]):
                lines.append(
                    f"      participant {p['id_in_group']}: {p['url']}{_who(p, session, bots)}"
                )
    lines += [
        "",
        "Researchers:",
        # A fragment: the browser never sends it, so no server log keeps the token.
        f"  console:    {urls.store_url}/#token={token}",
    ]
    if sessions:
        lines.append(
            f"  events CSV: curl -H 'Authorization: Bearer {token}' "
            f"'{urls.store_url}/api/sessions/{sessions[0]['session']}/events?format=csv'"
        )
    lines.append(f"  token:      {token}   (set CANOPY_ADMIN_TOKEN to choose it)")
    lines.append(
        "  CLI:        .venv/bin/canopy sessions   (finds this stack by itself: docs/cli.md)"
    )
    if management_url and amqp_url:
        # The broker's user and its password of this start (no guest: devstack.infra).
        broker = urlsplit(amqp_url)
        lines.append(f"  RabbitMQ:   {management_url} ({broker.username} / {broker.password})")
    if prometheus_url:
        lines.append(
            f"  Prometheus: {prometheus_url}/alerts  (dashboard for your Grafana: "
            "deploy/monitoring/grafana/canopy.json, docs/monitoring.md)"
        )
    lines += [
        f"  logs:       {run_dir / 'logs'}/",
        f"  processes:  {run_dir / STATE_FILE} (PIDs); a process that exits is restarted "
        f"(logs/{LOG_FILE})",
        "",
        f"Started in {timings['total']:.1f} s (RabbitMQ + MongoDB {timings['infra']:.1f} s, "
        f"services {timings['services']:.1f} s"
        + (f", demo sessions {timings['session']:.1f} s)." if sessions else ")."),
        "Press Ctrl-C to stop.",
    ]
    print("\n".join(lines), flush=True)


def _who(participant: dict[str, Any], session: dict[str, Any], bots: bool) -> str:
    """With --bots: the first participant of each session is the newcomer's, the rest bots'
    (`python -m services.bots --all-but 1` leaves the first open slot)."""
    if not bots:
        return ""
    order = [g["group"] for g in session["groups"]]
    first = min(session["participants"], key=lambda p: (order.index(p["group"]), p["id_in_group"]))
    return "   <- open this one" if participant is first else "   (bot)"


def describe(
    infra_handle: InfraHandle, stack: StackHandle, prometheus: PrometheusHandle | None = None
) -> dict[str, Any]:
    """What the state file says besides the processes: where everything is reached."""
    urls, infra = stack.urls, infra_handle.infra
    monitoring = {"prometheus": prometheus.url} if prometheus is not None else {}
    return {
        "urls": {
            "gateway": urls.gateway_url,
            "store": urls.store_url,
            "decisions": urls.decisions_url,
            "timers": urls.timers_url,
            **monitoring,
        },
        "admin_token": urls.admin_token,
        "amqp_url": infra.amqp_url,
        "mongo_url": infra.mongo_url,
        "mongo_storage": infra_handle.mongo_storage,
        "rabbit_node": infra.rabbit_node,
        "epmd_port": infra_handle.epmd_port,
        "logs": str(infra_handle.logs_dir),
    }


def monitoring_ports(infra_handle: InfraHandle, stack: StackHandle) -> dict[str, int]:
    """Where Prometheus scrapes, by job: the four services and the broker's plugin."""
    if infra_handle.prometheus_port is None:
        raise InfraError("the broker was started without rabbitmq_prometheus")
    return {**stack.ports, "rabbitmq": infra_handle.prometheus_port}


def run(
    run_dir: Path,
    *,
    demo: bool = True,
    mongo_storage: MongoStorage = "file",
    monitoring: bool = False,
    bots: bool = False,
) -> int:
    run_dir = run_dir.resolve()
    for sig in STOP_SIGNALS:
        signal.signal(sig, _on_stop_signal)
    t0 = time.monotonic()
    supervisor: Supervisor | None = None
    try:
        print(f"Starting RabbitMQ and MongoDB (nx-27017) in {run_dir} ...", flush=True)
        # The management UI makes a clean RabbitMQ stop 5 s slower; DEVSTACK_RABBITMQ_MANAGEMENT=0
        # turns it off.
        management = os.environ.get("DEVSTACK_RABBITMQ_MANAGEMENT", "1") != "0"
        with start_infra(
            run_dir,
            persistent=True,
            management=management,
            mongo_storage=mongo_storage,
            prometheus=monitoring,
        ) as infra_handle:
            t1 = time.monotonic()
            print("Starting store, gateway, decisions, timers ...", flush=True)
            with start_stack(infra_handle.infra, run_dir) as stack, contextlib.ExitStack() as extra:
                prometheus = None
                if monitoring:
                    print("Starting Prometheus ...", flush=True)
                    ports = monitoring_ports(infra_handle, stack)
                    prometheus = extra.enter_context(start_prometheus(run_dir, ports))
                t2 = time.monotonic()
                sessions = create_demo_sessions(stack.urls) if demo else []
                t3 = time.monotonic()
                timings = {"infra": t1 - t0, "services": t2 - t1, "session": t3 - t2}
                timings["total"] = t3 - t0
                management_url = infra_handle.infra.management_url
                prometheus_url = prometheus.url if prometheus is not None else None
                print_banner(
                    stack.urls,
                    sessions,
                    management_url,
                    timings,
                    run_dir,
                    prometheus_url,
                    bots,
                    infra_handle.infra.amqp_url,
                )
                if bots and sessions:
                    bots_process = start_bots_process(stack, [s["session"] for s in sessions])
                    extra.callback(stop_process, bots_process, grace=STOP_GRACE)
                supervised = children(infra_handle, stack)
                if prometheus is not None:
                    supervised.append(
                        adopt(
                            Child(
                                "prometheus",
                                prometheus.proc,
                                prometheus.start_process,
                                prometheus.probe,
                            )
                        )
                    )
                supervisor = Supervisor(
                    supervised,
                    run_dir,
                    describe=lambda: describe(infra_handle, stack, prometheus),
                )
                signame = supervisor.run()
                print(f"\n{signame}: stopping the services ...", flush=True)
                t_stop = time.monotonic()
            print("Stopping RabbitMQ and MongoDB ...", flush=True)
        print(f"Stopped in {time.monotonic() - t_stop:.1f} s.", flush=True)
        return 0
    except Stop as e:
        print(f"\n{e}: stopped what had started.", flush=True)
        return 130
    except (InfraError, StackError, httpx.HTTPError) as e:
        print(f"\nmake run failed: {e}", file=sys.stderr, flush=True)
        return 1
    finally:
        if supervisor is not None:
            supervisor.remove_state()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m devstack", description=__doc__)
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    commands = parser.add_subparsers(dest="command", required=True)
    run_parser = commands.add_parser(
        "run", help="start everything and stay in the foreground, supervising (make run)"
    )
    run_parser.add_argument(
        "--run-dir",
        type=Path,
        default=RUN_DIR,
        help="folder of the RabbitMQ node, the database, the logs and the state file; kept "
        "between runs (default: %(default)s)",
    )
    run_parser.add_argument("--no-demo", action="store_true", help="do not create the demo session")
    storage = run_parser.add_mutually_exclusive_group()
    storage.add_argument(
        "--mongo-file",
        dest="mongo_storage",
        action="store_const",
        const="file",
        help="nx-27017 keeps its data in SQLite files in <run-dir>/mongo/, also across its "
        "restarts (the default)",
    )
    storage.add_argument(
        "--mongo-memory",
        dest="mongo_storage",
        action="store_const",
        const="memory",
        help="nx-27017 keeps its data in memory: gone when it stops or is restarted",
    )
    run_parser.add_argument(
        "--monitoring",
        action="store_true",
        help="also start Prometheus (deploy/monitoring/prometheus.yml with this stack's ports, "
        "the alert rules) and RabbitMQ's metrics; its UI link is printed (make run MONITORING=1)",
    )
    run_parser.add_argument(
        "--bots",
        action="store_true",
        help="bots in every slot of each demo session but the first, whose link the banner "
        "marks: one tab plays against them (make run BOTS=1; logs/bots.log, docs/cli.md)",
    )
    run_parser.set_defaults(mongo_storage="file")
    args = parser.parse_args(argv)
    return run(
        args.run_dir,
        demo=not args.no_demo,
        mongo_storage=args.mongo_storage,
        monitoring=args.monitoring,
        bots=args.bots,
    )


if __name__ == "__main__":
    sys.exit(main())
