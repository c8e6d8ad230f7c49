"""A small reader of the repository's Dockerfile, for the offline image checks (no Docker
engine exists here): instructions per stage, ARG defaults, USER, EXPOSE, LABEL."""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


@dataclass
class Stage:
    base: str  # the FROM image with ARGs resolved
    name: str
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, keyword: str) -> list[str]:
        return [args for kw, args in self.instructions if kw == keyword]


@dataclass
class Dockerfile:
    args: dict[str, str]
    stages: list[Stage]

    @classmethod
    def read(cls, path: Path = ROOT / "Dockerfile") -> Dockerfile:
        return cls.parse(path.read_text())

    @classmethod
    def parse(cls, text: str) -> Dockerfile:
        # Join continuation lines; drop comments (a parser directive is a comment too).
        logical: list[str] = []
        pending = ""
        for line in text.splitlines():
            if not pending and (not line.strip() or line.lstrip().startswith("#")):
                continue
            if pending and line.lstrip().startswith("#"):
                continue
            if line.rstrip().endswith("\\"):
                pending += line.rstrip()[:-1] + " "
                continue
            logical.append(pending + line)
            pending = ""
        args: dict[str, str] = {}
        stages: list[Stage] = []
        for line in logical:
            keyword, _, rest = line.strip().partition(" ")
            keyword, rest = keyword.upper(), rest.strip()
            if keyword == "ARG" and not stages:
                name, _, default = rest.partition("=")
                args[name] = default
            elif keyword == "FROM":
                words = rest.split()
                image = re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: args[m[1] or m[2]], words[0])
                name = words[2] if len(words) == 3 and words[1].upper() == "AS" else ""
                stages.append(Stage(image, name))
            else:
                stages[-1].instructions.append((keyword, rest))
        return cls(args, stages)

    @property
    def final(self) -> Stage:
        return self.stages[-1]

    @property
    def user_id(self) -> int:
        """The final stage's USER, which must be numeric (uid or uid:gid)."""
        (*_, user) = self.final.all("USER")
        return int(user.split(":")[0])

    @property
    def exposed(self) -> set[int]:
        return {int(port.split("/")[0]) for e in self.final.all("EXPOSE") for port in e.split()}

    def label(self, key: str) -> str | None:
        for args in self.final.all("LABEL"):
            for word in shlex.split(args):
                name, _, value = word.partition("=")
                if name == key:
                    return value
        return None

    def run_commands(self, stage: Stage) -> list[list[str]]:
        """Each RUN split into its `&&`-joined commands, as argument lists."""
        commands = []
        for run in stage.all("RUN"):
            for part in run.split("&&"):
                commands.append(shlex.split(part))
        return commands
