"""Schemathesis against the running store's own OpenAPI schema (`/openapi.json`).

Every documented operation, with data generated from the schema, valid (positive) and
invalid (negative), at most 25 examples per operation and mode, sent with the admin token:
no 5xx, and every status code, content type and body is one the schema documents.

The schema only exists once the stack runs, so operations are enumerated inside the test
(schemathesis' pytest `from_fixture` loader does not run under this pytest).
"""

from __future__ import annotations

from typing import Any

import pytest
import schemathesis
from hypothesis import given
from schemathesis import GenerationMode, checks
from schemathesis.core.result import Ok

from tests.hostile.conftest import fuzz

pytestmark = [pytest.mark.e2e]

CHECKS = [
    checks.not_a_server_error,
    checks.status_code_conformance,
    checks.content_type_conformance,
    checks.response_schema_conformance,
]
OPERATIONS = {
    "POST /api/sessions",
    "GET /api/sessions",
    "GET /api/sessions/{session_id}",
    "GET /api/sessions/{session_id}/events",
}


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_store_matches_its_schema(stack: Any, mode: GenerationMode) -> None:
    urls = stack.urls
    schema = schemathesis.openapi.from_url(f"{urls.store_url}/openapi.json", timeout=10)
    operations = []
    for result in schema.get_all_operations():
        if not isinstance(result, Ok):
            raise result.err()  # the store's own schema has an operation schemathesis refuses
        operations.append(result.ok())
    assert {f"{op.method.upper()} {op.path}" for op in operations} >= OPERATIONS
    auth = {"Authorization": f"Bearer {urls.admin_token}"}
    for operation in operations:

        @fuzz(25)
        @given(case=operation.as_strategy(generation_mode=mode))
        def conforms(case: schemathesis.Case[Any]) -> None:
            case.call_and_validate(base_url=urls.store_url, headers=auth, checks=CHECKS, timeout=30)

        conforms()
