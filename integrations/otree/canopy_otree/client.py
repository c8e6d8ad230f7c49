"""A minimal client of Canopy's researchers' HTTP API (docs/protocol.md), standard library only.

oTree pins its own web stack (starlette, uvicorn, ...), so this package brings no HTTP library
of its own. Calls are synchronous: oTree runs page code and `after_all_players_arrive`
synchronously, and each call here is one small JSON request to the store.
"""

from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.request
from typing import Any

DEFAULT_URL = "http://127.0.0.1:8001"
TIMEOUT_S = 10.0
# Connection failures, 5xx and 429 are retried this many times (1 s, 2 s apart): a store
# restarting during a deploy should not cost a group its stage.
RETRIES = 2


class CanopyError(Exception):
    """Canopy refused a call (4xx) or could not be reached after the retries."""

    def __init__(self, message: str, status: int | None = None, body: Any = None) -> None:
        super().__init__(message)
        self.status = status
        self.body = body


class Canopy:
    """The store's `/api`: `CANOPY_URL` (e.g. `http://127.0.0.1:8001`) and `CANOPY_TOKEN`
    (the admin token) from the environment unless given."""

    def __init__(self, url: str | None = None, token: str | None = None) -> None:
        self.url = (url or os.environ.get("CANOPY_URL") or DEFAULT_URL).rstrip("/")
        token = token or os.environ.get("CANOPY_TOKEN")
        if not token:
            raise CanopyError("CANOPY_TOKEN is not set: the Canopy admin token is needed")
        self.token = token

    def request(self, method: str, path: str, body: Any = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        headers = {"Authorization": f"Bearer {self.token}", "Accept": "application/json"}
        if data is not None:
            headers["Content-Type"] = "application/json"
        last: CanopyError | None = None
        for attempt in range(RETRIES + 1):
            if attempt:
                time.sleep(attempt)  # a back-off before retrying, not a synchronisation
            req = urllib.request.Request(self.url + path, data=data, headers=headers, method=method)
            try:
                with urllib.request.urlopen(req, timeout=TIMEOUT_S) as response:
                    text = response.read().decode()
                    return json.loads(text) if text else None
            except urllib.error.HTTPError as exc:
                text = exc.read().decode(errors="replace")
                try:
                    answer = json.loads(text)
                except ValueError:
                    answer = text
                last = CanopyError(_describe(method, path, exc.code, answer), exc.code, answer)
                if exc.code != 429 and exc.code < 500:
                    raise last from None
            except (urllib.error.URLError, OSError) as exc:
                last = CanopyError(f"{method} {self.url}{path}: Canopy unreachable: {exc}")
        assert last is not None
        raise last

    def create_session(self, body: dict[str, Any]) -> dict[str, Any]:
        answer: dict[str, Any] = self.request("POST", "/api/sessions", body)
        return answer

    def session(self, session: str) -> dict[str, Any]:
        answer: dict[str, Any] = self.request("GET", f"/api/sessions/{session}")
        return answer

    def start_bots(self, session: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        answer: dict[str, Any] = self.request("POST", f"/api/sessions/{session}/bots", body or {})
        return answer


def _describe(method: str, path: str, status: int, answer: Any) -> str:
    error = answer.get("error") if isinstance(answer, dict) else None
    if isinstance(error, dict):
        field = f" (field {error['field']})" if error.get("field") else ""
        return f"{method} {path} -> {status} {error.get('code')}: {error.get('message')}{field}"
    return f"{method} {path} -> {status}: {str(answer)[:300]}"
