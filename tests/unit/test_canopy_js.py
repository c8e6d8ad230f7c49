"""canopy.js on its own: the browser client's seq, pending, hello and reconnect logic, run in
headless Chromium against a scripted fake WebSocket, on Playwright's fake clock (no server)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from playwright.async_api import Browser, Page, Route, async_playwright

CHROMIUM = "/usr/bin/chromium"
CANOPY_JS = Path(__file__).resolve().parents[2] / "services" / "gateway" / "static" / "canopy.js"
ORIGIN = "http://canopy.test"  # served by page.route: a real origin, so Web Storage works
CODE = "p1"

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not Path(CHROMIUM).exists(), reason=f"{CHROMIUM} missing"),
]

# A WebSocket double driven by the test: the "server" side is open(), receive(), serverClose().
FAKE_WEBSOCKET = """
class FakeWebSocket {
  constructor(url) {
    this.url = url; this.readyState = 0; this.sent = []; this.closedWith = null;
    FakeWebSocket.all.push(this);
  }
  send(data) {
    if (this.readyState !== 1) throw new Error("not open");
    this.sent.push(JSON.parse(data));
  }
  close(code) { this.readyState = 3; this.closedWith = code; }
  open() { this.readyState = 1; if (this.onopen) this.onopen({}); }
  receive(channel, payload, ts) {
    const frame = {channel, payload, ts: ts === undefined ? Date.now() / 1000 : ts};
    this.onmessage({data: JSON.stringify(frame)});
  }
  serverClose(code) { this.readyState = 3; this.onclose({code}); }
}
FakeWebSocket.all = [];
window.FakeWebSocket = FakeWebSocket;
window.ws = () => FakeWebSocket.all[FakeWebSocket.all.length - 1];
window.calls = [];
window.start = (options) => {
  const log = (name) => (...args) => window.calls.push([name, ...args]);
  window.client = Canopy.connect("ws://canopy.test/ws/p1", "p1", {
    onStatus: log("status"), onHello: log("hello"), onError: log("error"),
    onMessage: log("message"), group_decisions: log("group_decisions"),
  }, Object.assign({WebSocket: FakeWebSocket, random: () => 0.5}, options || {}));
  return window.client.state.status;
};
window.helloPayload = (lastSeq, extra) => Object.assign({
  participant: "p1", group: "g1", id_in_group: 1, members: ["p1", "p2"],
  group_decisions: {p1: null, p2: null},
  period: {number: 1, state: "waiting", ends_at: null}, last_seq: lastSeq}, extra || {});
window.hello = (lastSeq, extra) => ws().receive("hello", helloPayload(lastSeq, extra));
"""


@pytest.fixture(scope="module")
async def browser() -> AsyncIterator[Browser]:
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(
            executable_path=CHROMIUM,
            args=["--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run"],
        )
        yield browser
        await browser.close()


@pytest.fixture
async def page(browser: Browser) -> AsyncIterator[Page]:
    context = await browser.new_context()
    page = await context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))

    async def serve(route: Route) -> None:
        if route.request.url == f"{ORIGIN}/static/canopy.js":
            await route.fulfill(status=200, content_type="text/javascript", path=CANOPY_JS)
        else:
            await route.fulfill(
                status=200, content_type="text/html", body="<!doctype html><p>t</p>"
            )

    await page.route(f"{ORIGIN}/**", serve)
    await page.clock.install()
    await page.goto(f"{ORIGIN}/p/{CODE}")
    await load_client(page)
    yield page
    await context.close()
    assert not errors, errors


async def load_client(page: Page) -> None:
    # canopy.js is an ES module: imported as the pages import it, then exposed to the tests.
    await page.evaluate("async () => { window.Canopy = await import('/static/canopy.js'); }")
    await page.add_script_tag(content=FAKE_WEBSOCKET)


async def js(page: Page, expression: str) -> Any:
    return await page.evaluate(f"() => {{ {expression} }}")


async def receive(page: Page, channel: str, payload: Any) -> None:
    await page.evaluate(
        "([channel, payload]) => ws().receive(channel, payload)", [channel, payload]
    )


async def sent_seqs(page: Page) -> list[int]:
    return await js(page, "return ws().sent.map(f => f.seq)")  # type: ignore[no-any-return]


async def test_frames_wait_for_hello_then_go_in_seq_order(page: Page) -> None:
    assert await js(page, "return start()") == "connecting"
    await js(page, "ws().open(); client.send('decisions', 0.1); client.send('decisions', 0.2)")
    assert await sent_seqs(page) == [], "nothing may leave before the hello"
    assert await js(page, "return client.state.pending.map(f => f.seq)") == [1, 2]
    assert await js(page, "return localStorage.getItem('canopy.seq.p1')") == "3"

    await js(page, "hello(0)")

    assert await js(page, "return ws().sent") == [
        {"channel": "decisions", "payload": 0.1, "seq": 1},
        {"channel": "decisions", "payload": 0.2, "seq": 2},
    ]
    assert await js(page, "return client.state.status") == "connected"
    assert await js(page, "return calls.map(c => c[0])") == ["status", "hello"]

    await js(page, "ws().receive('ack', {seq: 1})")
    assert await js(page, "return client.state.pending.map(f => f.seq)") == [2]
    await js(page, "ws().receive('ack', {seq: 2})")
    assert await js(page, "return client.state.pending") == []
    assert await js(page, "return sessionStorage.getItem('canopy.pending.p1')") is None
    assert await js(page, "client.send('decisions', 0.3); return ws().sent.at(-1)") == {
        "channel": "decisions",
        "payload": 0.3,
        "seq": 3,
    }


async def test_hello_drops_what_the_server_has_and_resends_the_rest(page: Page) -> None:
    await js(page, "start(); ws().open(); hello(0)")
    await js(page, "for (const v of [1, 2, 3, 4]) client.send('decisions', v / 10)")
    await js(page, "ws().receive('ack', {seq: 1}); ws().serverClose(1006)")
    assert await js(page, "return client.state.status") == "reconnecting"

    await page.clock.run_for(300)  # first retry: 250 ms with jitter
    await js(page, "ws().open(); hello(2)")  # the server got 1 and 2

    assert await sent_seqs(page) == [3, 4]
    assert await js(page, "return client.state.lastSeq") == 2


async def test_hello_moves_the_counter_past_the_server(page: Page) -> None:
    # Storage lost (another browser, cleared data): the server knows better.
    await js(page, "start(); ws().open(); hello(41)")
    assert await js(page, "return client.state.nextSeq") == 42
    assert await js(page, "return client.send('decisions', 1)") == 42
    assert await js(page, "return localStorage.getItem('canopy.seq.p1')") == "43"


async def test_a_reload_keeps_pending_frames_and_the_counter(page: Page) -> None:
    await js(page, "start(); ws().open(); hello(0)")
    await js(page, "client.send('decisions', 0.5); client.send('decisions', 0.6)")
    await js(page, "ws().receive('ack', {seq: 1})")

    await page.reload()
    await load_client(page)
    await js(page, "start()")

    assert await js(page, "return client.state.pending") == [
        {"channel": "decisions", "payload": 0.6, "seq": 2}
    ]
    assert await js(page, "return client.state.nextSeq") == 3
    await js(page, "ws().open(); hello(1)")
    assert await sent_seqs(page) == [2]


async def test_errors_drop_the_rejected_frame_except_flood(page: Page) -> None:
    await js(page, "start(); ws().open(); hello(0)")
    await js(page, "client.send('decisions', 5); client.send('decisions', 0.5)")
    error = {"code": "invalid_decision", "message": "0..1", "seq": 1}
    await receive(page, "error", error)
    assert await js(page, "return client.state.pending.map(f => f.seq)") == [2]
    assert await js(page, "return calls.filter(c => c[0] === 'error').map(c => c[1])") == [error]

    # too_many_messages: not applied, but worth sending again after a pause.
    await js(
        page,
        "ws().receive('error', {code: 'too_many_messages', message: 'slow down', seq: 2})",
    )
    assert await js(page, "return client.state.pending.map(f => f.seq)") == [2]
    await page.clock.run_for(1100)
    assert await sent_seqs(page) == [1, 2, 2]


async def test_broadcasts_reach_handlers_and_state(page: Page) -> None:
    await js(page, "start(); ws().open()")
    # The member who completes the group may get period_start before its hello, which
    # then still says "waiting": the newer one wins.
    await js(page, "ws().receive('period_start', {period: 1, length: 30, ends_at: 1000})")
    await js(page, "hello(0)")
    assert await js(page, "return client.state.period.state") == "running"
    assert await js(page, "return client.state.presence") == {"p1": True, "p2": True}

    await js(page, "ws().receive('group_decisions', {p1: 0.5, p2: 0.25}, 7)")
    assert await js(page, "return client.state.groupDecisions") == {"p1": 0.5, "p2": 0.25}
    assert await js(page, "return calls.filter(c => c[0] === 'group_decisions')") == [
        ["group_decisions", {"p1": 0.5, "p2": 0.25}, 7]
    ]
    await js(page, "ws().receive('presence', {participant: 'p2', connected: false})")
    await js(page, "ws().receive('my_channel', [1, 2])")
    assert await js(page, "return calls.filter(c => c[0] === 'message').map(c => c[1])") == [
        "period_start",
        "group_decisions",
        "presence",
        "my_channel",
    ]
    assert await js(page, "return client.state.presence") == {"p1": True, "p2": False}

    payoffs = {"p1": 1.5, "p2": 0.5}
    await receive(
        page, "period_end", {"period": 1, "group_decisions": {"p1": 0.7}, "payoffs": payoffs}
    )
    period = await js(page, "return client.state.period")
    assert period["state"] == "ended"
    assert period["payoffs"] == payoffs
    assert await js(page, "return client.state.groupDecisions.p1") == 0.7


async def test_reconnect_backoff_doubles_to_five_seconds_with_jitter(page: Page) -> None:
    await js(page, "start({random: () => 1})")  # the top of each jitter range
    delays = []
    for _ in range(8):
        await js(page, "ws().serverClose(1006)")
        delays.append(await js(page, "return client.state.retryInMs"))
        before = await js(page, "return FakeWebSocket.all.length")
        await page.clock.run_for(delays[-1] + 1)
        assert await js(page, "return FakeWebSocket.all.length") == before + 1
    assert delays == [250, 500, 1000, 2000, 4000, 5000, 5000, 5000]

    await js(page, "ws().open(); hello(0); client.options.random = () => 0")
    await js(page, "ws().serverClose(1006)")
    assert await js(page, "return client.state.retryInMs") == 125, "a hello resets the backoff"


async def test_refused_and_replaced_stop_reconnecting(page: Page) -> None:
    await js(page, "start(); ws().open(); hello(0); ws().serverClose(4409)")
    assert await js(page, "return client.state.status") == "replaced"
    await page.clock.run_for(60_000)
    assert await js(page, "return FakeWebSocket.all.length") == 1

    await js(page, "client.reconnect()")
    assert await js(page, "return FakeWebSocket.all.length") == 2
    await js(page, "ws().open(); hello(0); ws().serverClose(4403)")
    assert await js(page, "return client.state.status") == "refused"
    await page.clock.run_for(60_000)
    assert await js(page, "return FakeWebSocket.all.length") == 2
    statuses = await js(page, "return calls.filter(c => c[0] === 'status').map(c => c[1])")
    assert statuses == ["connected", "replaced", "reconnecting", "connected", "refused"]


async def test_a_silent_connection_is_replaced(page: Page) -> None:
    await js(page, "start(); ws().open(); hello(0); client.send('decisions', 0.1)")
    await page.clock.run_for(14_000)
    assert await js(page, "return FakeWebSocket.all.length") == 1
    await page.clock.run_for(1_500)  # 15 s without an answer: the socket is presumed dead
    assert await js(page, "return FakeWebSocket.all[0].closedWith") == 4000
    await page.clock.run_for(300)
    await js(page, "ws().open(); hello(0)")
    assert await sent_seqs(page) == [1]


async def test_a_long_queue_goes_out_under_the_flood_limit(page: Page) -> None:
    await freeze_clock(page)  # the token bucket counts time: only run_for may move it
    await js(page, "start(); ws().open(); hello(0); ws().serverClose(1006)")
    await js(page, "for (let i = 0; i < 200; i++) client.send('decisions', i / 200)")
    await page.clock.run_for(300)
    await js(page, "ws().open(); hello(0)")
    assert len(await sent_seqs(page)) == 50  # the burst
    await page.clock.run_for(1000)
    assert 85 <= len(await sent_seqs(page)) <= 91  # plus 40 a second
    await page.clock.run_for(5000)
    assert await sent_seqs(page) == list(range(1, 201))


async def test_on_send_and_decide(page: Page) -> None:
    await js(
        page,
        """start(); window.seen = [];
        const stop = client.on('group_decisions', (p, ts) => seen.push(['gd', p, ts]));
        client.on('status', (s) => seen.push(['status', s]));
        client.on('message', (channel) => seen.push(['message', channel]));
        client.on('hello', (p) => seen.push(['hello', p.last_seq]));
        client.on('ack', (seq) => seen.push(['ack', seq]));
        window.stop = stop;
        ws().open(); hello(0)""",
    )
    assert await js(page, "return client.decide(0.3)") == 1
    assert await js(page, "return client.send('orders', {side: 'bid', price: 5, quantity: 1})") == 2
    assert await js(page, "return ws().sent") == [
        {"channel": "decisions", "payload": 0.3, "seq": 1},
        {"channel": "orders", "payload": {"side": "bid", "price": 5, "quantity": 1}, "seq": 2},
    ]
    await js(page, "ws().receive('ack', {seq: 1}); ws().receive('group_decisions', {p1: 0.3}, 9)")
    await js(page, "stop(); ws().receive('group_decisions', {p1: 0.4}, 10)")
    assert await js(page, "return seen") == [
        ["status", "connected"],
        ["hello", 0],
        ["ack", 1],
        ["message", "group_decisions"],
        ["gd", {"p1": 0.3}, 9],
        ["message", "group_decisions"],
    ]
    # A listener that throws is reported, and the others still run.
    await js(
        page,
        """console.error = () => {}; client.on('book', () => { throw new Error('x'); });
        client.on('book', (p) => seen.push(['book', p])); ws().receive('book', {bids: []})""",
    )
    assert await js(page, "return seen.at(-1)") == ["book", {"bids": []}]
    assert await js(page, "return client.state.pending.map(f => f.seq)") == [2]


async def test_pause_and_resume_move_the_period(page: Page) -> None:
    await js(page, "start(); ws().open(); hello(0)")
    await receive(page, "period_start", {"period": 1, "length": 30, "ends_at": 1000})
    await receive(page, "period_paused", {"period": 1, "remaining": 12.5})
    period = await js(page, "return client.state.period")
    assert (period["state"], period["remaining"], period["ends_at"]) == ("paused", 12.5, None)
    await receive(page, "period_resumed", {"period": 1, "ends_at": 2000})
    period = await js(page, "return client.state.period")
    assert (period["state"], period["ends_at"], period["length"]) == ("running", 2000, 30)
    await receive(page, "period_end", {"period": 1, "group_decisions": {}, "payoffs": {"p1": 2}})
    assert await js(page, "return client.state.period.state") == "ended"


# Server clock 50 s ahead of this browser's: frames are stamped with local + 50 + a delay.
OFFSET = 50.0
MS = 0.001  # the fake clock keeps time to about a millisecond


async def freeze_clock(page: Page) -> None:
    """Stop the fake clock's natural flow: only run_for moves it, so delays are exact."""
    await page.clock.pause_at(await js(page, "return Date.now() / 1000 + 1"))  # seconds


async def offset_and_error(page: Page) -> list[float | None]:
    return await js(page, "return [client.state.serverOffset, client.state.clockError]")  # type: ignore[no-any-return]


async def test_clock_offset_from_the_least_delayed_frames(page: Page) -> None:
    await freeze_clock(page)
    await js(page, "window.t0 = Date.now(); start(); ws().open()")
    await page.clock.run_for(100)
    # The hello was stamped 40 ms after the connect and arrived 60 ms later: the offset is in
    # [50 - 0.06, 50 + 0.04], and the estimate is the lower edge.
    await js(page, f"ws().receive('hello', helloPayload(0), (t0 + 40) / 1000 + {OFFSET})")
    assert await offset_and_error(page) == [
        pytest.approx(OFFSET - 0.06, abs=MS),
        pytest.approx(0.1, abs=MS),
    ]

    # A quick round trip (10 ms, the ack stamped after 6): [50 - 0.004, 50 + 0.006].
    await js(page, "window.t1 = Date.now(); client.decide(0.5)")
    await page.clock.run_for(10)
    await js(page, f"ws().receive('ack', {{seq: 1}}, (t1 + 6) / 1000 + {OFFSET})")
    assert await offset_and_error(page) == [
        pytest.approx(OFFSET - 0.004, abs=MS),
        pytest.approx(0.01, abs=MS),
    ]

    # A slow round trip (800 ms) and a late broadcast add nothing; a broadcast 1 ms on its
    # way moves the lower edge up.
    await js(page, "window.t2 = Date.now(); client.decide(0.6)")
    await page.clock.run_for(800)
    await js(page, f"ws().receive('ack', {{seq: 2}}, (t2 + 100) / 1000 + {OFFSET})")
    late = f"(Date.now() - 300) / 1000 + {OFFSET}"
    await js(page, f"ws().receive('group_decisions', {{p1: 0.6}}, {late})")
    assert await offset_and_error(page) == [
        pytest.approx(OFFSET - 0.004, abs=MS),
        pytest.approx(0.01, abs=MS),
    ]
    quick = f"(Date.now() - 1) / 1000 + {OFFSET}"
    await js(page, f"ws().receive('group_decisions', {{p1: 0.6}}, {quick})")
    assert await offset_and_error(page) == [
        pytest.approx(OFFSET - 0.001, abs=MS),
        pytest.approx(0.007, abs=MS),
    ]

    # So the countdown is the server's: 20 s before ends_at on the server's clock.
    ends_at = await js(page, f"return Date.now() / 1000 + {OFFSET} + 20")
    left = await js(page, f"return {ends_at} - client.serverNow()")
    assert left == pytest.approx(20 + 0.001, abs=MS)


async def test_clock_offset_restarts_when_the_local_clock_is_set(page: Page) -> None:
    await freeze_clock(page)
    await js(page, "window.t0 = Date.now(); start(); ws().open()")
    await page.clock.run_for(20)
    await js(page, f"ws().receive('hello', helloPayload(0), (t0 + 10) / 1000 + {OFFSET})")
    assert await offset_and_error(page) == [
        pytest.approx(OFFSET - 0.01, abs=MS),
        pytest.approx(0.02, abs=MS),
    ]
    # The local clock is set 30 s ahead (the OS synchronised it): the server is now only 20 s
    # ahead. A late broadcast says nothing new (a lower bound below the old one), but the next
    # round trip's upper bound is below the old lower one: the bounds start again from it.
    await page.clock.set_system_time(await js(page, "return Date.now() / 1000 + 30"))
    await js(page, "ws().receive('group_decisions', {p1: 1}, Date.now() / 1000 + 19.9)")
    assert (await offset_and_error(page))[0] == pytest.approx(OFFSET - 0.01, abs=MS)
    await js(page, "window.t1 = Date.now(); client.decide(1)")
    await page.clock.run_for(10)
    await js(page, "ws().receive('ack', {seq: 1}, (t1 + 5) / 1000 + 20)")
    assert await offset_and_error(page) == [
        pytest.approx(20 - 0.005, abs=MS),
        pytest.approx(0.01, abs=MS),
    ]


async def test_an_older_hello_never_moves_last_seq_back(page: Page) -> None:
    # The server promises hello.last_seq >= every ack (PROTOCOL v2), but a hello that was
    # overtaken (an older connection's, reordered) must not make the client resend or renumber.
    await js(page, "start(); ws().open(); hello(0)")
    await js(page, "for (const v of [1, 2, 3, 4, 5]) client.send('decisions', v / 10)")
    await js(page, "ws().receive('ack', {seq: 5})")
    assert await js(page, "return client.state.lastSeq") == 5
    await js(page, "ws().serverClose(1006)")
    await page.clock.run_for(300)  # first retry: 250 ms with jitter
    await js(page, "ws().open(); hello(3)")

    assert await js(page, "return client.state.lastSeq") == 5
    assert await js(page, "return client.state.pending") == []
    assert await sent_seqs(page) == [], "nothing at or below the acked seq 5 is sent again"
    assert await js(page, "return client.send('decisions', 0.6)") == 6
    assert await sent_seqs(page) == [6]
