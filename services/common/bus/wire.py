"""What a bus message's body is: one envelope, or a batch of them (type `canopy.batch`, a JSON
array of envelopes). Consumers accept both."""

from __future__ import annotations

from collections.abc import Sequence

from aio_pika.abc import AbstractIncomingMessage
from pydantic import TypeAdapter

from services.common.messages import Envelope

BATCH_TYPE = "canopy.batch"
# A batch message's size limit (`Batcher`): well under RabbitMQ's maximum message size (128 MiB
# by default since 3.10), and small enough that one batch does not hold a consumer up for long.
BATCH_MAX_BYTES = 4 * 1024 * 1024

_ENVELOPES: TypeAdapter[list[Envelope]] = TypeAdapter(list[Envelope])


def encode_batch(envelopes: Sequence[Envelope]) -> bytes:
    return batch_body([envelope.encode() for envelope in envelopes])


def batch_body(encoded: Sequence[bytes]) -> bytes:
    """A batch message's body from its envelopes, each already encoded."""
    return b"[" + b",".join(encoded) + b"]"


def decode_message(message: AbstractIncomingMessage) -> list[Envelope]:
    """The envelopes of a bus message: a batch or one envelope. Raises ValueError if malformed."""
    if message.type == BATCH_TYPE:
        return _ENVELOPES.validate_json(message.body)
    return [Envelope.decode(message.body)]
