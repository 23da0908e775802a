"""The sage-queue conformance kit: the executable form of ``spec/queue-contract.md``.

Three ways in (see ``conformance/README.md``):

* ``python -m conformance MODULE:ATTR`` / ``--backend TYPE|all`` (also ``sage-queue conformance``);
* ``pytest -p conformance --queue-factory MODULE:ATTR`` — this module is the pytest plugin;
* ``class TestMyQueue(conformance.QueueConformance): factory = staticmethod(make)``.
"""

from __future__ import annotations

from typing import Any

import pytest

# Kit assertions explain themselves when pytest rewrites them; the suite is imported lazily
# (module __getattr__ below) so that this registration precedes its import.
pytest.register_assert_rewrite("conformance.suite", "conformance._machine")

from ._clauses import Clause, clause, clauses_of, parse_spec, requires  # noqa: E402
from .plugin import pytest_addoption, pytest_collection_modifyitems, pytest_configure  # noqa: E402
from .samples import UserRecord, describe_difference, same_item  # noqa: E402
from .target import Target, TargetError, load_target, registered_target, registered_types  # noqa: E402

__all__ = [
    "Clause",
    "QueueConformance",
    "Target",
    "TargetError",
    "UserRecord",
    "clause",
    "clauses_of",
    "describe_difference",
    "kit_clause_map",
    "load_target",
    "parse_spec",
    "pytest_addoption",
    "pytest_collection_modifyitems",
    "pytest_configure",
    "registered_target",
    "registered_types",
    "requires",
    "same_item",
]


def __getattr__(name: str) -> Any:
    if name == "QueueConformance":
        from .suite import QueueConformance

        return QueueConformance
    raise AttributeError(f"module 'conformance' has no attribute {name!r}")


def kit_clause_map() -> dict[str, list[str]]:
    """clause id -> names of the kit tests tagged with it."""
    from .suite import kit_clause_map as _map

    return _map()
