"""`python -m bench micro`: the single-hop costs that a decision's latency is made of.

- broker round trip: publish with confirms to a durable queue (quorum, and classic for
  comparison) on one connection, consume on another, one message in flight: confirm latency and
  publish → delivery latency; then throughput with 100 publishes in flight.
- store batch write: `Repository.insert_events` (services/store/repository.py) of 500 documents
  built by `services.store.domain.event_document`, 50 batches, on nx-27017 in memory and on
  SQLite files (what `make run` and `--store disk` use).
- decisions handler: `GroupState.on_frame` for a group of 4 (pure), µs per call; and
  `Envelope.encode` / `Envelope.decode` (services/common/messages.py), µs per call.
- double auction: orders through a group of 8 traders' state machine (matching, book,
  trade payoffs), µs per order.
- group rebuild: a group of 4 with 10,000 logged events on SQLite files, read back as the
  store's `/internal/groups/{id}/log` serves it and folded by `group.rebuild` (what a
  decisions worker does before a group's first input after a restart), ms per rebuild.

It starts its own RabbitMQ and nx-27017 (no services needed) and stops them at the end.
"""

from __future__ import annotations

import asyncio
import math
import secrets
import time
from collections.abc import Callable
from typing import Any

import aio_pika

from bench.loadgen import percentiles
from bench.procstats import cpu_seconds
from bench.report import machine_info, now_iso, repo_commit
from services.common import experiments
from services.common.directory import GroupConfig
from services.common.group import GroupState
from services.common.messages import Envelope, MessageType, outbound_record
from services.store import domain as store_domain
from services.store.repository import Repository

BODY_BYTES = 400  # about the size of a FrameAccepted envelope


def _timing(values: list[float], unit_scale: float, unit: str) -> dict[str, Any]:
    stats = percentiles(values, scale=unit_scale)
    total = sum(values)
    return {
        "unit": unit,
        "n": stats["count"],
        "p50": stats["p50"],
        "p99": stats["p99"],
        "max": stats["max"],
        "mean": stats["mean"],
        "per_s": round(len(values) / total, 1) if total else None,
    }


def _per_call(fn: Callable[[int], object], n: int) -> dict[str, Any]:
    """Mean cost of `fn(i)` over n calls, timed in blocks of 1,000 for p50 / p99."""
    block = min(1000, n)
    blocks: list[float] = []
    for start in range(0, n, block):
        t0 = time.perf_counter()
        for i in range(start, min(n, start + block)):
            fn(i)
        blocks.append((time.perf_counter() - t0) / (min(n, start + block) - start))
    result = _timing(blocks, 1e6, "µs/call")
    result["n"] = n
    result["mean"] = round(sum(blocks) / len(blocks) * 1e6, 3)
    result["per_s"] = round(1e6 / result["mean"], 1)
    return result


# -- pure ---------------------------------------------------------------------------------------


def running_group(size: int = 4, experiment: str = "decisions") -> tuple[GroupState, list[str]]:
    """A group of `size` members of `experiment`, all connected, its period running."""
    members = [secrets.token_hex(10) for _ in range(size)]
    config = GroupConfig(
        session="micro",
        group="micro-group",
        experiment=experiment,
        members=members,
        num_periods=1,
        period_length=3600,
        num_subperiods=0,
        rate_limit=0,
        params={},
    )
    state = GroupState(config, experiments.get(experiment))
    for index, code in enumerate(members):
        state.on_presence(code, f"connection-{index}", True)
    state.on_timer("period_start", 1, 0, time.time() + 3600, now=time.time())
    if state.state != "running":
        raise RuntimeError(f"micro group did not start: {state.state}")
    return state, members


def auction_benchmark(n: int) -> dict[str, dict[str, Any]]:
    """Orders through one group of 8 traders' state machine (the double auction's matching,
    book and trade payoffs; decisions' share of an order's cost): random limit orders around
    a price of 50 (bids a little higher than asks), most of which trade; the book still grows
    to about a thousand resting orders over 20,000."""
    import random

    state, members = running_group(8, "double_auction")
    rng = random.Random(7)
    orders = []
    for i in range(n):
        code = members[i % 8]
        side = "bid" if i % 2 == 0 else "ask"  # members 1, 3, … (odd ids) buy
        price = round(rng.gauss(50 + (1 if side == "bid" else -1), 3), 1)
        orders.append((code, i // 8 + 1, {"side": side, "price": max(price, 1.0), "quantity": 1}))

    def on_order(i: int) -> object:
        code, seq, payload = orders[i]
        return state.on_frame(code, seq, "orders", payload, float(i))

    result = _per_call(on_order, n)
    result["book_at_end"] = len(state.market["bids"]) + len(state.market["asks"])
    return {"double auction order (group of 8; matching + book + payoffs)": result}


def pure_benchmarks(n: int) -> dict[str, dict[str, Any]]:
    state, members = running_group()
    size = len(members)
    now = time.time()

    def on_frame(i: int) -> object:
        return state.on_frame(members[i % size], i // size + 1, "decisions", i, now)

    frame = Envelope(
        type=MessageType.FRAME_ACCEPTED,
        session="micro",
        group="micro-group",
        participant=members[0],
        seq=1,
        channel="decisions",
        payload=12.5,
    )
    broadcast = Envelope(
        type=MessageType.BROADCAST,
        session="micro",
        group="micro-group",
        channel="group_decisions",
        payload={code: i for i, code in enumerate(members)},
    )
    encoded = broadcast.encode()
    return {
        "GroupState.on_frame (group of 4)": _per_call(on_frame, n),
        "Envelope.encode (FrameAccepted)": _per_call(lambda i: frame.encode(), n // 5),
        "Envelope.decode (group_decisions)": _per_call(lambda i: Envelope.decode(encoded), n // 5),
    }


# -- broker -------------------------------------------------------------------------------------


async def broker_round_trip(
    amqp_url: str, queue_type: str, n: int, rabbit_pid: int
) -> dict[str, dict[str, Any]]:
    publisher = await aio_pika.connect(amqp_url)
    consumer = await aio_pika.connect(amqp_url)
    name = f"bench.micro.{queue_type}.{secrets.token_hex(4)}"
    try:
        pub = await publisher.channel(publisher_confirms=True)
        queue = await pub.declare_queue(name, durable=True, arguments={"x-queue-type": queue_type})
        sub = await consumer.channel()
        await sub.set_qos(prefetch_count=200)
        sub_queue = await sub.declare_queue(name, passive=True)
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[float] = loop.create_future()
        received = 0
        expected = math.inf

        async def on_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            nonlocal received, waiter
            at = time.perf_counter()
            await message.ack()
            received += 1
            if not waiter.done() and (expected == math.inf or received >= expected):
                waiter.set_result(at)

        consumer_tag = await sub_queue.consume(on_message)
        body = b"x" * BODY_BYTES
        exchange = pub.default_exchange

        def message() -> aio_pika.Message:
            return aio_pika.Message(body, delivery_mode=aio_pika.DeliveryMode.PERSISTENT)

        confirms: list[float] = []
        trips: list[float] = []
        # One message in flight, as a decision's hops are at low load: nothing shares the
        # per-message cost (the CPU of both ends and of the broker, per message).
        one_cpu0, one_broker0 = time.process_time(), cpu_seconds(rabbit_pid) or 0.0
        for _ in range(n):
            waiter = loop.create_future()
            t0 = time.perf_counter()
            await exchange.publish(message(), routing_key=name)
            confirms.append(time.perf_counter() - t0)
            trips.append(await asyncio.wait_for(waiter, 10) - t0)
        one_client_cpu = time.process_time() - one_cpu0
        one_broker_cpu = (cpu_seconds(rabbit_pid) or 0.0) - one_broker0

        # Throughput: 100 publishes in flight, until everything was delivered.
        received, expected = 0, n
        waiter = loop.create_future()
        limit = asyncio.Semaphore(100)

        async def publish_one() -> None:
            async with limit:
                await exchange.publish(message(), routing_key=name)

        cpu0, broker0 = time.process_time(), cpu_seconds(rabbit_pid) or 0.0
        t0 = time.perf_counter()
        await asyncio.gather(*(publish_one() for _ in range(n)))
        done = await asyncio.wait_for(waiter, 60)
        client_cpu = time.process_time() - cpu0
        broker_cpu = (cpu_seconds(rabbit_pid) or 0.0) - broker0
        await sub_queue.cancel(consumer_tag)
        await queue.delete(if_unused=False, if_empty=False)
    finally:
        await publisher.close()
        await consumer.close()
    pipelined = {
        "unit": "msgs",
        "n": n,
        "p50": None,
        "p99": None,
        "mean": None,
        "per_s": round(n / (done - t0), 1),
    }

    def cpu_row(seconds: float) -> dict[str, Any]:
        mean = round(seconds / n * 1e6, 1)
        return {"unit": "CPU µs/msg", "n": n, "p50": None, "p99": None, "mean": mean}

    return {
        f"broker publish→confirm ({queue_type})": _timing(confirms, 1e3, "ms"),
        f"broker publish→delivered ({queue_type})": _timing(trips, 1e3, "ms"),
        f"broker 100 in flight ({queue_type})": pipelined,
        # Publish with confirm + consume + ack of one message, both ends in this process.
        f"  aio-pika CPU, publish+consume, 1 in flight ({queue_type})": cpu_row(one_client_cpu),
        f"  RabbitMQ CPU per message, 1 in flight ({queue_type})": cpu_row(one_broker_cpu),
        f"  aio-pika CPU, publish+consume, 100 in flight ({queue_type})": cpu_row(client_cpu),
        f"  RabbitMQ CPU per message, 100 in flight ({queue_type})": cpu_row(broker_cpu),
    }


# -- store --------------------------------------------------------------------------------------


def log_document(envelope: Envelope) -> dict[str, Any]:
    """The store's document of an accepted frame, by `services.store.domain.event_document`,
    which takes the envelope itself or (since the log batches) its `inbound_record`."""
    from services.common import messages

    to_record: Any = getattr(messages, "inbound_record", None)
    event_document: Any = store_domain.event_document
    document = event_document(to_record(envelope) if to_record else envelope)
    if document is None:
        raise RuntimeError("event_document logged nothing for an accepted frame")
    result: dict[str, Any] = document
    return result


async def store_batches(
    mongo_url: str, label: str, batches: int, batch_size: int
) -> dict[str, dict[str, Any]]:
    repository = Repository(mongo_url, f"bench_micro_{secrets.token_hex(4)}")
    try:
        await repository.setup()
        times: list[float] = []
        for b in range(batches):
            documents = []
            for i in range(batch_size):
                seq = b * batch_size + i + 1
                envelope = Envelope(
                    type=MessageType.FRAME_ACCEPTED,
                    session="micro",
                    group=f"group-{i % 250}",
                    participant=f"participant-{i % 1000}",
                    seq=seq,
                    channel="decisions",
                    payload=seq,
                )
                documents.append(log_document(envelope))
            t0 = time.perf_counter()
            inserted = await repository.insert_events(documents)
            times.append(time.perf_counter() - t0)
            if inserted != batch_size:
                raise RuntimeError(f"inserted {inserted} of {batch_size}")
    finally:
        await repository.close()
    per_batch = _timing(times, 1e3, "ms/batch")
    per_batch["per_s"] = round(batches * batch_size / sum(times), 1)  # documents per second
    per_batch["unit"] = "ms/batch; docs/s"
    return {f"store insert_events {batch_size} docs ({label})": per_batch}


async def rebuild_benchmark(mongo_url: str, events: int, repeats: int) -> dict[str, Any]:
    """Read back and fold one group's log of `events` rows, as a restarted worker does."""
    import orjson

    from services.common.group import rebuild
    from services.store.recovery import _log_chunks

    state, codes = running_group()
    config, experiment = state.config, state.experiment
    repository = Repository(mongo_url, f"bench_rebuild_{secrets.token_hex(4)}")
    try:
        await repository.setup()
        documents, t = [], 1_000.0
        # The rows that brought the group to running: each member connected, period_start.
        prelude = [("presence", {"participant": c, "connected": True}) for c in codes]
        prelude.append(("period_start", {"period": 1, "length": 3600.0, "ends_at": 4600.0}))
        for channel, payload in prelude:
            out = Envelope(
                type=MessageType.BROADCAST,
                session=config.session,
                group=config.group,
                channel=channel,
                payload=payload,
                ts=state.stamp(t),
            )
            documents.append(store_domain.event_document(outbound_record(out)))
        for i in range((events - len(prelude)) // 2):
            code = codes[i % len(codes)]
            frame = Envelope(
                type=MessageType.FRAME_ACCEPTED,
                session=config.session,
                group=config.group,
                participant=code,
                seq=i // len(codes) + 1,
                channel="decisions",
                payload=round(i / events, 6),
            )
            t = state.stamp(t + 0.05)
            documents.append({**log_document(frame), "ts": t})
            state.on_frame(code, frame.seq or 0, "decisions", frame.payload, t)
            out = Envelope(
                type=MessageType.BROADCAST,
                session=config.session,
                group=config.group,
                channel="group_decisions",
                payload=dict(state.decisions),
                ts=state.stamp(t),
            )
            documents.append(store_domain.event_document(outbound_record(out)))
        for start in range(0, len(documents), 2000):
            await repository.insert_events(documents[start : start + 2000])
        times, read_times = [], []
        for _ in range(repeats):
            t0 = time.perf_counter()
            body = b"".join([c async for c in _log_chunks(repository.group_events(config.group))])
            rows = orjson.loads(body)
            t1 = time.perf_counter()
            rebuilt = rebuild(config, experiment, rows)
            times.append(time.perf_counter() - t0)
            read_times.append(t1 - t0)
            if rebuilt.decisions != state.decisions or len(rows) != len(documents):
                raise RuntimeError("the rebuilt group differs from the live one")
    finally:
        await repository.close()
    result = _timing(times, 1e3, f"ms per rebuild of {len(documents)} events")
    result["read_p50_ms"] = _timing(read_times, 1e3, "ms")["p50"]
    return {f"group rebuild {len(documents)} events (SQLite files)": result}


async def _io_benchmarks(
    amqp_url: str, memory_url: str, disk_url: str, scale: float, rabbit_pid: int
) -> dict[str, dict[str, Any]]:
    n = max(100, int(2000 * scale))
    batches = max(5, int(50 * scale))
    results: dict[str, dict[str, Any]] = {}
    for queue_type in ("quorum", "classic"):
        results |= await broker_round_trip(amqp_url, queue_type, n, rabbit_pid)
    results |= await store_batches(memory_url, "memory", batches, 500)
    results |= await store_batches(disk_url, "SQLite files", batches, 500)
    results |= await rebuild_benchmark(disk_url, 10_000, max(3, int(10 * scale)))
    return results


def run_micro(*, quick: bool = False) -> dict[str, Any]:
    """Run every micro-benchmark; returns the JSON line's content."""
    import uvloop

    from bench.ownstack import RUN_DIR, disk_mongo, rabbit_pid
    from devstack.infra import start_infra

    scale = 0.1 if quick else 1.0
    results = pure_benchmarks(max(1000, int(100_000 * scale)))
    results |= auction_benchmark(max(1000, int(20_000 * scale)))
    with start_infra(RUN_DIR, persistent=False) as handle, disk_mongo(handle.infra) as (disk, _):
        infra = handle.infra
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            io = _io_benchmarks(
                infra.amqp_url, infra.mongo_url, disk, scale, rabbit_pid(handle.run_dir)
            )
            results |= runner.run(io)
    return {
        "kind": "micro",
        "timestamp": now_iso(),
        "commit": repo_commit(),
        "machine": machine_info(),
        "params": {"quick": quick},
        "results": results,
    }
