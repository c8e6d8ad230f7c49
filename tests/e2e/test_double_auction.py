"""A double auction end to end: orders and cancels over the WebSocket, trade then book
broadcasts, the book in a later hello, trade payoffs at period_end, and the replay."""

from __future__ import annotations

import httpx
import pytest

from tests.e2e.protocol import Participant, connect_group, create_session, replay_until

pytestmark = [pytest.mark.e2e]


async def test_a_market_trades_and_pays(api: httpx.AsyncClient, gateway_url: str) -> None:
    session = await create_session(
        api, experiment="double_auction", period_length=3, params={"buyer_value": 90}
    )
    codes = [p["code"] for p in session["participants"]]
    buyer, seller = await connect_group(gateway_url, codes)
    assert buyer.seen("hello")[0]["book"] == {"bids": [], "asks": []}
    await buyer.send(0.5, seq=1)  # no decisions channel in a market
    assert (await buyer.error(1))["code"] == "unknown_channel"
    await seller.send({"side": "ask", "price": 40, "quantity": 2}, seq=1, channel="orders")
    await seller.ack(1)
    await buyer.expect("book", lambda b: len(b["asks"]) == 1)
    await buyer.send({"side": "bid", "price": 45, "quantity": 1}, seq=2, channel="orders")
    await buyer.ack(2)
    trade = await seller.expect("trade")
    assert trade == {
        "price": 40,
        "quantity": 1,
        "buyer": codes[0],
        "seller": codes[1],
        "bid_seq": 2,
        "ask_seq": 1,
    }
    book = await seller.expect("book")
    assert book["asks"] == [{"participant": codes[1], "seq": 1, "price": 40, "quantity": 1}]
    late = await Participant.connect(gateway_url, codes[0])  # replaces the buyer's socket
    assert (await late.expect("hello"))["book"] == book
    await seller.send({"seq": 1}, seq=2, channel="cancel")
    await seller.ack(2)
    await seller.expect("book", lambda b: b == {"bids": [], "asks": []})
    end = await seller.expect("period_end", timeout=10)
    assert end["payoffs"] == {codes[0]: 90 - 40, codes[1]: 40}
    replay = await replay_until(api, session["session"])
    assert replay["groups"][0]["periods"][0]["payoffs"] == end["payoffs"]
    await late.close()
    await seller.close()
