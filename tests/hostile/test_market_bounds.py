"""One trader cannot grow the double auction's book without bound (PROTOCOL v2 "Limits" →
`double_auction`), end to end on the real stack: a buyer who tries 200 resting bids gets
`invalid_decision` from the 21st on (`max_open_orders` 20), every `book` frame any member
receives stays small and lists at most `book_depth` (50) entries per side with the totals, and
the export holds every order the buyer sent, each refused one with its `error` row."""

from __future__ import annotations

import json

import httpx
import pytest

from tests.e2e.protocol import connect_group, create_session, export_until

pytestmark = [pytest.mark.e2e]

TRIES = 200  # resting bids the first buyer tries
MAX_OPEN = 20  # the default max_open_orders
DEPTH = 50  # the default book_depth
MAX_BOOK_BYTES = 8_192  # 50 entries of about 80 bytes, and a little room


async def test_one_buyer_cannot_grow_the_book(api: httpx.AsyncClient, gateway_url: str) -> None:
    session = await create_session(
        api,
        experiment="double_auction",
        num_participants=6,
        group_size=6,
        period_length=300,
        params={},
    )
    codes = [p["code"] for p in sorted(session["participants"], key=lambda p: p["id_in_group"])]
    members = await connect_group(gateway_url, codes)
    flooder, buyers = members[0], [members[2], members[4]]  # odd id_in_group buy
    for seq in range(1, TRIES + 1):
        # Prices under every ask (there are none): each bid would rest.
        await flooder.send(
            {"side": "bid", "price": 1 + seq / 100, "quantity": 1}, seq=seq, channel="orders"
        )
        if seq <= MAX_OPEN:
            await flooder.ack(seq)
        else:
            error = await flooder.error(seq)
            assert error["code"] == "invalid_decision", error
    # Two more buyers fill their own 20 each: 60 bids in all, more than the depth shows.
    for buyer in buyers:
        for seq in range(1, MAX_OPEN + 1):
            await buyer.send(
                {"side": "bid", "price": 0.5, "quantity": 1}, seq=seq, channel="orders"
            )
            await buyer.ack(seq)
    total = MAX_OPEN * 3
    for member in members:
        await member.expect("book", lambda b: b["bids_total"] == total, timeout=30)
        books = member.seen("book")
        assert books, member.code
        for book in books:
            assert len(json.dumps(book)) <= MAX_BOOK_BYTES, len(json.dumps(book))
            assert len(book["bids"]) <= DEPTH and len(book["asks"]) <= DEPTH
            assert book["bids_total"] >= len(book["bids"])
        last = books[-1]
        assert len(last["bids"]) == DEPTH and last["asks_total"] == 0
        # Best first: the flooder's 20 (highest prices, latest first), then the others'.
        assert [e["seq"] for e in last["bids"][:MAX_OPEN]] == list(range(MAX_OPEN, 0, -1))
    flooder_code = codes[0]

    def logged(rows: list[dict[str, str]]) -> bool:
        ins = [r for r in rows if r["direction"] == "in"]
        errors = [r for r in rows if r["channel"] == "error" and r["participant"] == flooder_code]
        return len(ins) == TRIES + 2 * MAX_OPEN and len(errors) == TRIES - MAX_OPEN

    rows = await export_until(api, session["session"], logged)
    sent = sorted(
        int(r["seq"]) for r in rows if r["direction"] == "in" and r["participant"] == flooder_code
    )
    assert sent == list(range(1, TRIES + 1))
    refused = sorted(
        json.loads(r["value"])["seq"]
        for r in rows
        if r["channel"] == "error" and r["participant"] == flooder_code
    )
    assert refused == list(range(MAX_OPEN + 1, TRIES + 1))
    assert all(len(r["value"]) <= MAX_BOOK_BYTES for r in rows if r["channel"] == "book"), (
        "a logged book row grew"
    )
    for member in members:
        await member.close()
