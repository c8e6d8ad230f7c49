"""The Grafana dashboard's PromQL, for the checks: `python -m tests.monitoring.dashboard`.

Owns reading `deploy/monitoring/grafana/canopy.json` (every panel's queries, rows included),
naming the metrics a query reads, and the promtool check of every query: Grafana is not
packaged here, so each query is wrapped into a recording rule of a generated rule file and
`promtool check rules` parses it (`make monitoring-check` runs this module).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
MONITORING = ROOT / "deploy" / "monitoring"
DASHBOARD = MONITORING / "grafana" / "canopy.json"
RULES = MONITORING / "rules" / "canopy.rules.yml"

_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'')
_MATCHERS = re.compile(r"\{[^}]*\}")
_RANGE = re.compile(r"\[[^\]]*\]")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
_KEYWORDS = {"and", "or", "unless", "bool", "offset", "inf", "nan", "atan2"}


def load(path: Path = DASHBOARD) -> dict[str, Any]:
    dashboard: dict[str, Any] = json.loads(path.read_text())
    return dashboard


def panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel, those inside collapsed rows too."""
    for panel in dashboard.get("panels", []):
        yield panel
        yield from panel.get("panels", [])


def queries(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    """(panel title / refId, expr) of every Prometheus query of the dashboard."""
    return [
        (f"{panel['title']} / {target['refId']}", target["expr"])
        for panel in panels(dashboard)
        for target in panel.get("targets", [])
        if "expr" in target
    ]


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (not functions, labels or keywords)."""
    text = _STRING.sub('""', expr)
    text = _GROUPING.sub(" ", text)
    text = _MATCHERS.sub(" ", text)
    text = _RANGE.sub(" ", text)
    names = set()
    for match in _NAME.finditer(text):
        rest = text[match.end() :].lstrip()
        if rest.startswith("("):
            continue  # a function or an aggregation
        name = match.group()
        if name.lower() not in _KEYWORDS and not name[0].isdigit():
            names.add(name)
    return names


def rules(path: Path = RULES) -> list[dict[str, Any]]:
    """Every rule (recording and alerting) of the rules file."""
    document = yaml.safe_load(path.read_text())
    return [rule for group in document["groups"] for rule in group["rules"]]


def rule_file(dashboard: dict[str, Any]) -> str:
    """A rule file with one recording rule per query (JSON is YAML): promtool parses them."""
    rules = [
        {"record": f"dashboard:query_{index}", "expr": expr}
        for index, (_, expr) in enumerate(queries(dashboard))
    ]
    return json.dumps({"groups": [{"name": "canopy-dashboard", "rules": rules}]}, indent=2)


def check_with_promtool(dashboard: dict[str, Any]) -> subprocess.CompletedProcess[str]:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "dashboard.rules.yml"
        path.write_text(rule_file(dashboard))
        return subprocess.run(
            ["promtool", "check", "rules", str(path)],
            capture_output=True,
            text=True,
            check=False,
        )


def main() -> int:
    dashboard = load()
    found = queries(dashboard)
    result = check_with_promtool(dashboard)
    if result.returncode != 0:
        print(result.stdout + result.stderr, file=sys.stderr)
        for index, (where, expr) in enumerate(found):
            print(f"  dashboard:query_{index} = {where}: {expr}", file=sys.stderr)
        return 1
    print(f"{DASHBOARD.relative_to(ROOT)}: the {len(found)} queries pass promtool check rules")
    return 0


if __name__ == "__main__":
    sys.exit(main())
