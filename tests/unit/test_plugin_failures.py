"""A plug-in that failed to load is left out of the registry (services.common.experiments), and
a researcher meets that as a clear error: the session's 422 names the plug-in and its error,
and `GET /api/experiments` lists the failures (`canopy experiments` prints them)."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from services.common import experiments
from services.store.domain import CreateSession

FAILED = {"canopy_broken:Broken": "ImportError('no module named numpyy')"}


def store_with(failures: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> type[CreateSession]:
    """The session model of a store whose registry lists these failed plug-ins."""
    registry = experiments.Registry.builtin()
    monkeypatch.setattr(registry, "failures", lambda: failures)
    return CreateSession.of(registry)


def test_a_session_of_a_plug_in_that_failed_to_load_says_so(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    sessions = store_with(FAILED, monkeypatch)
    with pytest.raises(ValidationError) as refused:
        sessions(experiment="broken", num_participants=2, group_size=2, period_length=10)
    message = str(refused.value)
    assert "unknown experiment 'broken'" in message
    assert "1 plug-in(s) failed to load: canopy_broken:Broken (ImportError" in message


def test_without_failures_the_message_is_as_before(monkeypatch: pytest.MonkeyPatch) -> None:
    sessions = store_with({}, monkeypatch)
    with pytest.raises(ValidationError) as refused:
        sessions(experiment="broken", num_participants=2, group_size=2, period_length=10)
    assert "failed to load" not in str(refused.value)
