"""The gateway's page routing (services/gateway/pages.py) against a fake store directory:
which module each experiment's page loads, the embedded config, and the answers when the
key is unknown (or a code stands where the key belongs) or the store cannot be reached. The
real store is in tests/browser/."""

from __future__ import annotations

import json
import re
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from services.common.directory import GroupConfig, NotFound, ParticipantInfo
from services.common.experiments import Registry
from services.common.seats import new_key
from services.gateway.pages import declared_decision, page_router

CODE = "p1abc"
SECRET = b"s" * 32
KEY = new_key(SECRET)


class FakeDirectory:
    """Answers as the store's /internal look-ups would, or fails as an unreachable store."""

    def __init__(self, experiment: str, params: dict[str, Any], *, down: bool = False) -> None:
        self.experiment = experiment
        self.params = params
        self.down = down

    async def seat(self, key: str) -> ParticipantInfo:
        if self.down:
            raise httpx.ConnectError("store down")
        if key != KEY:
            raise NotFound("unknown seat")
        return ParticipantInfo(
            participant=CODE, session="s1", group="g1", id_in_group=1, experiment=self.experiment
        )

    async def group(self, group: str) -> GroupConfig:
        return GroupConfig(
            session="s1",
            group=group,
            experiment=self.experiment,
            members=[CODE, "p2abc"],
            num_periods=2,
            period_length=30,
            num_subperiods=3,
            rate_limit=0,
            params=self.params,
            on_disconnect="pause",
        )


async def get(directory: FakeDirectory, path: str) -> httpx.Response:
    app = FastAPI()
    app.include_router(page_router(directory, SECRET))  # type: ignore[arg-type]
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as client:
        return await client.get(path)


def embedded(html: str) -> tuple[str, dict[str, Any]]:
    module = re.search(r'<script type="module" src="([^"]+)"></script>', html)
    config = re.search(r'<script type="application/json" id="canopy-config">(.*?)</script>', html)
    assert module and config, html
    return module.group(1), json.loads(config.group(1))


@pytest.mark.parametrize(
    ("experiment", "params", "module", "shown"),
    [
        ("decisions", {}, "/static/decisions.js", {}),
        (
            "bimatrix",
            {"game": "hawk_dove"},
            "/static/bimatrix.js",
            {
                "payoff_matrix": [[[0, 0], [3, 1]], [[1, 3], [2, 2]]],
                "game": "hawk_dove",
                "initial_decision": 0.5,
            },
        ),
        ("public_goods", {"mpcr": 0.3}, "/static/public_goods.js", {"endowment": 20, "mpcr": 0.3}),
        (
            "double_auction",
            {},
            "/static/double_auction.js",
            {
                "buyer_value": 100,
                "seller_cost": 0,
                "max_open_orders": 20,
                "max_price": 1_000_000,
                "max_quantity": 1_000,
                "book_depth": 50,
            },
        ),
        ("not_installed_here", {"x": 1}, "/static/generic.js", {"x": 1}),
    ],
)
async def test_each_experiment_gets_its_page_and_params_with_defaults(
    experiment: str, params: dict[str, Any], module: str, shown: dict[str, Any]
) -> None:
    response = await get(FakeDirectory(experiment, params), f"/p/{KEY}")
    assert response.status_code == 200
    assert response.headers["cache-control"] == "no-store"
    found_module, config = embedded(response.text)
    assert found_module == module
    # What the experiment declares a decision to be (the generic page's control; issue 21).
    assert config.pop("decision") == declared_decision(Registry.builtin(), experiment, params)
    assert config == {
        "participant": CODE,
        "experiment": experiment,
        "id_in_group": 1,
        "members": [CODE, "p2abc"],
        "num_periods": 2,
        "period_length": 30.0,
        "num_subperiods": 3,
        "on_disconnect": "pause",
        "params": shown,
    }


async def test_an_unknown_key_or_a_code_gets_404_and_no_seat_data() -> None:
    unknown = new_key(SECRET)  # well-formed, names no seat
    forged = new_key(b"another deployment's secret")
    for path in [f"/p/{CODE}", "/p/nobody", "/p/%3Cb%3E%3C!--", f"/p/{unknown}", f"/p/{forged}"]:
        response = await get(FakeDirectory("decisions", {}), path)
        assert response.status_code == 404, path
        module, config = embedded(response.text)
        assert module == "/static/generic.js"
        assert config == {"participant": None, "experiment": None}
        assert CODE not in response.text and "p2abc" not in response.text
    assert "<b><!--" not in response.text  # never echoed as markup


async def test_an_unreachable_store_gets_a_page_that_retries() -> None:
    response = await get(FakeDirectory("decisions", {}, down=True), f"/p/{KEY}")
    assert response.status_code == 503
    assert response.headers["retry-after"] == "3"
    assert '<meta http-equiv="refresh" content="3">' in response.text


async def test_no_plugin_module_for_an_experiment_without_one() -> None:
    response = await get(FakeDirectory("decisions", {}), "/static/plugins/decisions.js")
    assert response.status_code == 404
