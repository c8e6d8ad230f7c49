"""`python -m devstack run` (what `make run` calls): the whole system on this machine.

Owns the foreground life of a development stack: start the persistent infrastructure in
`<project>/.run/`, the four services, a demo session; print the links; stay in the foreground
until SIGINT / SIGTERM / SIGHUP (or until a process it started dies); then stop the services,
then the infrastructure — also when anything fails on the way.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from collections.abc import Callable
from types import FrameType
from typing import Any

import httpx

from devstack.infra import InfraError, start_infra
from devstack.stack import PROJECT_ROOT, StackError, StackHandle, StackUrls, start_stack

RUN_DIR = PROJECT_ROOT / ".run"
DEMO_SESSION: dict[str, Any] = {
    "experiment": "decisions",
    "num_participants": 4,
    "group_size": 2,
    "num_periods": 1,
    "period_length": 120,
    "num_subperiods": 0,
    "rate_limit": 0.0,
    "params": {},
    "label": "demo",
}
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class Stop(BaseException):
    """Raised from a signal handler: unwinds through the `with` blocks that stop things."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)


def _on_stop_signal(signum: int, frame: FrameType | None) -> None:
    # Stop once: a second Ctrl-C must not interrupt the clean shutdown halfway.
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    raise Stop(signum)


def create_demo_session(urls: StackUrls) -> dict[str, Any]:
    response = httpx.post(
        f"{urls.store_url}/api/sessions",
        json=DEMO_SESSION,
        headers={"Authorization": f"Bearer {urls.admin_token}"},
        timeout=30,
    )
    if response.status_code != 201:
        raise StackError(
            f"creating the demo session failed: POST /api/sessions -> "
            f"{response.status_code} {response.text[:1000]}"
        )
    session: dict[str, Any] = response.json()
    return session


def print_banner(
    urls: StackUrls,
    session: dict[str, Any],
    management_url: str | None,
    timings: dict[str, float],
) -> None:
    session_id = session["session"]
    by_group: dict[Any, list[dict[str, Any]]] = {}
    for participant in session["participants"]:
        by_group.setdefault(participant["group"], []).append(participant)
    token = urls.admin_token
    lines = ["", f"Canopy is running. Demo session {session_id} ({DEMO_SESSION['label']}):"]
    for group, members in by_group.items():
        lines.append(f"  group {group}:")
        for p in sorted(members, key=lambda p: p["id_in_group"]):
            lines.append(f"    participant {p['id_in_group']}: {p['url']}")
    lines += [
        "",
        "Researchers:",
        f"  monitor:    {urls.store_url}/?token={token}",
        f"  events CSV: curl -H 'Authorization: Bearer {token}' "
        f"'{urls.store_url}/api/sessions/{session_id}/events?format=csv'",
        f"  token:      {token}   (set CANOPY_ADMIN_TOKEN to choose it)",
    ]
    if management_url:
        lines.append(f"  RabbitMQ:   {management_url} (guest / guest)")
    lines += [
        f"  logs:       {RUN_DIR / 'logs'}/",
        "",
        f"Started in {timings['total']:.1f} s (RabbitMQ + MongoDB {timings['infra']:.1f} s, "
        f"services {timings['services']:.1f} s, demo session {timings['session']:.1f} s).",
        "Press Ctrl-C to stop.",
    ]
    print("\n".join(lines), flush=True)


def supervise(stack: StackHandle, infra_exited: Callable[[], list[str]]) -> str:
    """Wait for a stop signal and return its name. Also wake when a child process exits
    (SIGCHLD): a dead service or broker leaves a stack that only looks alive, so raise.

    The signals are blocked and taken with sigwaitinfo, so one that arrives between the
    check and the wait stays pending instead of being missed."""
    signal.signal(signal.SIGCHLD, lambda signum, frame: None)
    watched = {signal.SIGCHLD, *STOP_SIGNALS}
    signal.pthread_sigmask(signal.SIG_BLOCK, watched)
    try:
        while True:
            dead_services, dead_servers = stack.exited(), infra_exited()
            if dead_services or dead_servers:
                names = ", ".join(dead_services + dead_servers)
                tails = "".join(f"\n--- {s} ---\n{stack.log_tail(s)}" for s in dead_services)
                raise StackError(f"stopped on its own: {names} (logs: {RUN_DIR / 'logs'}){tails}")
            info = signal.sigwaitinfo(watched)
            if info.si_signo != signal.SIGCHLD:
                return signal.Signals(info.si_signo).name
    finally:
        # Stopping takes a few seconds; a second Ctrl-C must not cut it short. Ignore first,
        # then unblock (children started later must not inherit a blocked SIGTERM).
        for sig in STOP_SIGNALS:
            signal.signal(sig, signal.SIG_IGN)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, watched)


def run() -> int:
    for sig in STOP_SIGNALS:
        signal.signal(sig, _on_stop_signal)
    t0 = time.monotonic()
    try:
        print(f"Starting RabbitMQ and MongoDB (nx-27017) in {RUN_DIR} ...", flush=True)
        # The management UI makes a clean RabbitMQ stop 5 s slower; DEVSTACK_RABBITMQ_MANAGEMENT=0
        # turns it off.
        management = os.environ.get("DEVSTACK_RABBITMQ_MANAGEMENT", "1") != "0"
        with start_infra(RUN_DIR, persistent=True, management=management) as infra_handle:
            t1 = time.monotonic()
            print("Starting store, gateway, decisions, timers ...", flush=True)
            with start_stack(infra_handle.infra, RUN_DIR) as stack:
                t2 = time.monotonic()
                session = create_demo_session(stack.urls)
                t3 = time.monotonic()
                timings = {"infra": t1 - t0, "services": t2 - t1, "session": t3 - t2}
                timings["total"] = t3 - t0
                print_banner(stack.urls, session, infra_handle.infra.management_url, timings)
                signame = supervise(stack, infra_handle.exited)
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m devstack", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("run", help="start everything and stay in the foreground (make run)")
    parser.parse_args(argv)
    return run()


if __name__ == "__main__":
    sys.exit(main())
