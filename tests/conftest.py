"""Suite-wide guards: Hypothesis profiles, and a leak check on shared-memory segments.

The leak check runs in the controlling process only (under xdist, workers share
/dev/shm, so a worker cannot tell its own leftovers from a sibling's live queue):
it records this library's segments before the run and fails the run if any new
one is still there at the end.
"""

from __future__ import annotations

import os
from typing import Any

import pytest
from hypothesis import HealthCheck, settings

settings.register_profile("ci", max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("dev", max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile(
    "thorough", max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev"))


def _our_segments() -> set[str]:
    try:
        return {e for e in os.listdir("/dev/shm") if e.startswith("sageq-")}
    except FileNotFoundError:
        return set()


def _is_controller(config: pytest.Config) -> bool:
    return not hasattr(config, "workerinput")


def pytest_sessionstart(session: pytest.Session) -> None:
    if _is_controller(session.config):
        session.config.stash[_BEFORE] = _our_segments()


def pytest_sessionfinish(session: pytest.Session, exitstatus: Any) -> None:
    if not _is_controller(session.config):
        return
    leaked = sorted(_our_segments() - session.config.stash.get(_BEFORE, set()))
    if leaked:
        session.config.stash[_LEAKED] = leaked
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter: Any, exitstatus: Any, config: pytest.Config) -> None:
    leaked = config.stash.get(_LEAKED, [])
    if leaked:
        terminalreporter.section("shared-memory leak", sep="=", red=True)
        terminalreporter.write_line(f"the suite left {len(leaked)} segment(s) in /dev/shm: {', '.join(leaked)}")


_BEFORE = pytest.StashKey[set[str]]()
_LEAKED = pytest.StashKey[list[str]]()
