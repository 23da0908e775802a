"""Clause ids: tagging kit tests with them, and reading them from the spec.

A clause line in ``spec/*.md`` and ``spec/backends/*.md`` has the exact form::

    - **Q7** (MUST) text of the clause

Kit tests carry their clause ids as a function attribute (``@clause("Q7")``)
rather than a pytest marker, so that a suite subclassing the kit works under
``--strict-markers`` without loading the plugin.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, TypeVar

__all__ = ["Clause", "clause", "clauses_of", "requires", "required_capabilities", "parse_spec", "default_spec_dir"]

CLAUSE_ATTR = "__conformance_clauses__"
REQUIRES_ATTR = "__conformance_requires__"

_CLAUSE_LINE = re.compile(r"^- \*\*([A-Z]+[0-9]+)\*\* \((MUST NOT|MUST|SHOULD NOT|SHOULD|MAY)\) (.*)$")
_ID = re.compile(r"[A-Z]+[0-9]+")

F = TypeVar("F", bound=Callable[..., Any])


def clause(*ids: str) -> Callable[[F], F]:
    """Tag a kit test with the spec clause ids it checks (``@clause("Q8", "Q11")``)."""
    for cid in ids:
        if not _ID.fullmatch(cid):
            raise ValueError(f"not a clause id: {cid!r}")

    def mark(fn: F) -> F:
        setattr(fn, CLAUSE_ATTR, tuple(getattr(fn, CLAUSE_ATTR, ())) + ids)
        return fn

    return mark


def requires(*capabilities: str) -> Callable[[F], F]:
    """The test runs only when the target declares every one of ``capabilities``; else it skips."""

    def mark(fn: F) -> F:
        setattr(fn, REQUIRES_ATTR, tuple(getattr(fn, REQUIRES_ATTR, ())) + capabilities)
        return fn

    return mark


def clauses_of(fn: Any) -> tuple[str, ...]:
    return tuple(getattr(fn, CLAUSE_ATTR, ()))


def required_capabilities(fn: Any) -> tuple[str, ...]:
    return tuple(getattr(fn, REQUIRES_ATTR, ()))


@dataclass(frozen=True)
class Clause:
    """One normative clause of the spec."""

    id: str
    level: str
    """MUST, MUST NOT, SHOULD, SHOULD NOT or MAY."""
    text: str
    source: str
    """The spec file (relative to the spec directory) that states it."""

    @property
    def mandatory(self) -> bool:
        return self.level in ("MUST", "MUST NOT")


def default_spec_dir() -> Optional[Path]:
    """``spec/`` next to this package (a source checkout); None when not there."""
    candidate = Path(__file__).resolve().parent.parent / "spec"
    return candidate if candidate.is_dir() else None


def parse_spec(spec_dir: Path, files: Optional[Iterable[Path]] = None) -> list[Clause]:
    """Every clause in ``spec_dir/*.md`` and ``spec_dir/backends/*.md``, in file order.

    Raises ValueError if an id is stated twice (ids are the contract's keys).
    """
    paths = list(files) if files is not None else sorted(spec_dir.glob("*.md")) + sorted(spec_dir.glob("backends/*.md"))
    found: dict[str, Clause] = {}
    for path in paths:
        for line in path.read_text(encoding="utf-8").splitlines():
            m = _CLAUSE_LINE.match(line)
            if not m:
                continue
            cid, level, text = m.groups()
            rel = str(path.relative_to(spec_dir)) if path.is_relative_to(spec_dir) else str(path)
            if cid in found:
                raise ValueError(f"clause {cid} is stated twice: {found[cid].source} and {rel}")
            found[cid] = Clause(cid, level, text, rel)
    return list(found.values())
