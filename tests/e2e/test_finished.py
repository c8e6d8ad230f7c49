"""The end for everyone (PROTOCOL v2 "Online studies") on the real stack: when the group's last
period ends, the member still connected gets `finished` with outcome `completed` and the
completion redirect with its label filled in (percent-encoded), the member who left gets
`dropout` (logged, and sent again after `hello` when they open their link again), and the
export holds both `finished` rows right after that `period_end`, in member order."""

from __future__ import annotations

import json

import httpx
import pytest

from tests.e2e.protocol import Participant, connect_group, create_session, export_until

pytestmark = [pytest.mark.e2e]

LABELS = ["PID 1/ä", "PID-2"]
COMPLETION = {
    "completed": {"url": "https://example.org/done?pid={label}"},
    "dropout": {"code": "DROP"},
}


async def test_the_connected_member_completes_and_the_one_who_left_drops_out(
    api: httpx.AsyncClient, gateway_url: str
) -> None:
    session = await create_session(
        api,
        experiment="public_goods",
        num_periods=2,
        period_length=1.5,
        labels=LABELS,
        completion=COMPLETION,
    )
    codes = [p["code"] for p in session["participants"]]  # seat order: label i is seat i's
    a, b = await connect_group(gateway_url, codes)
    await a.send(10, seq=1)
    await a.ack(1)
    await b.expect("period_start", lambda p: p["period"] == 2)
    await b.close()  # leaves during the last period (on_disconnect continue: it runs on)

    finished = await a.expect("finished")
    ends = [p for p in a.seen("period_end")]
    assert [end["period"] for end in ends] == [1, 2]
    assert a.channels()[-2:] == ["period_end", "finished"]  # right after the last period_end
    assert finished == {
        "outcome": "completed",
        "total_payoff": sum(end["payoffs"][codes[0]] for end in ends),
        "redirect": "https://example.org/done?pid=PID%201%2F%C3%A4",
        "code": None,
    }

    export = await export_until(
        api, session["session"], lambda r: sum(x["channel"] == "finished" for x in r) == 2
    )
    channels = [row["channel"] for row in export]
    last_end = len(channels) - 1 - channels[::-1].index("period_end")
    after = export[last_end + 1 : last_end + 3]
    assert [(row["channel"], row["participant"]) for row in after] == [
        ("finished", codes[0]),
        ("finished", codes[1]),
    ]
    assert [row["direction"] for row in after] == ["out", "out"]
    assert json.loads(after[0]["value"]) == finished
    dropout = json.loads(after[1]["value"])
    assert dropout == {
        "outcome": "dropout",
        "total_payoff": sum(end["payoffs"][codes[1]] for end in ends),
        "redirect": None,
        "code": "DROP",
    }

    # The one who left opens their link again: hello, then their finished, as logged.
    back = await Participant.connect(gateway_url, codes[1])
    hello = await back.next()
    assert hello["channel"] == "hello" and hello["payload"]["period"]["state"] == "ended"
    again = await back.next()
    assert (again["channel"], again["payload"]) == ("finished", dropout)
    await a.close()
    await back.close()
