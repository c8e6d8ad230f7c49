"""The store's side of online studies (PROTOCOL v2 "Online studies") on the real stack: a
session with labels, completion and payment answers its study link; the internal join gives
seats by the rules (404 for an unknown join key, `full` with its destination when no seat is
left); the groups' config carries the labels the study link gave; a seat's `finished` and
`presence` rows, published to the log as decisions publishes them, become its status and
outcome in the session detail; and the payments file comes as CSV, JSON and Prolific text.

The first test publishes the rows by hand on the `canopy.log` exchange (every case at once);
the second lets decisions end a real group and checks that the session detail and the
payments file say what each member's `finished` said."""

from __future__ import annotations

import asyncio
import csv
import io
import time
from typing import Any

import aio_pika
import httpx
import pytest

from services.common.messages import LogBatch, LogRecord, new_id
from tests.e2e.protocol import connect_group, create_session

pytestmark = [pytest.mark.e2e]

TIMEOUT = 10.0


async def publish_log(stack: Any, records: list[LogRecord]) -> None:
    """Records on the log exchange, as decisions publishes them."""
    connection = await aio_pika.connect(stack.infra.amqp_url)
    async with connection:
        channel = await connection.channel()
        exchange = await channel.get_exchange("canopy.log", ensure=False)
        batch = LogBatch(records=records)
        await exchange.publish(aio_pika.Message(batch.encode(), message_id=batch.id), "log")


def out_row(session: str, group: str, channel: str, value: Any, participant: str | None) -> Any:
    return LogRecord(
        id=new_id(),
        ts=time.time(),
        session=session,
        group=group,
        participant=participant,
        direction="out",
        channel=channel,
        seq=None,
        value=value,
    )


async def wait_for(check: Any, timeout: float = TIMEOUT) -> Any:
    """Poll the API until `check()` answers something true (the log is written in batches)."""
    deadline = time.monotonic() + timeout
    while True:
        result = await check()
        if result or time.monotonic() > deadline:
            return result
        await asyncio.sleep(0.05)


async def test_study_link_status_outcome_and_payments(stack: Any, api: httpx.AsyncClient) -> None:
    body: dict[str, Any] = {
        "experiment": "bimatrix",
        "num_participants": 4,
        "group_size": 2,
        "period_length": 30,
        "labels": ["A1", "A2", "A3", "A4"],
        "label_param": "PROLIFIC_PID",
        "completion": {
            "completed": {"url": "https://example.org/done?who={label}&s={session}"},
            "full": {"url": "https://example.org/full?who={label}"},
            "dropout": {"code": "DROP-1"},
        },
        "payment": {"exchange_rate": 0.25, "show_up_fee": 1, "currency": "GBP"},
    }
    created = (await api.post("/api/sessions", json=body)).json()
    session = created["session"]
    join_url = created["join_url"]
    join_key = join_url.rsplit("/join/", 1)[1]
    assert join_url == f"{stack.urls.gateway_url}/join/{join_key}"
    assert [p["label"] for p in created["participants"]] == ["A1", "A2", "A3", "A4"]

    detail = (await api.get(f"/api/sessions/{session}")).json()
    assert (detail["join_key"], detail["join_url"]) == (join_key, join_url)
    assert detail["label_param"] == "PROLIFIC_PID"
    assert detail["payment"] == {"exchange_rate": 0.25, "show_up_fee": 1.0, "currency": "GBP"}
    assert detail["completion"]["dropout"] == {"code": "DROP-1"}
    assert [(p["label"], p["status"], p["outcome"]) for p in detail["participants"]] == [
        (label, "unassigned", None) for label in body["labels"]
    ]
    seats = detail["participants"]  # in seat order: group order, then id_in_group
    assert [p["code"] for p in seats] == [c for g in created["groups"] for c in g["participants"]]

    # The internal join (token-protected, as the gateway calls it).
    join = f"/internal/join/{join_key}"
    assert (await api.post(join, json={"label": "A3", "seat": None})).json() == {
        "key": seats[2]["key"],
        "finished": False,
        "label": "A3",
        # The seat as `/internal/seats` has it: the gateway caches it for the socket.
        "seat": (await api.get(f"/internal/seats/{seats[2]['key']}")).json(),
    }
    # The gateway may pass the link's whole query: the label is the session's label_param.
    by_query = {"query": {"PROLIFIC_PID": "A3", "STUDY_ID": "s1"}, "seat": None}
    answer = (await api.post(join, json=by_query)).json()
    assert (answer["key"], answer["label"]) == (seats[2]["key"], "A3")
    too_long = {"query": {"PROLIFIC_PID": "x" * 129}, "seat": None}
    refused = await api.post(join, json=too_long)
    assert refused.status_code == 422 and refused.json()["error"]["field"] == "query.PROLIFIC_PID"
    async with httpx.AsyncClient(base_url=stack.urls.store_url) as stranger:
        assert (await stranger.post(join, json={"label": "A3"})).status_code == 401
    assert (await api.post("/internal/join/" + "x" * 32, json={"label": "A3"})).status_code == 404
    full = (await api.post(join, json={"label": "someone else", "seat": None})).json()
    assert full == {
        "full": True,
        "redirect": "https://example.org/full?who=someone%20else",
        "code": None,
    }
    group = seats[2]["group"]
    config = (await api.get(f"/internal/groups/{group}")).json()
    assert config["labels"] == {seats[2]["code"]: "A3", seats[3]["code"]: "A4"}
    assert config["completion"]["dropout"] == {"code": "DROP-1"}

    # A period's end and each seat's end, through the log.
    first = seats[0]["group"]
    a, b = seats[0]["code"], seats[1]["code"]
    await publish_log(
        stack,
        [
            out_row(session, first, "presence", {"participant": a, "connected": True}, None),
            out_row(session, first, "presence", {"participant": b, "connected": True}, None),
            out_row(
                session,
                first,
                "period_end",
                {"period": 1, "payoffs": {a: 10.0, b: 2.0}, "group_decisions": {}},
                None,
            ),
            out_row(session, first, "presence", {"participant": b, "connected": False}, None),
            out_row(
                session,
                first,
                "finished",
                {"outcome": "completed", "total_payoff": 10.0, "redirect": "r", "code": None},
                a,
            ),
            out_row(
                session,
                first,
                "finished",
                {"outcome": "dropout", "total_payoff": 2.0, "redirect": None, "code": "DROP-1"},
                b,
            ),
        ],
    )

    async def finished() -> list[Any] | None:
        detail = (await api.get(f"/api/sessions/{session}")).json()
        rows = [(p["label"], p["status"], p["outcome"]) for p in detail["participants"]]
        return rows if rows[1][2] == "dropout" else None

    assert await wait_for(finished) == [
        ("A1", "finished", "completed"),
        ("A2", "finished", "dropout"),
        ("A3", "playing", None),  # given by the study link, not connected yet
        ("A4", "unassigned", None),
    ]
    # A finished seat's label still gets its seat, marked finished.
    assert (await api.post(join, json={"query": {"PROLIFIC_PID": "A1"}})).json() == {
        "key": seats[0]["key"],
        "finished": True,
        "label": "A1",
        "seat": (await api.get(f"/internal/seats/{seats[0]['key']}")).json(),
    }

    # Payments: csv (the default), json, prolific.
    url = f"/api/sessions/{session}/payments"
    as_csv = await api.get(url)
    assert as_csv.status_code == 200
    assert as_csv.headers["content-type"] == "text/csv; charset=utf-8"
    assert f'filename="canopy-{session}-payments.csv"' in as_csv.headers["content-disposition"]
    assert list(csv.reader(io.StringIO(as_csv.text))) == [
        ["label", "code", "outcome", "total_payoff", "bonus", "show_up_fee", "currency"],
        ["A1", a, "completed", "10.0", "2.5", "1.0", "GBP"],
        ["A2", b, "dropout", "2.0", "0.5", "1.0", "GBP"],
        ["A3", seats[2]["code"], "", "0", "0.0", "1.0", "GBP"],
        ["A4", seats[3]["code"], "", "0", "0.0", "1.0", "GBP"],
    ]
    as_json = await api.get(url, params={"format": "json"})
    assert as_json.headers["content-type"] == "application/json"
    payments = as_json.json()["payments"]
    assert payments[0] == {
        "label": "A1",
        "code": a,
        "outcome": "completed",
        "total_payoff": 10.0,
        "bonus": 2.5,
        "show_up_fee": 1.0,
        "currency": "GBP",
    }
    # The payments file agrees with the session detail's totals and outcomes.
    detail = (await api.get(f"/api/sessions/{session}")).json()
    assert [(r["code"], r["outcome"], r["total_payoff"]) for r in payments] == [
        (p["code"], p["outcome"], p["total_payoff"]) for p in detail["participants"]
    ]
    prolific = await api.get(url, params={"format": "prolific"})
    assert prolific.headers["content-type"] == "text/plain; charset=utf-8"
    assert prolific.text == "A1,2.50\nA2,0.50\n"
    assert (await api.get(url, params={"format": "xlsx"})).status_code == 422
    assert (await api.get("/api/sessions/nope/payments")).status_code == 404


async def test_decisions_finished_rows_become_the_detail_and_the_payments(
    stack: Any, api: httpx.AsyncClient, gateway_url: str
) -> None:
    session = await create_session(
        api,
        experiment="public_goods",
        num_periods=1,
        period_length=1.5,
        labels=["X1", "X2"],
        completion={"completed": {"code": "DONE"}},
        payment={"exchange_rate": 0.1, "currency": "EUR"},
    )
    codes = [p["code"] for p in session["participants"]]
    a, b = await connect_group(gateway_url, codes)
    await a.send(10, seq=1)
    await a.ack(1)
    await b.close()  # away when the last period ends: dropout
    done = await a.expect("finished")
    assert (done["outcome"], done["code"]) == ("completed", "DONE")

    async def outcomes() -> list[Any] | None:
        detail = (await api.get(f"/api/sessions/{session['session']}")).json()
        rows = [(p["status"], p["outcome"]) for p in detail["participants"]]
        return rows if all(outcome for _, outcome in rows) else None

    assert await wait_for(outcomes) == [("finished", "completed"), ("finished", "dropout")]
    payments = (
        await api.get(f"/api/sessions/{session['session']}/payments", params={"format": "json"})
    ).json()["payments"]
    assert [(r["label"], r["code"], r["outcome"]) for r in payments] == [
        ("X1", codes[0], "completed"),
        ("X2", codes[1], "dropout"),
    ]
    assert payments[0]["total_payoff"] == pytest.approx(done["total_payoff"])
    assert payments[0]["bonus"] == round(max(0.0, done["total_payoff"]) * 0.1, 2)
    assert {r["currency"] for r in payments} == {"EUR"}
    await a.close()
