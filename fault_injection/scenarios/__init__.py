"""The scenario registry: one small module per scenario in this package, registered by :func:`scenario`.

Every module here is imported by :func:`all_scenarios` (so adding a file is all it takes);
see fault_injection/README.md for what a scenario gets and what the checker expects.
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import TypeVar

from stress.runner import Scenario

__all__ = ["Scenario", "scenario", "all_scenarios", "get_scenario"]

_REGISTRY: dict[str, Scenario] = {}
S = TypeVar("S", bound=type[Scenario])


def scenario(cls: S) -> S:
    """Class decorator: register one instance of ``cls`` under ``cls.name`` (names are unique)."""
    if not cls.name or cls.name in _REGISTRY:
        raise ValueError(f"scenario name {cls.name!r} is empty or taken")
    _REGISTRY[cls.name] = cls()
    return cls


def all_scenarios() -> dict[str, Scenario]:
    """Every scenario of this package, by name (imports each module once)."""
    for module in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{module.name}")
    return dict(sorted(_REGISTRY.items()))


def get_scenario(name: str) -> Scenario:
    """The scenario called ``name``; KeyError names the known ones."""
    known = all_scenarios()
    if name not in known:
        raise KeyError(f"unknown scenario {name!r} (known: {', '.join(known)})")
    return known[name]
