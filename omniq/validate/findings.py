"""What `omniq lint` reports: one finding per problem, with an id, a severity, the tensor or module it
concerns, a message and a fix hint; and how findings are shown (a rich table, or JSON).

Severities: `error` (an engine will refuse the checkpoint or run it wrong: lint exits 1), `warning`
(probably unintended, or only some engines are affected), `info` (a deployment fact worth knowing).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from omniq.manifest import SEVERITIES  # noqa: F401 - lint.json's severities, read back by omniq.manifest
_STYLE = {"error": "bold red", "warning": "yellow", "info": "cyan"}


@dataclass(frozen=True)
class Finding:
    id: str                  # stable, kebab-case: "companion-missing", "exclude-unmatched", ...
    severity: str            # "error" | "warning" | "info"
    tensor_or_module: str    # the tensor / module / file it concerns ("" for the whole checkpoint)
    message: str
    fix: str

    def __post_init__(self):
        if self.severity not in SEVERITIES:
            raise ValueError(f"severity must be one of {SEVERITIES}, got {self.severity!r}")

    def as_dict(self) -> dict:
        return asdict(self)


def errors(findings: list[Finding]) -> list[Finding]:
    return [f for f in findings if f.severity == "error"]


def counts(findings: list[Finding]) -> dict[str, int]:
    return {s: sum(1 for f in findings if f.severity == s) for s in SEVERITIES}


def sort_key(f: Finding) -> tuple:
    return (SEVERITIES.index(f.severity), f.id, f.tensor_or_module)


def as_json(findings: list[Finding], *, path: str, engine: str | None) -> dict:
    """The machine-readable report: every finding, sorted by severity then id, and the counts."""
    ordered = sorted(findings, key=sort_key)
    return {"path": path, "engine": engine, "passed": not errors(findings), "counts": counts(findings),
            "findings": [f.as_dict() for f in ordered]}


def table(findings: list[Finding], *, title: str, per_id: int = 5):
    """A rich table; an id with more than `per_id` findings shows the first ones and a count of the rest
    (a 30B checkpoint can have thousands of expert findings of one kind)."""
    from rich.table import Table

    t = Table(title=title, show_lines=False)
    t.add_column("severity", no_wrap=True)
    t.add_column("id", no_wrap=True)
    for col in ("tensor / module", "problem", "fix"):
        t.add_column(col, overflow="fold")
    shown: dict[str, int] = {}
    total: dict[str, int] = {}
    for f in findings:
        total[f.id] = total.get(f.id, 0) + 1
    for f in sorted(findings, key=sort_key):
        n = shown.get(f.id, 0)
        shown[f.id] = n + 1
        style = _STYLE[f.severity]
        if n < per_id:
            t.add_row(f"[{style}]{f.severity}[/{style}]", f.id, f.tensor_or_module, f.message, f.fix)
        elif n == per_id:
            t.add_row(f"[{style}]{f.severity}[/{style}]", f.id, f"... and {total[f.id] - per_id} more", "", "")
    return t
