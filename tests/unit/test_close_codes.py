"""WebSocket close codes are defined once, in `services.common.errors.CloseCode` (the contract's
codes: PROTOCOL.md): no other module of `services/` gives one a constant of its own, which could
drift from the contract (the gateway's slow-client and delivery-failure codes, the bots')."""

from __future__ import annotations

import ast
from pathlib import Path

from services.common.errors import CloseCode

SERVICES = Path(__file__).resolve().parents[2] / "services"
# The ranges the contract's codes come from: RFC 6455's 1001-1015 (not 1000, a count as often
# as a code), and Canopy's own 44xx.
CLOSE_CODE_RANGES = (range(1001, 1016), range(4400, 4500))


def is_close_code(node: ast.expr) -> bool:
    return (
        isinstance(node, ast.Constant)
        and type(node.value) is int
        and any(node.value in r for r in CLOSE_CODE_RANGES)
    )


def test_no_module_but_errors_defines_a_close_code() -> None:
    found = []
    for path in sorted(SERVICES.rglob("*.py")):
        if path == SERVICES / "common" / "errors.py":
            continue
        for node in ast.parse(path.read_text(), str(path)).body:  # module-level constants
            value = node.value if isinstance(node, ast.Assign | ast.AnnAssign) else None
            if value is not None and is_close_code(value):
                found.append(f"{path.relative_to(SERVICES)}:{node.lineno}")
    assert found == []


def test_each_close_code_has_one_name() -> None:
    codes = {name: value for name, value in vars(CloseCode).items() if name.isupper()}
    assert len(set(codes.values())) == len(codes)
    assert codes["TRY_AGAIN_LATER"] == 1013 and codes["POLICY_VIOLATION"] == 1008
