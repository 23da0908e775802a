"""The pytest plugin: ``pytest -p conformance --queue-factory MODULE:ATTR`` (or ``--queue-backend TYPE``).

With one of those options and no test paths on the command line, the run
collects the kit (``conformance/kit_suite.py``) against that target. With
explicit paths, the options only feed ``QueueConformance`` subclasses whose
``factory`` is unset. Kit tests also match ``-k`` by clause id (``-k Q8``).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Optional

import pytest
from hypothesis import HealthCheck, settings
from hypothesis.errors import InvalidArgument

from ._clauses import clauses_of
from .target import Target, load_target, registered_target

__all__ = ["pytest_addoption", "pytest_configure", "pytest_collection_modifyitems", "target_from_config", "SUITE_PATH"]

SUITE_PATH = Path(__file__).with_name("kit_suite.py")
_TARGET = pytest.StashKey[Target]()

# Example counts for the state machine; a repository's own conftest may register the same names.
_PROFILES = {"ci": 60, "thorough": 1000, "dev": 30}
for _name, _examples in _PROFILES.items():
    try:
        settings.get_profile(_name)
    except InvalidArgument:
        settings.register_profile(
            _name, max_examples=_examples, deadline=None, suppress_health_check=[HealthCheck.too_slow]
        )


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("conformance", "sage-queue conformance kit")
    group.addoption(
        "--queue-factory",
        metavar="MODULE:ATTR",
        default=None,
        help="run the conformance kit against factory(maxsize) -> QueueLike",
    )
    group.addoption(
        "--queue-backend",
        metavar="TYPE",
        default=None,
        help="run the conformance kit against a registered queue type (local, shm, sage, ...)",
    )


def pytest_configure(config: pytest.Config) -> None:
    factory, backend = config.getoption("queue_factory"), config.getoption("queue_backend")
    if factory and backend:
        raise pytest.UsageError("give --queue-factory or --queue-backend, not both")
    if not (factory or backend):
        return
    if "conformance.suite" not in sys.modules:  # so that the kit's assertions explain themselves
        pytest.register_assert_rewrite("conformance.suite", "conformance._machine")
    if config.args_source != pytest.Config.ArgsSource.ARGS:
        config.args[:] = [str(SUITE_PATH)]
    if config.getoption("hypothesis_profile", None) is None:
        settings.load_profile("ci")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        ids = clauses_of(getattr(item, "function", None))
        if ids:
            item.extra_keyword_matches.update(ids)


def target_from_config(config: pytest.Config) -> Optional[Target]:
    """The target named by ``--queue-factory`` / ``--queue-backend`` (built once per run), or None."""
    if _TARGET in config.stash:
        return config.stash[_TARGET]
    factory: Any = config.getoption("queue_factory", None)
    backend: Any = config.getoption("queue_backend", None)
    if factory:
        target = load_target(factory)
    elif backend:
        target = registered_target(backend)
    else:
        return None
    config.stash[_TARGET] = target
    return target
