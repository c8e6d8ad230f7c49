"""The `canopy` command, run as the installed console script against real stacks: create a
session from a JSON and a TOML session-config file (and refuse a bad one, creating nothing),
list sessions, play a session with `canopy bots`, export it byte for byte as the API does,
replay it, take an online study's settings from a file and download its payments file in each
format as the API sends it, and reset a `make run` folder (refused while it runs, asked first,
then empty)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.e2e.protocol import TIMEOUT
from tests.faults.conftest import start_supervised

pytestmark = [pytest.mark.e2e]

CANOPY = str(Path(sys.executable).parent / "canopy")
PERIOD = 2.0


def canopy(
    *args: str,
    api: Any = None,
    env: dict[str, str] | None = None,
    input: str | None = None,
    timeout: float = 30,
) -> subprocess.CompletedProcess[str]:
    """Run `canopy`; `api`: a stack whose URL and token are passed as flags."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("CANOPY_")}
    flags = ["--api", api.urls.store_url, "--token", api.urls.admin_token] if api else []
    return subprocess.run(
        [CANOPY, *flags, *args],
        env=base | (env or {}),
        input=input or "",
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout}\n{result.stderr}"
    return result.stdout


@pytest.fixture
def client(stack: Any) -> Any:
    with httpx.Client(
        base_url=stack.urls.store_url,
        headers={"Authorization": f"Bearer {stack.urls.admin_token}"},
        timeout=10,
    ) as c:
        yield c


JSON_CONFIGS = {
    "session_config_defaults": {"num_periods": 1, "rate_limit": 0.0, "params": {"mpcr": 0.5}},
    "session_configs": [
        {
            "name": "pg",
            "experiment": "public_goods",
            "num_participants": 4,
            "group_size": 2,
            "period_length": PERIOD,
            "params": {"endowment": 10},
        },
        {"name": "plain", "experiment": "decisions", "num_participants": 2, "group_size": 2,
         "period_length": 30},
    ],
}  # fmt: skip

TOML_CONFIG = """
[session_config_defaults]
period_length = 45
on_disconnect = "pause"

[[session_configs]]
name = "pd"
experiment = "bimatrix"
num_participants = 2
group_size = 2
label = "pilot 1"
[session_configs.params]
game = "stag_hunt"
"""


def test_create_session_from_json_and_toml_configs_prints_every_link(
    stack: Any, client: httpx.Client, tmp_path: Path
) -> None:
    config = tmp_path / "sessions.json"
    config.write_text(json.dumps(JSON_CONFIGS))
    out = ok(canopy("create-session", str(config), "--name", "pg", api=stack))
    session_id = out.split()[1]
    detail = client.get(f"/api/sessions/{session_id}").json()
    assert detail["experiment"] == "public_goods" and detail["label"] == "pg"
    assert detail["params"] == {"mpcr": 0.5, "endowment": 10}  # defaults merged under the config
    assert len(detail["groups"]) == 2
    for participant in detail["participants"]:
        assert participant["url"] in out

    toml = tmp_path / "sessions.toml"
    toml.write_text(TOML_CONFIG)
    # The environment instead of flags, and a flag over the file's value.
    env = {"CANOPY_STORE_URL": stack.urls.store_url, "CANOPY_ADMIN_TOKEN": stack.urls.admin_token}
    answer = json.loads(
        ok(canopy("create-session", str(toml), "--num-periods", "2", "--json", env=env))
    )
    detail = client.get(f"/api/sessions/{answer['session']}").json()
    assert (detail["experiment"], detail["label"], detail["on_disconnect"]) == (
        "bimatrix",
        "pilot 1",
        "pause",
    )
    assert (detail["num_periods"], detail["period_length"]) == (2, 45)
    assert detail["params"] == {"game": "stag_hunt", "initial_decision": 0.5}  # v2: defaults

    # Flags alone, with params as KEY=JSON.
    out = ok(
        canopy(
            "create-session", "--experiment", "bimatrix", "--num-participants", "2",
            "--group-size", "2", "--period-length", "30", "--param", "initial_decision=0.25",
            api=stack,
        )
    )  # fmt: skip
    detail = client.get(f"/api/sessions/{out.split()[1]}").json()
    assert detail["params"] == {"game": "prisoners_dilemma", "initial_decision": 0.25}


def test_a_bad_config_is_refused_with_the_apis_reason_and_creates_nothing(
    stack: Any, client: httpx.Client, tmp_path: Path
) -> None:
    before = len(client.get("/api/sessions").json()["sessions"])
    config = tmp_path / "bad.json"
    config.write_text(json.dumps(JSON_CONFIGS))
    result = canopy("create-session", str(config), api=stack)  # two configs, no --name
    assert result.returncode == 1 and "--name" in result.stderr and "pg, plain" in result.stderr
    result = canopy("create-session", str(config), "--name", "nope", api=stack)
    assert result.returncode == 1 and "no session config named 'nope'" in result.stderr
    config.write_text('{"experiment": "bimatrix", "num_participants": 3, "group_size": 2,'
                      ' "period_length": 10, "params": {"game": "chess"}}')  # fmt: skip
    result = canopy("create-session", str(config), api=stack)
    assert result.returncode == 1
    assert "422 invalid_request" in result.stderr and "field params.game" in result.stderr
    (tmp_path / "broken.toml").write_text("experiment = ")
    result = canopy("create-session", str(tmp_path / "broken.toml"), api=stack)
    assert result.returncode == 1 and "not valid TOML" in result.stderr
    result = canopy("--api", stack.urls.store_url, "--token", "wrong-token-01234", "sessions")
    assert result.returncode == 1 and "401 unauthorized" in result.stderr
    assert len(client.get("/api/sessions").json()["sessions"]) == before


def test_bots_play_then_export_and_replay_equal_the_api(
    stack: Any, client: httpx.Client, tmp_path: Path
) -> None:
    config = tmp_path / "sessions.json"
    config.write_text(json.dumps(JSON_CONFIGS))
    session = ok(canopy("create-session", str(config), "--name", "pg", api=stack)).split()[1]

    listed = ok(canopy("sessions", api=stack))
    assert session in listed and "public_goods" in listed and "0/4" in listed

    out = ok(canopy("bots", session, "--rate", "10", "--seed", "3", api=stack))
    for participant in client.get(f"/api/sessions/{session}").json()["participants"]:
        assert participant["code"] in out
    assert out.count("done") == 4  # every bot played to the period's end

    # The log is written in batches: once the API's replay has both groups' period and the
    # bots' departures (logged after the period's end) are in, the export no longer changes.
    def replayed() -> dict[str, Any]:
        answer: dict[str, Any] = client.get(f"/api/sessions/{session}/replay").json()
        return answer

    wait_until_replayed(replayed, TIMEOUT)
    wait_until_departed(client, session, 4, TIMEOUT)
    for fmt in ("csv", "jsonl"):
        expected = client.get(f"/api/sessions/{session}/events", params={"format": fmt}).content
        target = tmp_path / f"events.{fmt}"
        result = canopy("export", session, "--format", fmt, "-o", str(target), api=stack)
        ok(result)
        assert target.read_bytes() == expected
        events = expected.count(b"\n") - (1 if fmt == "csv" else 0)
        assert f"{events} events" in result.stderr
        assert not list(tmp_path.glob(".*.part"))
    stdout = subprocess.run(
        [CANOPY, "--api", stack.urls.store_url, "--token", stack.urls.admin_token,
         "export", session],
        capture_output=True, timeout=30, check=True,
    ).stdout  # fmt: skip
    assert stdout == client.get(f"/api/sessions/{session}/events").content
    assert stdout.count(b",decisions,") >= 4  # the bots' frames are in the log

    assert json.loads(ok(canopy("replay", session, "--json", api=stack))) == replayed()
    table = ok(canopy("replay", session, api=stack))
    for group in replayed()["groups"]:
        for code, payoff in group["periods"][0]["payoffs"].items():
            assert code in table and f"{payoff:.4f}" in table

    result = canopy("export", "no-such-session", api=stack)
    assert result.returncode == 1 and "404 not_found" in result.stderr


STUDY_CONFIG = """
name = "prolific pilot"
experiment = "public_goods"
num_participants = 4
group_size = 2
period_length = 2.0
labels = ["P1", "P2", "P3", "P4"]
label_param = "PROLIFIC_PID"
[params]
endowment = 10
mpcr = 0.5
[completion.completed]
url = "https://app.prolific.com/submissions/complete?cc=C0DE"
[payment]
exchange_rate = 0.1
show_up_fee = 1.5
currency = "GBP"
"""


def test_an_online_studys_settings_from_a_file_then_its_payments_in_each_format(
    stack: Any, client: httpx.Client, tmp_path: Path
) -> None:
    config = tmp_path / "study.toml"
    config.write_text(STUDY_CONFIG)
    out = ok(canopy("create-session", str(config), api=stack))
    session = out.split()[1]
    detail = client.get(f"/api/sessions/{session}").json()
    assert f"study link: {detail['join_url']}" in out
    assert detail["label_param"] == "PROLIFIC_PID"
    assert detail["completion"] == {
        "completed": {"url": "https://app.prolific.com/submissions/complete?cc=C0DE"}
    }
    assert detail["payment"] == {"exchange_rate": 0.1, "show_up_fee": 1.5, "currency": "GBP"}
    assert [p["label"] for p in detail["participants"]] == ["P1", "P2", "P3", "P4"]

    ok(canopy("bots", session, "--rate", "10", "--seed", "5", api=stack))

    def paid() -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = client.get(
            f"/api/sessions/{session}/payments", params={"format": "json"}
        ).json()["payments"]
        return rows

    deadline = time.monotonic() + TIMEOUT
    while not all(row["bonus"] > 0 for row in paid()):  # public goods: every payoff ≥ 5
        assert time.monotonic() < deadline, f"payoffs never reached the payments: {paid()}"
        time.sleep(0.05)  # polling the store's API: it has no event to wait on
    rows = paid()
    assert [row["label"] for row in rows] == ["P1", "P2", "P3", "P4"]
    for fmt in ("csv", "json", "prolific"):
        expected = client.get(f"/api/sessions/{session}/payments", params={"format": fmt})
        target = tmp_path / f"payments.{fmt}"
        result = canopy("payments", session, "--format", fmt, "-o", str(target), api=stack)
        ok(result)
        assert target.read_bytes() == expected.content
        assert "4 payment rows" in result.stderr
        assert ok(canopy("payments", session, "--format", fmt, api=stack)) == expected.text
    assert (tmp_path / "payments.prolific").read_text().splitlines() == [
        f"{row['label']},{row['bonus']:.2f}" for row in rows
    ]
    assert (tmp_path / "payments.csv").read_text().splitlines()[0] == (
        "label,code,outcome,total_payoff,bonus,show_up_fee,currency"
    )
    assert not list(tmp_path.glob(".*.part"))
    result = canopy("payments", "no-such-session", api=stack)
    assert result.returncode == 1 and "404 not_found" in result.stderr


def wait_until_departed(client: httpx.Client, session: str, count: int, timeout: float) -> None:
    """Until the log holds `count` presence rows of members leaving (the bots' sockets closed
    when `canopy bots` exited; the rows come in the next log batch)."""
    deadline = time.monotonic() + timeout
    while True:
        export = client.get(f"/api/sessions/{session}/events", params={"format": "jsonl"})
        rows = [json.loads(line) for line in export.text.splitlines() if line]
        left = [r for r in rows if r["channel"] == "presence" and not r["value"]["connected"]]
        if len(left) >= count:
            return
        assert time.monotonic() < deadline, f"only {len(left)} departures logged"
        time.sleep(0.05)  # polling the store's API: it has no event to wait on


def wait_until_replayed(replay: Any, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not all(g["periods"] for g in replay()["groups"]):
        assert time.monotonic() < deadline, "the replay never showed the ended period"
        time.sleep(0.05)  # polling the store's API: it has no event to wait on


@pytest.mark.timeout(180)
def test_reset_refuses_while_make_run_runs_asks_first_then_wipes() -> None:
    with start_supervised() as supervised:
        run_dir = supervised.run_dir
        # No --api / --token: the CLI finds make run's own from its state file.
        out = ok(
            canopy(
                "--run-dir", str(run_dir), "create-session", "--experiment", "decisions",
                "--num-participants", "2", "--group-size", "2", "--period-length", "30",
            )
        )  # fmt: skip
        session = out.split()[1]
        assert session in ok(canopy("--run-dir", str(run_dir), "sessions"))
        refused = canopy("reset", "--run-dir", str(run_dir), "--yes")
        assert refused.returncode == 1 and "in use by a running `make run`" in refused.stderr

        supervised.stop()
        assert (run_dir / "mongo").exists()
        declined = canopy("reset", "--run-dir", str(run_dir), input="n\n")
        assert declined.returncode == 1 and "Delete every session" in declined.stderr
        assert (run_dir / "mongo").exists(), "a declined reset deletes nothing"
        done = canopy("reset", "--run-dir", str(run_dir), input="y\n")
        assert "empty database" in ok(done)
        assert not (run_dir / "mongo").exists() and not (run_dir / "rabbitmq" / "mnesia").exists()
        assert (run_dir / "logs").exists(), "logs are kept"

        supervised.relaunch()
        assert "No sessions." in ok(canopy("--run-dir", str(run_dir), "sessions"))


def test_experiments_lists_the_loaded_plug_ins_with_their_source_and_decision(stack: Any) -> None:
    """`canopy experiments`: what the store loaded (issue 21), built-ins and plug-ins alike."""
    listed = json.loads(ok(canopy("experiments", "--json", api=stack)))
    by_name = {info["name"]: info for info in listed["experiments"]}
    assert by_name["public_goods"]["source"] == "built-in"
    assert by_name["cournot"]["source"].startswith("entry point")  # tests/plugins/site
    text = ok(canopy("experiments", api=stack, env={"COLUMNS": "250"}))
    rows = {line.split()[0]: line for line in text.splitlines() if line.split()}
    assert "built-in" in rows["public_goods"] and "number 0–20 points" in rows["public_goods"]
    assert "a mix of Cooperate, Defect" in rows["bimatrix"]
    assert "entry point" in rows["cournot"] and "canopy-cournot" in rows["cournot"]
