"""`python -m bench`: Canopy's load generator, the target matrix, and the micro-benchmarks.

    python -m bench [run] --groups G --size P --rate R --duration D [--warmup S] [--jitter J]
                    [--queue-type quorum|classic] [--store disk|memory] [--no-floor]
                    [--no-broker-stats]
                    [--url GATEWAY --store-url URL --token T [--amqp-url URL]]
    python -m bench --matrix [--duration D] [...]
    python -m bench micro
    python -m bench --auction [--duration D]   (bench/auction.py: one market of 8 traders)
    python -m bench --group-sizes [--duration D] [--sizes 2,50,500] [--participants 500]
                    [--total-rate 10] [--idle 5] [--experiment bimatrix|decisions]
                    (bench/groupsize.py: CPU per input in groups of 2, 50, 500)
    python -m bench --launch [--people 1000] [--seats 800] [--group-size 4] [--within 10]
                    [--arrivals even|poisson] [--seed 19] [--period 5]
                    [--grouping arrival|fixed] [--lobby-timeout 300]
                    (bench/launch.py: the study link opened by 1,000 people in 10 s; groups
                    formed in the arrival lobby by default, as a Prolific study has them)

After each row, the same load runs against the one-process floor (bench/floor.py) and the row
shows Canopy's p50 / p99 and CPU per decision as multiples of the floor's (`--no-floor`: not).
Without `--url` it starts its own stack (RabbitMQ, nx-27017, the four services: the same code
as `make run`) on free loopback ports, and stops it at the end, also on Ctrl-C. Each run prints
a table and appends one JSON line to `bench/results/<UTC date>.jsonl`. See docs/performance.md.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import os
import signal
import sys
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from types import FrameType
from typing import Any, TypeVar
from urllib.parse import urlsplit

import uvloop

from bench.floor import SERVER_DESCRIPTION as FLOOR_SERVER
from bench.floor import floor_process
from bench.groupsize import DURATION as GROUP_DURATION
from bench.groupsize import EXPERIMENT as GROUP_EXPERIMENT
from bench.groupsize import GROUP_SIZES
from bench.groupsize import IDLE as GROUP_IDLE
from bench.groupsize import PARTICIPANTS as GROUP_PARTICIPANTS
from bench.groupsize import TOTAL_RATE as GROUP_TOTAL_RATE
from bench.launch import ARRIVALS, GROUPINGS, LaunchParams, format_launch, run_launch
from bench.loadgen import (
    DECISION_SCALE,
    LoadParams,
    QueueProbe,
    StackTarget,
    period_length,
    run_load,
)
from bench.procstats import ProcessSet
from bench.report import (
    RESULTS_DIR,
    ProgressBar,
    append_result,
    attach_floor,
    format_matrix,
    format_micro,
    format_run,
    format_versus_floor,
)

T = TypeVar("T")

# The targets: (groups, group size, rate Hz, p99 target ms); loss must be 0.
MATRIX: tuple[tuple[int, int, float, float], ...] = (
    (5, 4, 2.0, 10.0),
    (25, 4, 2.0, 15.0),
    (100, 4, 2.0, 20.0),
    (250, 4, 2.0, 25.0),
    (50, 4, 10.0, 25.0),
)
RUN_DURATION = 15.0
RUN_IDLE = 5.0  # s without sends before a run's load: the idle stack's CPU
MATRIX_DURATION = 20.0
# A p99 needs enough samples to mean anything: a matrix row runs at least long enough for this
# many measured decisions (20 participants at 2 Hz: 50 s instead of 20 s, p99 = 20th-worst).
MATRIX_MIN_SAMPLES = 2000
SETTLE_TIMEOUT = 30.0  # between matrix rows: wait (bounded) for the store queue to empty


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="Canopy load generator (see docs/performance.md).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__,
    )
    parser.add_argument("command", nargs="?", choices=("run", "micro"), default="run")
    parser.add_argument("--matrix", action="store_true", help="run the issue's target table")
    parser.add_argument(
        "--auction",
        action="store_true",
        help="the auction row: 8 traders x 10 orders/s, up to 20 resting each (--duration, 60)",
    )
    parser.add_argument(
        "--group-sizes",
        action="store_true",
        help="the group-size rows: same participants and total rate in groups of --sizes "
        "(bench/groupsize.py; --duration, 30 a row)",
    )
    parser.add_argument(
        "--launch",
        action="store_true",
        help="the study-link launch row: --people open the study link within --within s "
        "(bench/launch.py)",
    )
    launch = parser.add_argument_group("study-link launch (--launch)")
    launch.add_argument("--people", type=int, default=LaunchParams.people, help="people (1000)")
    launch.add_argument(
        "--seats", type=int, default=LaunchParams.seats, help="seats of the session (800)"
    )
    launch.add_argument(
        "--group-size", type=int, default=LaunchParams.group_size, help="seats per group (4)"
    )
    launch.add_argument(
        "--within",
        type=float,
        default=LaunchParams.within,
        help="seconds over which the people arrive (10)",
    )
    launch.add_argument(
        "--arrivals",
        choices=ARRIVALS,
        default=LaunchParams.arrivals,
        help="evenly spread (default) or a seeded Poisson process",
    )
    launch.add_argument("--seed", type=int, default=LaunchParams.seed, help="for ids, arrivals")
    launch.add_argument(
        "--period", type=float, default=LaunchParams.period, help="the one period's seconds (5)"
    )
    launch.add_argument(
        "--grouping",
        choices=GROUPINGS,
        default=LaunchParams.grouping,
        help="groups formed in the lobby as people arrive (default: a Prolific study's), or "
        "fixed at creation",
    )
    launch.add_argument(
        "--lobby-timeout",
        type=float,
        default=LaunchParams.lobby_timeout,
        help="arrival: the session's lobby_timeout, s (300: nobody released in the burst)",
    )
    sizes = parser.add_argument_group("group sizes (--group-sizes)")
    sizes.add_argument(
        "--sizes",
        type=_sizes,
        default=GROUP_SIZES,
        help=f"group sizes, comma-separated ({','.join(map(str, GROUP_SIZES))})",
    )
    sizes.add_argument(
        "--participants",
        type=int,
        default=GROUP_PARTICIPANTS,
        help=f"participants per row ({GROUP_PARTICIPANTS})",
    )
    sizes.add_argument(
        "--total-rate",
        type=float,
        default=GROUP_TOTAL_RATE,
        help=f"decisions/s of the whole session in every row ({GROUP_TOTAL_RATE:g})",
    )
    sizes.add_argument(
        "--idle",
        type=float,
        default=None,
        help="seconds without sends before the load, for the idle stack's CPU "
        f"(a run: {RUN_IDLE:g}; each group-size row: {GROUP_IDLE:g}; a matrix row: 0)",
    )
    load = parser.add_argument_group("load")
    load.add_argument("--groups", "-G", type=int, default=5, help="groups (default 5)")
    load.add_argument("--size", "-P", type=int, default=4, help="participants per group (4)")
    load.add_argument("--rate", "-R", type=float, default=2.0, help="decisions/s each (2)")
    load.add_argument(
        "--duration",
        "-D",
        type=float,
        default=None,
        help=f"measured seconds (default {RUN_DURATION:g}; {MATRIX_DURATION:g} per matrix row)",
    )
    load.add_argument("--warmup", type=float, default=2.0, help="seconds not measured (2)")
    load.add_argument(
        "--experiment",
        choices=tuple(DECISION_SCALE),
        default=None,
        help=f"decisions (default) or bimatrix ({GROUP_EXPERIMENT} with --group-sizes)",
    )
    load.add_argument("--jitter", type=float, default=0.5, help="send interval ±fraction (0.5)")
    load.add_argument("--drain", type=float, default=5.0, help="max s to wait for stragglers")
    own = parser.add_argument_group("own stack (when --url is not given)")
    own.add_argument("--queue-type", choices=("quorum", "classic"), default="quorum")
    own.add_argument(
        "--store",
        choices=("disk", "memory"),
        default="disk",
        help="nx-27017 on SQLite files like `make run` (disk, default) or in memory",
    )
    own.add_argument(
        "--run-dir",
        type=Path,
        default=None,
        help="folder for the stack's data (default .run/); /dev/shm/<name> puts it on tmpfs",
    )
    ext = parser.add_argument_group("a running stack")
    ext.add_argument("--url", help="gateway URL, e.g. http://127.0.0.1:8000")
    ext.add_argument("--store-url", help="store URL, e.g. http://127.0.0.1:8001")
    ext.add_argument("--token", help="admin token")
    ext.add_argument("--amqp-url", help="broker URL, to report queue depths (optional)")
    ext.add_argument(
        "--broker-metrics-url",
        help="RabbitMQ's rabbitmq_prometheus page, e.g. http://127.0.0.1:15692/metrics, for "
        "broker messages per decision (optional)",
    )
    ext.add_argument("--shards", type=int, default=8, help="CANOPY_SHARDS of that stack (8)")
    parser.add_argument(
        "--no-floor",
        action="store_true",
        help="skip the one-process floor run after each row (bench/floor.py)",
    )
    own.add_argument(
        "--no-broker-stats",
        action="store_true",
        help="do not enable rabbitmq_prometheus (no broker messages per decision)",
    )
    out = parser.add_argument_group("output")
    out.add_argument("--results", type=Path, default=RESULTS_DIR, help="JSON lines folder")
    out.add_argument("--no-save", action="store_true", help="do not append to the results")
    micro = parser.add_argument_group("micro")
    micro.add_argument("--quick", action="store_true", help="micro: 10x fewer iterations")
    args = parser.parse_args(argv)
    if args.url and not (args.store_url and args.token):
        parser.error("--url needs --store-url and --token")
    if args.command == "micro" and args.matrix:
        parser.error("micro and --matrix do not combine")
    if sum((args.matrix, args.auction, args.group_sizes, args.launch)) > 1:
        parser.error("--matrix, --auction, --group-sizes and --launch do not combine")
    if args.launch:
        try:
            launch_params(args).check()
        except ValueError as e:
            parser.error(str(e))
    return args


def launch_params(args: argparse.Namespace) -> LaunchParams:
    return LaunchParams(
        people=args.people,
        seats=args.seats,
        group_size=args.group_size,
        within=args.within,
        arrivals=args.arrivals,
        seed=args.seed,
        period=args.period,
        grouping=args.grouping,
        lobby_timeout=args.lobby_timeout,
    )


def _sizes(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not sizes like 2,50,500: {text!r}") from None


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def run_async(main: Callable[[], Coroutine[Any, Any, T]]) -> T:
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(main())


def _params(args: argparse.Namespace, groups: int, size: int, rate: float) -> LoadParams:
    duration = args.duration or (MATRIX_DURATION if args.matrix else RUN_DURATION)
    if args.matrix:
        duration = max(duration, MATRIX_MIN_SAMPLES / (groups * size * rate))
    return LoadParams(
        groups=groups,
        size=size,
        rate=rate,
        duration=duration,
        warmup=args.warmup,
        jitter=args.jitter,
        drain=args.drain,
        experiment=args.experiment or "decisions",
        idle=args.idle if args.idle is not None else (0.0 if args.matrix else RUN_IDLE),
    )


async def _settle(target: StackTarget) -> None:
    """Before the next matrix row: the store queue back to empty (bounded)."""
    if not target.amqp_url:
        return
    async with QueueProbe(target.amqp_url, 0) as probe:
        deadline = time.monotonic() + SETTLE_TIMEOUT
        while time.monotonic() < deadline:
            store, _ = await probe.depths()
            if not store:
                return
            await asyncio.sleep(0.2)


def run_floor(params: LoadParams, prefix: str, disk_dir: Path | None) -> dict[str, Any]:
    """The same load against the one-process floor (a fresh `python -m bench.floor`).
    `disk_dir`: the Canopy stack's data folder, probed while the floor runs as well."""
    print(f"{prefix}the same load against the one-process floor ...", file=sys.stderr)
    with floor_process(params.groups, params.size, period_length(params)) as floor:
        target = StackTarget(
            gateway_url=floor.url,
            store_url=None,
            token=None,
            processes=ProcessSet({"floor": floor.pid, "loadgen": os.getpid()}),
            name="floor",
            session=floor.session,
            info={"server": FLOOR_SERVER},
            disk_dir=disk_dir,
        )
        progress = ProgressBar(prefix=f"{prefix}floor ")
        try:
            return run_async(functools.partial(run_load, target, params, progress))
        finally:
            progress.done()


def run_auction_row(args: argparse.Namespace, target: StackTarget) -> list[dict[str, Any]]:
    from bench.auction import AuctionParams, format_auction, run_auction

    params = AuctionParams(duration=args.duration or AuctionParams.duration)
    print(f"auction: {params.traders} traders for {params.duration:g} s ...", file=sys.stderr)
    result = run_async(functools.partial(run_auction, target, params))
    print(format_auction(result))
    if not args.no_save:
        print(f"(appended to {append_result(result, args.results)})")
    return [result]


def run_launch_row(args: argparse.Namespace, target: StackTarget) -> list[dict[str, Any]]:
    """The study-link launch row (bench/launch.py), then its table."""
    params = launch_params(args)
    print(
        f"launch: {params.people} people within {params.within:g} s ({params.arrivals}), "
        f"{params.seats} seats in groups of {params.group_size} ({params.grouping} grouping) ...",
        file=sys.stderr,
    )
    result = run_async(functools.partial(run_launch, target, params))
    print(format_launch(result))
    if not args.no_save:
        print(f"(appended to {append_result(result, args.results)})")
    return [result]


def run_group_size_rows(args: argparse.Namespace, target: StackTarget) -> list[dict[str, Any]]:
    """The group-size rows (bench/groupsize.py) on one stack, then their table."""
    from bench.groupsize import attach_ratios, format_group_sizes, group_size_rows, summarize

    rows = group_size_rows(args.sizes, args.participants, args.total_rate)
    results: list[dict[str, Any]] = []
    for number, row in enumerate(rows, start=1):
        params = LoadParams(
            groups=row.groups,
            size=row.size,
            rate=row.rate,
            duration=args.duration or GROUP_DURATION,
            warmup=args.warmup,
            jitter=args.jitter,
            drain=args.drain,
            experiment=args.experiment or GROUP_EXPERIMENT,
            idle=GROUP_IDLE if args.idle is None else args.idle,
        )
        prefix = f"[{number}/{len(rows)}] "
        print(
            f"{prefix}{params.experiment}: {row.groups} groups of {row.size} at {row.rate:g} Hz "
            f"({row.total_rate:g} decisions/s) for {params.duration:g} s ...",
            file=sys.stderr,
        )
        progress = ProgressBar(prefix=prefix)
        try:
            result = run_async(functools.partial(run_load, target, params, progress))
        finally:
            progress.done()
        result["kind"] = "group_size"
        result["group_size"] = summarize(result)
        results.append(result)
        print(format_run(result) + "\n")
        if number < len(rows):
            run_async(lambda: _settle(target))
    attach_ratios([r["group_size"] for r in results])
    if not args.no_save:
        for result in results:  # after the ratios, which each line carries
            path = append_result(result, args.results)
    print(format_group_sizes(results))
    if not args.no_save:
        print(f"(appended to {path})")
    return results


def run_rows(args: argparse.Namespace, target: StackTarget) -> list[dict[str, Any]]:
    if args.auction:
        return run_auction_row(args, target)
    if args.launch:
        return run_launch_row(args, target)
    if args.group_sizes:
        return run_group_size_rows(args, target)
    rows = MATRIX if args.matrix else ((args.groups, args.size, args.rate, None),)
    results: list[dict[str, Any]] = []
    for number, (groups, size, rate, goal) in enumerate(rows, start=1):
        params = _params(args, groups, size, rate)
        prefix = f"[{number}/{len(rows)}] " if args.matrix else ""
        print(
            f"{prefix}{params.participants} participants ({groups}x{size}) at {rate:g} Hz "
            f"for {params.duration:g} s ...",
            file=sys.stderr,
        )
        progress = ProgressBar(prefix=prefix)
        try:
            result = run_async(functools.partial(run_load, target, params, progress))
        finally:
            progress.done()
        if goal is not None:
            result["target_p99_ms"] = goal
            p99 = result["latency_ms"]["p99"]
            result["pass"] = bool(result["ok"] and p99 is not None and p99 <= goal)
        floor = None if args.no_floor else run_floor(params, prefix, target.disk_dir)
        if floor is not None:
            attach_floor(result, floor)
        results.append(result)
        if not args.no_save:
            if floor is not None:
                append_result(floor, args.results)
            path = append_result(result, args.results)
        print(format_run(result))
        if floor is not None:
            if not floor["ok"]:
                print("\n" + format_run(floor))
            print("\n" + format_versus_floor(result))
        if not args.no_save:
            print(f"(appended to {path})")
        print()
        if args.matrix and number < len(rows):
            run_async(lambda: _settle(target))
    if args.matrix:
        print(format_matrix(results))
    return results


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        if args.command == "micro":
            from bench.micro import run_micro

            result = run_micro(quick=args.quick)
            if not args.no_save:
                append_result(result, args.results)
            print(format_micro(result))
            return 0
        if args.url:
            from bench.procstats import discover

            port = urlsplit(args.url).port or 80
            processes, warnings = discover(port)
            for warning in warnings:
                print(f"note: {warning}", file=sys.stderr)
            target = StackTarget(
                gateway_url=args.url.rstrip("/"),
                store_url=args.store_url.rstrip("/"),
                token=args.token,
                amqp_url=args.amqp_url,
                broker_metrics_url=args.broker_metrics_url,
                processes=processes,
                shards=args.shards,
                info={"own_stack": False},
            )
            results = run_rows(args, target)
        else:
            from bench.ownstack import RUN_DIR, own_stack

            with own_stack(
                queue_type=args.queue_type,
                store=args.store,
                broker_stats=not args.no_broker_stats,
                run_dir=args.run_dir or RUN_DIR,
            ) as own:
                target = StackTarget(
                    gateway_url=own.stack.urls.gateway_url,
                    store_url=own.stack.urls.store_url,
                    token=own.stack.urls.admin_token,
                    amqp_url=own.infra.amqp_url,
                    processes=own.processes(),
                    shards=int(own.stack.env.get("CANOPY_SHARDS", "8")),
                    info={
                        "own_stack": True,
                        "queue_type": own.queue_type,
                        "store": own.store,
                        "run_dir": str(own.infra_handle.run_dir.parent),
                    },
                    broker_metrics_url=own.broker_metrics_url,
                    disk_dir=own.infra_handle.run_dir,
                )
                results = run_rows(args, target)
    except KeyboardInterrupt:
        print("\ninterrupted: the stack was stopped", file=sys.stderr)
        return 130
    # Missed timing targets are reported, not failures; lost or refused frames are (the
    # floor's too: a floor that loses frames measures nothing).
    floors_ok = all((r.get("floor") or {}).get("ok", True) for r in results)
    return 0 if floors_ok and all(r["ok"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
