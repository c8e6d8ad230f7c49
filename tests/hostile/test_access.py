"""Access control of the running stack: the admin token on every researcher route, error
bodies without internals, no secret in any log, and listeners on the configured interface.

Least privilege (docs/operations.md, "Who holds which secret"): the internal token opens
`/internal` and never `/api`; each service process holds only its own secrets (the gateway
never the admin token); a monitor ticket opens one stream of one session; the console and the
participant pages carry a Content-Security-Policy; `CANOPY_GATEWAY_HOST` puts the gateway
alone on another interface.

Routes are enumerated from each service's own app (`create_app`), so a route added later
without the token check fails here.
"""

from __future__ import annotations

import os
import re
import secrets
from pathlib import Path
from typing import Any

import httpx
import pydantic
import pytest
from fastapi import FastAPI
from fastapi.routing import iter_route_contexts

from devstack.infra import free_port
from devstack.stack import SERVICES, start_stack
from services.decisions.app import create_app as decisions_app
from services.decisions.settings import DecisionsSettings
from services.gateway.app import create_app as gateway_app
from services.gateway.settings import GatewaySettings
from services.store.app import create_app as store_app
from services.store.settings import StoreSettings
from services.timers.app import create_app as timers_app
from services.timers.settings import TimersSettings
from tests.e2e.protocol import connect_group, create_session, session_body

pytestmark = [pytest.mark.e2e]

PROTECTED = ("/api", "/internal")
# What each service serves without the token: health, metrics, its API description, pages.
PUBLIC = {
    "/openapi.json",
    "/docs",
    "/docs/oauth2-redirect",
    "/redoc",
    "/healthz",
    "/readyz",
    "/metrics",
    "/",
    "/p/{key}",
    "/p/{key}/view",  # the generic page's live values: the seat key is the credential
    "/ws/{key}",
    "/join/{join_key}",  # the study link: its key is the credential (PROTOCOL v2)
    "/static",
    "/static/vendor",  # uPlot, for the participant pages and the console
    "/static/plugins/{experiment}.js",  # a plug-in experiment's participant page module
    "/static/console",  # the researcher console's script and styles
}
LEAKS = ("Traceback", 'File "', "services.", "site-packages", "pymongo", "aio_pika")


def service_apps() -> dict[str, FastAPI]:
    """Each service's app as its composition root builds it (nothing connects until started),
    each with only the secrets it holds in a deployment."""
    token = "route-enumeration-token-0123456789"
    internal = "route-enumeration-internal-0123456789"
    seat = "route-enumeration-seat-0123456789"
    return {
        "store": store_app(StoreSettings(admin_token=token, internal_token=internal)),
        "gateway": gateway_app(GatewaySettings(internal_token=internal, seat_secret=seat)),
        "decisions": decisions_app(DecisionsSettings(internal_token=internal)),
        "timers": timers_app(TimersSettings()),
    }


def concrete(path: str) -> str:
    return re.sub(r"\{[^}]+\}", "0123456789abcdef0123", path)


def assert_error(response: httpx.Response, status: int, code: str) -> None:
    assert response.status_code == status, (response.request.url, response.text)
    body = response.json()
    assert body["error"]["code"] == code, body
    assert body["error"]["message"]
    for leak in LEAKS:
        assert leak not in response.text, response.text


async def test_every_researcher_route_needs_the_token(stack: Any) -> None:
    urls = {
        "store": stack.urls.store_url,
        "gateway": stack.urls.gateway_url,
        "decisions": stack.urls.decisions_url,
        "timers": stack.urls.timers_url,
    }
    protected: list[tuple[str, str, str]] = []
    for service, app in service_apps().items():
        for route in iter_route_contexts(app.routes):
            path = route.path or ""
            if path.startswith(PROTECTED):
                for method in sorted(route.methods or {"GET"}):
                    protected.append((service, method, path))
            else:
                assert path in PUBLIC, f"{service} serves {path} without the token: intended?"
    paths = {path for _, _, path in protected}
    assert {"/api/sessions", "/api/sessions/{session_id}/events"} <= paths
    assert "/internal/seats/{key}" in paths
    wrong = [
        {},
        {"Authorization": "Bearer"},
        {"Authorization": "Bearer wrong-token"},
        {"Authorization": f"Bearer {stack.urls.admin_token}x"},
        {"Authorization": f"Basic {stack.urls.admin_token}"},
        {"Authorization": stack.urls.admin_token},
        {"Authorization": f"Bearer {stack.urls.internal_token}x"},
    ]
    async with httpx.AsyncClient(timeout=10) as client:
        for service, method, path in protected:
            for headers in wrong:
                response = await client.request(
                    method,
                    urls[service] + concrete(path),
                    headers=headers | {"content-type": "application/json"},
                    content=b'{"not": json',  # a body is never looked at before the token
                )
                assert_error(response, 401, "unauthorized")
                assert response.headers.get("www-authenticate") == "Bearer"


async def test_error_bodies_hold_no_internals(api: httpx.AsyncClient) -> None:
    assert_error(await api.get("/api/nowhere"), 404, "not_found")
    assert_error(await api.get("/api/sessions/nope"), 404, "not_found")
    assert_error(await api.put("/api/sessions"), 405, "method_not_allowed")
    assert_error(await api.post("/api/sessions", json={"experiment": 1}), 422, "invalid_request")
    assert_error(
        await api.post(
            "/api/sessions", content=b"\xff\xfe", headers={"content-type": "application/json"}
        ),
        422,
        "invalid_request",
    )
    assert_error(
        await api.get("/api/sessions/x/events", params={"format": "exe"}), 422, "invalid_request"
    )
    async with httpx.AsyncClient(base_url=str(api.base_url), timeout=10) as anonymous:
        assert_error(await anonymous.get("/api/sessions"), 401, "unauthorized")
        assert_error(await anonymous.get("/internal/groups/x"), 401, "unauthorized")


async def test_the_token_is_never_logged(
    stack: Any, api: httpx.AsyncClient, gateway_url: str
) -> None:
    token = stack.urls.admin_token
    session = await create_session(api)
    codes = [p["code"] for p in session["participants"]]
    members = await connect_group(gateway_url, codes)  # the gateway looks the codes up
    await members[0].send(0.5, seq=1)
    await members[0].ack(1)
    for member in members:
        await member.close()
    await api.get(f"/api/sessions/{session['session']}")
    await api.get(f"/api/sessions/{session['session']}/events")
    await api.get("/api/nowhere", params={"token": token})
    async with httpx.AsyncClient(base_url=stack.urls.store_url, timeout=10) as client:
        await client.get("/", params={"token": token})  # the monitor page's link
        await client.get("/api/sessions", headers={"Authorization": f"Bearer {token[:-2]}"})
        await client.get("/api/sessions", headers={"Authorization": f"Bearer {token}"})
        for path in ("/metrics", "/readyz", "/openapi.json"):
            assert token not in (await client.get(path)).text
    logs = service_logs(Path(stack.logs_dir))
    assert set(logs) >= {f"{name}.log" for name in ("store", "gateway", "decisions", "timers")}
    secrets_held = {
        "the admin token": token,
        "the internal token": stack.urls.internal_token,
        "the seat secret": stack.env["CANOPY_SEAT_SECRET"],
    }
    for name, text in logs.items():
        for what, value in secrets_held.items():
            assert value not in text, f"{what} is in {name}"


def service_logs(folder: Path) -> dict[str, str]:
    return {log.name: log.read_text(errors="replace") for log in sorted(folder.glob("*.log"))}


def listening_sockets(pid: int) -> list[tuple[str, int]]:
    """(address, port) of every TCP socket process `pid` listens on (from /proc)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    found = []
    for table, family in (("tcp", 4), ("tcp6", 6)):
        for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            local, state, inode = fields[1], fields[3], fields[9]
            if state != "0A" or inode not in inodes:  # 0A: LISTEN
                continue
            address, port = local.split(":")
            raw = bytes.fromhex(address)
            if family == 4:
                host = ".".join(str(b) for b in raw[::-1])
            else:  # four little-endian 32-bit words
                words = [raw[i : i + 4][::-1] for i in range(0, 16, 4)]
                host = ":".join(b"".join(words).hex()[i : i + 4] for i in range(0, 32, 4))
            found.append((host, int(port, 16)))
    return found


def test_services_listen_on_the_configured_interface_only(stack: Any) -> None:
    host = stack.env["CANOPY_HOST"]
    assert host == "127.0.0.1"
    for name, process in stack.processes.items():
        sockets = listening_sockets(process.pid)
        assert (host, stack.ports[name]) in sockets, (name, sockets)
        for address, port in sockets:
            assert address == host, f"{name} listens on {address}:{port}"


LOOPBACK = {"127.0.0.1", "0000:0000:0000:0000:0000:0000:0000:0001"}


def test_the_broker_and_database_listen_on_loopback_only(stack: Any) -> None:
    """RabbitMQ, its epmd and nx-27017 of the test stack: every process carrying the
    devstack marker of this stack's infra folder (see devstack.infra)."""
    marker = f"DEVSTACK_RUN_DIR={stack.infra.run_dir}".encode()
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if marker not in (entry / "environ").read_bytes().split(b"\0"):
                continue
            sockets = listening_sockets(int(entry.name))
            command = (entry / "cmdline").read_bytes().split(b"\0")[0].decode()
        except OSError:
            continue  # gone meanwhile, or not ours to read
        if sockets:
            found[f"{entry.name} {command}"] = sockets
    assert len(found) >= 6, found  # four services, the broker, its epmd, the database
    for process, sockets in found.items():
        assert {address for address, _ in sockets} <= LOOPBACK, (process, sockets)


# -- least privilege -------------------------------------------------------------------------


def store_routes(prefix: str) -> list[tuple[str, str]]:
    """(method, path) of every store route under `prefix`."""
    return [
        (method, route.path or "")
        for route in iter_route_contexts(
            store_app(StoreSettings(admin_token="route-enumeration-token-0123456789")).routes
        )
        if (route.path or "").startswith(prefix)
        for method in sorted(route.methods or {"GET"})
    ]


def bearer_of(stack: Any, service: str) -> str:
    """The token `service` sends the store: its internal token (or, a deployment with one
    secret, the admin token it would send as it is or derive from)."""
    environment = process_environment(stack.processes[service].pid)
    return environment.get("CANOPY_INTERNAL_TOKEN") or environment["CANOPY_ADMIN_TOKEN"]


async def test_the_gateways_token_opens_internal_and_never_api(stack: Any) -> None:
    """What the gateway and decisions hold: every `/api` route refuses it; every `/internal`
    route takes it, and the admin token too (a superset role)."""
    internal = bearer_of(stack, "gateway")
    assert internal == bearer_of(stack, "decisions")
    api_routes, internal_routes = store_routes("/api"), store_routes("/internal")
    assert len(api_routes) > 10 and len(internal_routes) > 5
    async with httpx.AsyncClient(base_url=stack.urls.store_url, timeout=10) as client:
        for method, path in api_routes:
            response = await client.request(
                method, concrete(path), headers={"Authorization": f"Bearer {internal}"}
            )
            assert_error(response, 401, "unauthorized")
        for token in (internal, stack.urls.admin_token):
            for method, path in internal_routes:
                response = await client.request(
                    method,
                    concrete(path),
                    headers={"Authorization": f"Bearer {token}"},
                    json={},  # a body where one is read: refused for what it says, if at all
                )
                assert response.status_code != 401, (method, path, response.text)
    assert internal == stack.urls.internal_token != stack.urls.admin_token


def process_environment(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    pairs = (entry.decode(errors="replace").partition("=") for entry in raw if entry)
    return {name: value for name, _, value in pairs}


def test_each_service_process_holds_only_its_own_secrets(stack: Any) -> None:
    """make run's processes (devstack.stack.service_env): the internet-facing gateway holds
    the internal token and the seat secret, never the admin token; timers holds no token."""
    admin = stack.urls.admin_token
    internal, seat = stack.env.get("CANOPY_INTERNAL_TOKEN"), stack.env.get("CANOPY_SEAT_SECRET")
    assert internal and seat, "make run gives the internal token and the seat secret"
    expected = {
        "store": {admin, internal, seat},
        "gateway": {internal, seat},
        "decisions": {internal},
        "timers": set(),
    }
    for name, process in stack.processes.items():
        environment = process_environment(process.pid)
        values = set(environment.values())
        held = {secret for secret in (admin, internal, seat) if secret in values}
        assert held == expected[name], name
        # Nor under another name, nor a URL carrying it.
        text = "\0".join(f"{k}={v}" for k, v in environment.items())
        for secret in {admin, internal, seat} - expected[name]:
            assert secret not in text, name
    gateway = process_environment(stack.processes["gateway"].pid)
    assert "CANOPY_MONGO_URL" not in gateway and "CANOPY_ADMIN_TOKEN" not in gateway


def test_a_service_starts_with_its_share_of_the_secrets_only() -> None:
    """Settings: the gateway needs the internal token and the seat secret (or, a deployment
    with one secret, the admin token they derive from); timers needs no token."""
    strong = "Zx9-kq2LmPw7rT4vB8nY"
    other = "Qp4-Hn7sWd2xKc9mLt5R"
    GatewaySettings(env="production", internal_token=strong, seat_secret=other)
    DecisionsSettings(env="production", internal_token=strong)
    TimersSettings(env="production")
    for refused in (
        lambda: GatewaySettings(env="production", internal_token=strong),
        lambda: GatewaySettings(env="production", seat_secret=other),
        lambda: DecisionsSettings(env="production"),
        lambda: StoreSettings(env="production", internal_token=strong),
        lambda: GatewaySettings(env="production", internal_token="changeme", seat_secret=other),
        lambda: StoreSettings(env="production", admin_token=strong, internal_token=strong),
    ):
        with pytest.raises(pydantic.ValidationError) as error:
            refused()
        assert strong not in str(error.value) and other not in str(error.value)
    from services.common.settings import derive_internal_token

    # One secret (as before): the internal token is derived, never the admin token itself.
    legacy = GatewaySettings(env="production", admin_token=strong)
    assert legacy.internal_bearer() == derive_internal_token(strong) != strong
    assert StoreSettings(admin_token=strong).internal_bearer() == legacy.internal_bearer()


async def test_a_ticket_opens_one_stream_of_its_own_session(
    api: httpx.AsyncClient, stack: Any
) -> None:
    first = (await create_session(api))["session"]
    second = (await create_session(api))["session"]

    async def ticket(session: str) -> str:
        response = await api.post("/api/monitor/tickets", json={"session": session})
        assert response.status_code == 201, response.text
        value: str = response.json()["ticket"]
        return value

    refused = await api.post("/api/monitor/tickets")  # whose stream? it must say
    assert_error(refused, 422, "invalid_request")
    async with httpx.AsyncClient(base_url=stack.urls.store_url, timeout=10) as anonymous:
        for_first = await ticket(first)
        other = await anonymous.get(f"/api/sessions/{second}/live", params={"ticket": for_first})
        assert_error(other, 401, "unauthorized")
        url = f"/api/sessions/{first}/live"
        async with anonymous.stream("GET", url, params={"ticket": for_first}) as opened:
            assert opened.status_code == 200
        again = await anonymous.get(url, params={"ticket": for_first})
        assert_error(again, 401, "unauthorized")  # used: a copied URL opens nothing


async def test_the_console_and_the_pages_carry_a_content_security_policy(
    api: httpx.AsyncClient, stack: Any
) -> None:
    participant = (await create_session(api))["participants"][0]
    async with httpx.AsyncClient(timeout=10) as client:
        console = await client.get(f"{stack.urls.store_url}/")
        page = await client.get(participant["url"])
        study = await client.get(f"{stack.urls.gateway_url}/join/{'x' * 32}")  # not valid
        docs = await client.get(f"{stack.urls.store_url}/docs")
        script = await client.get(f"{stack.urls.gateway_url}/static/page.js")
    assert console.status_code == 200 and page.status_code == 200 and study.status_code == 404
    for response in (console, page, study):
        policy = response.headers.get("content-security-policy", "")
        directives = dict(d.split(" ", 1) for d in policy.split("; ") if " " in d)
        assert directives.get("default-src") == "'none'", response.request.url
        assert directives["script-src"] == "'self'"  # no inline code, no other origin
        assert directives["connect-src"] == "'self'"  # its socket and API calls: home only
        assert "unsafe" not in policy.replace("style-src-attr 'unsafe-inline'", "")
        # The console acts with the admin token: nobody may frame it (clickjacking).
        assert (directives.get("frame-ancestors") == "'none'") == (response is console)
    assert "content-security-policy" not in docs.headers  # FastAPI's, with its CDN
    assert "content-security-policy" not in script.headers  # a policy is a document's


def test_make_run_can_put_only_the_gateway_on_another_interface(infra: Any) -> None:
    """CANOPY_GATEWAY_HOST (a lab network): the gateway listens there, and participants'
    links name it; the store, decisions and timers stay on 127.0.0.1. 127.0.0.2 stands for
    the lab address (every 127/8 address is this machine's)."""
    ports = {name: free_port() for name in SERVICES}
    overrides = {
        "CANOPY_GATEWAY_HOST": "127.0.0.2",
        "CANOPY_MONGO_DB": f"test_{secrets.token_hex(4)}",
    }
    with start_stack(infra, infra.run_dir, env_overrides=overrides, ports=ports) as lab:
        assert lab.urls.gateway_url == f"http://127.0.0.2:{ports['gateway']}"
        assert lab.env["CANOPY_PUBLIC_URL"] == lab.urls.gateway_url
        for name, process in lab.processes.items():
            host = "127.0.0.2" if name == "gateway" else "127.0.0.1"
            assert listening_sockets(process.pid) == [(host, ports[name])], name
        created = httpx.post(
            f"{lab.urls.store_url}/api/sessions",
            json=session_body(),
            headers={"Authorization": f"Bearer {lab.urls.admin_token}"},
            timeout=10,
        )
        assert created.status_code == 201, created.text
        link = created.json()["participants"][0]["url"]
        assert link.startswith(f"http://127.0.0.2:{ports['gateway']}/p/")
        assert httpx.get(link, timeout=10).status_code == 200  # the page, through the lab side
