"""`retry_forever` returns what its action returned once it succeeds (so that a read waiting for
a service, not only a write, can use it); errors it is told to give up on are raised at once."""

from __future__ import annotations

import pytest

from services.common.retry import retry_forever


class Flaky:
    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.calls = 0

    async def __call__(self) -> dict[str, int]:
        self.calls += 1
        if self.calls <= self.failures:
            raise ConnectionError("away")
        return {"calls": self.calls}


async def test_the_result_of_the_call_that_succeeded_is_returned() -> None:
    flaky = Flaky(failures=2)
    retried: list[Exception] = []
    result = await retry_forever(
        flaky, "reading", first_delay=0.001, max_delay=0.002, on_retry=retried.append
    )
    assert result == {"calls": 3}
    assert len(retried) == 2 and all(isinstance(e, ConnectionError) for e in retried)


async def test_an_error_to_give_up_on_is_raised_without_a_retry() -> None:
    flaky = Flaky(failures=1)
    with pytest.raises(ConnectionError):
        await retry_forever(flaky, "reading", give_up_on=(ConnectionError,), first_delay=0.001)
    assert flaky.calls == 1
