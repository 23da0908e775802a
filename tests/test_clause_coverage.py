"""Every MUST clause of the spec is checked by a kit test or a repository test.

Kit tests carry their ids via ``@conformance.clause``; repository tests via
``@pytest.mark.spec("D3", ...)`` (found here by parsing tests/ with ``ast``: a call
``pytest.mark.spec(...)`` or ``mark.spec(...)`` with string-literal arguments, as a
decorator or in ``pytestmark``).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from conformance import kit_clause_map, parse_spec

ROOT = Path(__file__).resolve().parents[1]
SPEC = ROOT / "spec"


def repo_spec_tags(tests_dir: Path = ROOT / "tests") -> dict[str, list[str]]:
    """clause id -> files under tests/ that tag it with pytest.mark.spec."""
    found: dict[str, list[str]] = {}
    for path in sorted(tests_dir.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call):
                continue
            func = node.func
            if not (isinstance(func, ast.Attribute) and func.attr == "spec"):
                continue
            owner = func.value
            is_mark = (isinstance(owner, ast.Attribute) and owner.attr == "mark") or (
                isinstance(owner, ast.Name) and owner.id == "mark"
            )
            if not is_mark:
                continue
            for arg in node.args:
                if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                    found.setdefault(arg.value, []).append(str(path.relative_to(tests_dir.parent)))
    return found


def test_spec_parses_and_has_clauses() -> None:
    clauses = parse_spec(SPEC)
    ids = {c.id for c in clauses}
    # The core contract is there (guards against a parser that silently finds nothing).
    assert {"Q1", "Q9", "D1", "R1", "E1"} <= ids, sorted(ids)[:20]


def test_every_must_clause_has_a_test() -> None:
    kit = kit_clause_map()
    repo = repo_spec_tags()
    untested = [c for c in parse_spec(SPEC) if c.mandatory and c.id not in kit and c.id not in repo]
    listing = "\n".join(f"  {c.id} ({c.source}): {c.text[:90]}" for c in untested)
    assert not untested, f"{len(untested)} MUST clause(s) have no kit test and no @pytest.mark.spec test:\n{listing}"


def test_tags_name_real_clauses() -> None:
    known = {c.id for c in parse_spec(SPEC)}
    stale = sorted(set(kit_clause_map()) - known)
    assert not stale, f"kit tests tag clauses the spec does not state: {stale}"
    stale_repo = {cid: files for cid, files in repo_spec_tags().items() if cid not in known}
    assert not stale_repo, f"repository tests tag clauses the spec does not state: {stale_repo}"


def test_the_checker_sees_tags(tmp_path: Path) -> None:
    """The scanner finds decorator and pytestmark forms (so the coverage check can fail and pass)."""
    (tmp_path / "test_x.py").write_text(
        "import pytest\n"
        "from pytest import mark\n"
        "pytestmark = pytest.mark.spec('D1')\n"
        "@pytest.mark.spec('R7', 'E9')\n"
        "def test_a(): pass\n"
        "@mark.spec('SHM3')\n"
        "def test_b(): pass\n"
    )
    assert set(repo_spec_tags(tmp_path)) == {"D1", "R7", "E9", "SHM3"}


@pytest.mark.parametrize("bad", ["- **Q1** (MUST) a", "- **Q1** (SHOULD) b"])
def test_duplicate_ids_are_refused(tmp_path: Path, bad: str) -> None:
    (tmp_path / "a.md").write_text("- **Q1** (MUST) first\n" + bad + "\n")
    with pytest.raises(ValueError, match="Q1"):
        parse_spec(tmp_path)
