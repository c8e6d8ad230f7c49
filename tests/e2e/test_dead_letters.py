"""A dead letter is seen, on the real stack (issue 23, "No silent dead letters"): a frame that
decisions refuses (a newer major version) is kept by the store, counted in its metrics, listed
by `canopy dead-letters list` (the installed console script), and `canopy dead-letters redrive`
sends it back to the shard queue it came from, where it is refused again, so a second dead
letter comes, the first one marked redriven. Before, nothing consumed `canopy.dead`."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
import orjson
import pytest

from services.common.bus import BATCH_TYPE, INPUTS, input_key, shard_queue
from services.common.messages import new_id
from tests.e2e.protocol import create_session
from tests.e2e.test_cli import canopy, ok
from tests.e2e.test_newer_sender import dead_letters, newer_frame, publish, shards

pytestmark = [pytest.mark.e2e]

TIMEOUT = 10.0


async def run(*args: str, stack: Any) -> Any:
    return await asyncio.to_thread(canopy, *args, api=stack)


async def kept(api: httpx.AsyncClient, message_id: str, count: int) -> list[dict[str, Any]]:
    async with asyncio.timeout(TIMEOUT):
        while True:
            found = [d for d in await dead_letters(api) if d["message_id"] == message_id]
            if len(found) >= count:
                return found
            await asyncio.sleep(0.05)  # decisions refuses it, then the store keeps it


async def metric(stack: Any, queue: str) -> float:
    async with httpx.AsyncClient(base_url=stack.urls.store_url) as client:
        text = (await client.get("/metrics")).text
    name = f'canopy_store_dead_letters_total{{queue="{queue}",reason="rejected"}}'
    values = [float(line.split()[-1]) for line in text.splitlines() if line.startswith(name)]
    return values[0] if values else 0.0


async def test_a_dead_letter_is_listed_counted_and_redriven_by_the_cli(
    stack: Any, api: httpx.AsyncClient
) -> None:
    session = await create_session(api, label="dead letters")
    group = session["groups"][0]
    key = input_key(group["group"], shards(stack), "batch")
    queue = shard_queue(int(key.split(".")[1]))
    before = await metric(stack, queue)
    frame = newer_frame(session, group["participants"][0], 1, 0.5) | {"version": 2}
    message_id = new_id()
    await publish(stack, INPUTS, key, orjson.dumps([frame]), message_id, BATCH_TYPE)
    (dead,) = await kept(api, message_id, 1)
    assert await metric(stack, queue) == before + 1

    listed = ok(await run("dead-letters", "list", stack=stack))
    (line,) = [row for row in listed.splitlines() if dead["id"] in row]
    assert "dead" in line and queue in line and "rejected" in line and "version 2" in line
    assert "dead," in listed.splitlines()[-1]
    answer = json.loads(ok(await run("dead-letters", "list", "--json", stack=stack)))
    assert dead["id"] in {d["id"] for d in answer["dead_letters"]}

    redrove = ok(await run("dead-letters", "redrive", dead["id"], stack=stack))
    assert f"Redrove {dead['id']} to {INPUTS} with key '{key}' (redrive 1)." in redrove
    # Refused again (still version 2): a second dead letter, the first one marked redriven.
    second, first = await kept(api, message_id, 2)
    assert (first["id"], first["state"], first["redrives"]) == (dead["id"], "redriven", 1)
    assert (second["state"], second["redrives"]) == ("dead", 0)
    assert second["headers"]["x-canopy-redrive"] == f"{dead['id']}:1"
    assert await metric(stack, queue) == before + 2
    redriven = json.loads(
        ok(await run("dead-letters", "list", "--state", "redriven", "--json", stack=stack))
    )
    assert dead["id"] in {d["id"] for d in redriven["dead_letters"]}
    assert all(d["state"] == "redriven" for d in redriven["dead_letters"])

    unknown = await run("dead-letters", "redrive", "no-such-dead-letter", stack=stack)
    assert unknown.returncode == 1 and "404 not_found" in unknown.stderr, unknown.stderr
    neither = await run("dead-letters", "redrive", stack=stack)
    assert neither.returncode == 2 and "--all" in neither.stderr
