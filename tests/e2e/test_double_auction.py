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
    assert buyer.seen("hello")[0]["book"] == {
        "bids": [],
        "asks": [],
        "bids_total": 0,
        "asks_total": 0,
    }
    await buyer.send(0.5, seq=1)  # no decisions channel in a market
    assert (await buyer.error(1))["code"] == "unknown_channel"
    # Custom-channel validation: the experiment's own rules answer invalid_decision.
    await buyer.send({"side": "ask", "price": 40, "quantity": 1}, seq=3, channel="orders")
    assert (await buyer.error(3))["code"] == "invalid_decision"  # buyers only bid
    await buyer.send({"side": "bid", "price": 0, "quantity": 1}, seq=4, channel="orders")
    assert (await buyer.error(4))["code"] == "invalid_decision"
    await buyer.send({"seq": 99}, seq=5, channel="cancel")
    assert (await buyer.error(5))["code"] == "invalid_decision"
    await seller.send({"side": "ask", "price": 40, "quantity": 2}, seq=1, channel="orders")
    await seller.ack(1)
    await buyer.expect("book", lambda b: len(b["asks"]) == 1)
    await buyer.send({"side": "bid", "price": 45, "quantity": 1}, seq=6, channel="orders")
    await buyer.ack(6)
    trade = await seller.expect("trade")
    assert trade == {
        "price": 40,
        "quantity": 1,
        "buyer": codes[0],
        "seller": codes[1],
        "bid_seq": 6,
        "ask_seq": 1,
    }
    book = await seller.expect("book")
    assert book["asks"] == [{"participant": codes[1], "seq": 1, "price": 40, "quantity": 1}]
    late = await Participant.connect(gateway_url, codes[0])  # replaces the buyer's socket
    assert (await late.expect("hello"))["book"] == book
    await seller.send({"seq": 1}, seq=2, channel="cancel")
    await seller.ack(2)
    await seller.expect("book", lambda b: b["bids"] == b["asks"] == [] and b["asks_total"] == 0)
    end = await seller.expect("period_end", timeout=10)
    assert end["payoffs"] == {codes[0]: 90 - 40, codes[1]: 40}
    replay = await replay_until(api, session["session"])
    assert replay["groups"][0]["periods"][0]["payoffs"] == end["payoffs"]
    await late.close()
    await seller.close()
