"""Consumer loops: one message at a time in queue order (`consume_in_order`), or pipelined
(`consume_pipelined`: a message's outputs confirmed, and it acked, in the background); and
`running`, which ends a service's background tasks."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial
from typing import Any

from aio_pika.abc import AbstractIncomingMessage, AbstractQueue
from aio_pika.exceptions import AMQPError, ChannelInvalidStateError

from services.common.bus.batcher import all_of
from services.common.bus.wire import decode_message
from services.common.logs import context
from services.common.messages import Envelope

log = logging.getLogger(__name__)


Handler = Callable[[Envelope], Awaitable[None]]


def completed() -> asyncio.Future[None]:
    """An awaitable with nothing to wait for (a pipelined handler's 'no outputs'): a future
    already done, so that `consume_pipelined` acknowledges it without a task."""
    done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    done.set_result(None)
    return done


async def consume_in_order(
    queue: AbstractQueue,
    handler: Handler,
    *,
    on_malformed: Callable[[AbstractIncomingMessage, Exception], None] | None = None,
) -> None:
    """Run `handler` on each message of `queue`, one at a time, in queue order.

    Outcomes: the handler returns → ack; the body is not a valid envelope → reject to the
    dead-letter queue (it can never succeed); the handler raises → nack and requeue, so the
    message is retried rather than lost (the handler must be idempotent, which ours are).
    """

    async def inline(envelope: Envelope) -> Awaitable[None]:
        await handler(envelope)
        return completed()

    await consume_pipelined(queue, inline, on_malformed=on_malformed)


Pipelined = Callable[[Envelope], Awaitable[Awaitable[Any]]]


class ConsumerHalted(Exception):
    """A handler failed under `halt_on_failure`: the consumer stopped before that message."""


async def consume_pipelined(
    queue: AbstractQueue,
    handler: Pipelined,
    *,
    on_malformed: Callable[[AbstractIncomingMessage, Exception], None] | None = None,
    stop: asyncio.Event | None = None,
    halt_on_failure: bool = False,
) -> None:
    """Like `consume_in_order`, but without waiting for one message's outputs to be confirmed
    before handling the next.

    `handler` does its ordered work (state changes, starting publishes in order) and returns an
    awaitable that completes once the message's outputs are confirmed; the message is acked
    then, in the background. The broker's prefetch bounds how many are in flight.

    Setting `stop` hands the queue over: no further message is handled, the consumer is
    cancelled, and the function returns once every handled message is acknowledged (a shard
    moving to another worker, a drain). Messages delivered and not handled stay unacknowledged
    on the channel: the caller closes the channel, and the broker puts them back in the order
    they were delivered (nacking them one by one would not keep that order: a quorum queue
    redelivers returned messages in the order they came back, and aio-pika's iterator nacks
    its buffer while its consumer may still take from it). Under `halt_on_failure` a handler
    that fails stops the consumer the same way, before that message, and `ConsumerHalted` is
    raised: skipping ahead and requeueing the failed message alone would apply a group's
    later inputs before it. Cancelling the task instead abandons what is in flight (the
    broker redelivers it when the channel closes).
    """
    # Per handled message: what it waits for (a future that settles its acknowledgement, or a
    # task that awaits its outputs), with the outputs to close if it is abandoned.
    in_flight: dict[asyncio.Future[Any], list[Awaitable[Any]]] = {}
    acks = _InOrderAcks(queue.name)

    def outputs_settled(
        message: AbstractIncomingMessage, handled: _Handled, done: asyncio.Future[None]
    ) -> None:
        in_flight.pop(done, None)
        if done.cancelled():
            return  # abandoned: the channel gives the message back
        if done.exception() is None:
            acks.finish(handled, ok=True)
            return
        log.error(
            "outputs of a message on %s failed; message requeued",
            queue.name,
            exc_info=done.exception(),
            extra=context(message_id=message.message_id),
        )
        giving_back = asyncio.get_running_loop().create_task(give_back(message, handled))
        in_flight[giving_back] = []
        giving_back.add_done_callback(in_flight.pop)

    async def give_back(message: AbstractIncomingMessage, handled: _Handled) -> None:
        await _settle(message, queue.name, ack=False)
        acks.finish(handled, ok=False)

    async def ack_when_done(
        message: AbstractIncomingMessage, dones: list[Awaitable[Any]], handled: _Handled
    ) -> None:
        try:
            for done in dones:  # already under way: awaiting them in turn waits for the slowest
                await done
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception(
                "outputs of a message on %s failed; message requeued",
                queue.name,
                extra=context(message_id=message.message_id),
            )
            _discard(dones)
            await _settle(message, queue.name, ack=False)
            acks.finish(handled, ok=False)
            return
        acks.finish(handled, ok=True)

    # Delivered and not handled yet, in delivery order. The loop waits on a plain future that
    # a delivery (or `stop`) completes: before, each wait with nothing delivered made a task
    # (`ensure_future(inbox.get())`) and an `asyncio.wait` with its callbacks, per message at
    # low load.
    inbox: deque[AbstractIncomingMessage] = deque()
    waiter: asyncio.Future[None] | None = None

    def wake(_: object = None) -> None:
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def deliver(message: AbstractIncomingMessage) -> None:
        inbox.append(message)
        wake()

    halted: BaseException | None = None
    stopping = asyncio.ensure_future(stop.wait()) if stop is not None else None
    if stopping is not None:
        stopping.add_done_callback(wake)
    tag = await queue.consume(deliver)
    loop = asyncio.get_running_loop()
    try:
        while True:
            if stop is not None and stop.is_set():
                break  # whatever was delivered and not handled is put back, in order
            if not inbox:
                waiter = loop.create_future()
                try:
                    await waiter
                finally:
                    waiter = None
                continue
            message = inbox.popleft()  # (no task switch per message under load)
            try:
                envelopes = decode_message(message)
            except ValueError as exc:
                log.error(
                    "malformed message on %s rejected: %s",
                    queue.name,
                    exc,
                    extra=context(message_id=message.message_id),
                )
                if on_malformed is not None:
                    on_malformed(message, exc)
                await message.reject(requeue=False)
                continue
            dones: list[Awaitable[Any]] = []
            try:
                for envelope in envelopes:
                    dones.append(await handler(envelope))
            except asyncio.CancelledError:
                _discard(dones)
                raise
            except Exception as exc:
                _discard(dones)
                if halt_on_failure:
                    log.warning(
                        "handler failed on %s; the consumer stops before this message",
                        queue.name,
                        exc_info=True,
                        extra=context(message_id=message.message_id),
                    )
                    halted = exc
                    break
                # Redelivered whole: the envelopes handled already are handled idempotently.
                log.exception(
                    "handler failed on %s; message requeued",
                    queue.name,
                    extra=context(message_id=message.message_id),
                )
                await _settle(message, queue.name, ack=False)
                continue
            handled = acks.handled(message)
            if all(isinstance(done, asyncio.Future) for done in dones):
                # The usual case (decisions' outputs are batch futures): the acknowledgement
                # follows from a callback, with no task per message.
                futures: list[asyncio.Future[None]] = dones  # type: ignore[assignment]
                settled = all_of(futures)
                in_flight[settled] = dones
                settled.add_done_callback(partial(outputs_settled, message, handled))
            else:
                task = asyncio.create_task(ack_when_done(message, dones, handled))
                in_flight[task] = dones
                task.add_done_callback(in_flight.pop)
        await _cancel(queue, tag)
        while in_flight:  # stopped: finish and acknowledge what was handled
            await asyncio.wait(list(in_flight))
        await acks.sent()
    except BaseException:
        # Cancelled (a shutdown) or the channel failed: stop deliveries and give back what
        # waits here, so that it is not left unacknowledged on a channel that stays open.
        with contextlib.suppress(BaseException):
            await _cancel(queue, tag)
            while inbox:
                await _settle(inbox.popleft(), queue.name, ack=False)
        raise
    finally:
        if stopping is not None:
            stopping.cancel()
        for waiting, dones in list(in_flight.items()):
            waiting.cancel()
            _discard(dones)
        acks.abandon()
    if halted is not None:
        raise ConsumerHalted(f"a handler failed on {queue.name}") from halted


@dataclass(eq=False, slots=True)
class _Handled:
    """A delivery handled by `consume_pipelined`, until its outputs are confirmed (or failed
    and it was given back)."""

    message: AbstractIncomingMessage
    finished: bool = False
    ok: bool = False


class _InOrderAcks:
    """Acknowledges a consumer's handled deliveries several at a time, in delivery order.

    A delivery is acknowledged once its outputs are confirmed, and deliveries finish in bursts:
    decisions' inputs wait for the log batch holding their records (`CANOPY_LOG_BATCH_SECONDS`),
    so a batch's confirm finishes every input in it at once. One `basic.ack` with `multiple`
    for the longest finished prefix then stands for all of them: measured at 200 decisions/s
    (docs/performance.md), that was one ack frame per input for the worker to write and for
    RabbitMQ to apply to the quorum queue; now it is about one per log batch. Nothing waits
    longer for its acknowledgement: the ack leaves as soon as the prefix is finished, after
    the callbacks of the same event-loop step (so that a burst shares it).

    Only a finished prefix is ever acknowledged, so `multiple` never covers a delivery whose
    outputs are still pending; one that failed was given back (nack, requeue) before it counts
    as finished, and a later `multiple` ack passes over it (it is no longer outstanding). Acks
    are sent by one task at a time, in order: a `multiple` ack for a lower tag after a higher
    one would be a channel error.
    """

    def __init__(self, queue: str) -> None:
        self._queue = queue
        self._handled: deque[_Handled] = deque()
        self._upto: AbstractIncomingMessage | None = None  # to acknowledge (with all before it)
        self._sending: asyncio.Task[None] | None = None

    def handled(self, message: AbstractIncomingMessage) -> _Handled:
        handled = _Handled(message)
        self._handled.append(handled)
        return handled

    def finish(self, handled: _Handled, *, ok: bool) -> None:
        handled.finished, handled.ok = True, ok
        pending = self._handled
        while pending and pending[0].finished:
            head = pending.popleft()
            if head.ok:
                self._upto = head.message
        if self._upto is not None and self._sending is None:
            self._sending = asyncio.get_running_loop().create_task(self._send())

    async def _send(self) -> None:
        try:
            while (upto := self._upto) is not None:
                self._upto = None
                await _settle(upto, self._queue, ack=True, multiple=True)
        finally:
            self._sending = None

    async def sent(self) -> None:
        """Until every finished delivery's acknowledgement was sent."""
        while self._sending is not None:
            await asyncio.shield(self._sending)

    def abandon(self) -> None:
        """Stop sending (the consumer was cancelled: its channel gives back the rest)."""
        if self._sending is not None:
            self._sending.cancel()


async def _cancel(queue: AbstractQueue, tag: str) -> None:
    """Stop deliveries to a consumer (nothing to do if its channel is gone)."""
    try:
        await queue.cancel(tag)
    except (ChannelInvalidStateError, AMQPError, RuntimeError) as exc:
        log.info("consumer of %s not cancelled (%r): its channel is gone", queue.name, exc)


async def _settle(
    message: AbstractIncomingMessage, queue: str, *, ack: bool, multiple: bool = False
) -> None:
    """Ack (or nack and requeue) a delivery (`multiple`: the ack stands for every delivery
    before it on the channel too). If its channel is gone meanwhile (a broker node died), the
    broker requeues it by itself and the handler sees it again."""
    try:
        if ack:
            await message.ack(multiple=multiple)
        else:
            await message.nack(requeue=True)
    except (ChannelInvalidStateError, AMQPError) as exc:
        log.info(
            "%s of a message on %s lost with its channel (%r); the broker redelivers it",
            "ack" if ack else "nack",
            queue,
            exc,
            extra=context(message_id=message.message_id),
        )


def _discard(awaitables: list[Awaitable[Any]]) -> None:
    """Close coroutines that will never be awaited now (no 'never awaited' warnings)."""
    for awaitable in awaitables:
        if (
            inspect.iscoroutine(awaitable)
            and inspect.getcoroutinestate(awaitable) == inspect.CORO_CREATED
        ):
            awaitable.close()


@asynccontextmanager
async def running(tasks: list[asyncio.Task[Any]]) -> AsyncIterator[None]:
    """Cancel and await background tasks on exit (service shutdown)."""
    try:
        yield
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
