"""Access control of the running stack: the admin token on every researcher route, error
bodies without internals, no secret in any log, and listeners on the configured interface.

Routes are enumerated from each service's own app (`create_app`), so a route added later
without the token check fails here.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from fastapi.routing import iter_route_contexts

from services.decisions.app import create_app as decisions_app
from services.decisions.settings import DecisionsSettings
from services.gateway.app import create_app as gateway_app
from services.gateway.settings import GatewaySettings
from services.store.app import create_app as store_app
from services.store.settings import StoreSettings
from services.timers.app import create_app as timers_app
from services.timers.settings import TimersSettings
from tests.e2e.protocol import connect_group, create_session

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
    "/ws/{key}",
    "/join/{join_key}",  # the study link: its key is the credential (PROTOCOL v2)
    "/static",
    "/static/vendor",  # uPlot, for the participant pages and the console
    "/static/plugins/{experiment}.js",  # a plug-in experiment's participant page module
    "/static/console",  # the researcher console's script and styles
}
LEAKS = ("Traceback", 'File "', "services.", "site-packages", "pymongo", "aio_pika")


def service_apps() -> dict[str, FastAPI]:
    """Each service's app as its composition root builds it (nothing connects until started)."""
    token = "route-enumeration-token-0123456789"
    return {
        "store": store_app(StoreSettings(admin_token=token)),
        "gateway": gateway_app(GatewaySettings(admin_token=token)),
        "decisions": decisions_app(DecisionsSettings(admin_token=token)),
        "timers": timers_app(TimersSettings(admin_token=token)),
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
    for name, text in logs.items():
        assert token not in text, f"the admin token is in {name}"


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
