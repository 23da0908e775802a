"""Suite-wide guards: Hypothesis profiles, and leak checks on segments and processes.

The leak checks run in the controlling process only (under xdist, workers share
/dev/shm, so a worker cannot tell its own leftovers from a sibling's live queue):

* segments: this library's segments are recorded before the run, and the run
  fails if any new one is still there at the end;
* temporary files: the same for ``sageq-*`` entries of the temporary directory (a job's
  rpc key directory, a harness run's work directory...);
* processes: the controller puts a token in the environment before the workers
  start, so every process the suite starts (workers, their children, orphans
  re-parented to init) inherits it; at the end, any live process other than the
  controller that carries the token is a leak and fails the run.
"""

from __future__ import annotations

import os
import tempfile
import time
import uuid
from typing import Any

import pytest
from hypothesis import HealthCheck, settings

settings.register_profile("ci", max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("dev", max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("thorough", max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev"))


def _our_segments() -> set[str]:
    try:
        return {e for e in os.listdir("/dev/shm") if e.startswith("sageq-")}
    except FileNotFoundError:
        return set()


def _our_temp_entries() -> set[str]:
    """``sageq-*`` entries of the temporary directory: what this library and its tests name so there."""
    try:
        return {e for e in os.listdir(tempfile.gettempdir()) if e.startswith("sageq-")}
    except FileNotFoundError:
        return set()


def _is_controller(config: pytest.Config) -> bool:
    return not hasattr(config, "workerinput")


_RUN_TOKEN_VAR = "SAGE_QUEUE_TEST_RUN"


@pytest.hookimpl(trylast=True)  # after xdist's hook, which appends "@<group>" to a grouped test's id
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # Under --dist loadgroup, a test marked xdist_group must carry its group in its id, or xdist spreads
    # the group over workers: tests/ray then starts one Ray per worker, and the gc tests remove each
    # other's orphans. Both happened silently (a mark added after xdist's hook; pytest 9.2 with
    # pytest-xdist 3.8 ignores the mark entirely, pytest-dev/pytest-xdist#1386): refuse to run instead.
    if not getattr(config.option, "loadgroup", False):
        return
    ungrouped = [item.nodeid for item in items if item.get_closest_marker("xdist_group") and "@" not in item.nodeid]
    if ungrouped:
        raise pytest.UsageError(
            f"--dist loadgroup did not group {len(ungrouped)} test(s) marked xdist_group (e.g. {ungrouped[0]}): "
            "check the pytest / pytest-xdist versions (pyproject.toml pins pytest<9.2 for this)"
        )


def pytest_configure(config: pytest.Config) -> None:
    # Before xdist starts its workers, so that they and all their descendants inherit it.
    if _is_controller(config):
        os.environ[_RUN_TOKEN_VAR] = uuid.uuid4().hex


# multiprocessing's own helpers, started on first use by the process that runs the tests
# (the controller itself without xdist): they live as long as that process and exit with it.
_INTERPRETER_HELPERS = ("multiprocessing.resource_tracker", "multiprocessing.forkserver")


def _read(pid: str, name: str) -> bytes:
    with open(f"/proc/{pid}/{name}", "rb") as f:
        return f.read()


def _live_processes_of_this_run() -> list[str]:
    """``pid cmdline`` of every live, non-zombie process (but us) carrying this run's token."""
    token = f"{_RUN_TOKEN_VAR}={os.environ.get(_RUN_TOKEN_VAR, '')}".encode()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            if token not in _read(entry, "environ").split(b"\0"):
                continue
            state, ppid = _read(entry, "stat").rsplit(b")", 1)[1].split()[:2]
            if state == b"Z":
                continue  # a zombie holds nothing but its pid until its parent reaps it
            cmdline = _read(entry, "cmdline").replace(b"\0", b" ").decode(errors="replace")
            helper = next((h for h in _INTERPRETER_HELPERS if h in cmdline), None)
            # The helper itself is fine; a process forked *from* it (a forkserver child
            # carries the server's cmdline) is a worker like any other.
            if helper is not None and helper not in _read(ppid.decode(), "cmdline").decode(errors="replace"):
                continue
            found.append(f"{entry} {cmdline[:160]}")
        except OSError:  # gone meanwhile, or not ours to read
            continue
    return found


def _leaked_processes() -> list[str]:
    if not os.path.isdir("/proc") or _RUN_TOKEN_VAR not in os.environ:
        return []
    deadline = time.monotonic() + 10.0  # processes killed at the very end still need a moment to exit
    while True:
        left = _live_processes_of_this_run()
        if not left or time.monotonic() >= deadline:
            return left
        time.sleep(0.2)


def pytest_sessionstart(session: pytest.Session) -> None:
    if _is_controller(session.config):
        session.config.stash[_BEFORE] = _our_segments()
        session.config.stash[_BEFORE_TEMP] = _our_temp_entries()


def pytest_sessionfinish(session: pytest.Session, exitstatus: Any) -> None:
    if not _is_controller(session.config):
        return
    leaked = sorted(_our_segments() - session.config.stash.get(_BEFORE, set()))
    if leaked:
        session.config.stash[_LEAKED] = leaked
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
    processes = _leaked_processes()
    if processes:
        session.config.stash[_LEAKED_PROCESSES] = processes
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
    # After the process check: what a leaked process would still remove has had its chance.
    temp = sorted(_our_temp_entries() - session.config.stash.get(_BEFORE_TEMP, set()))
    if temp:
        session.config.stash[_LEAKED_TEMP] = temp
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter: Any, exitstatus: Any, config: pytest.Config) -> None:
    leaked = config.stash.get(_LEAKED, [])
    if leaked:
        terminalreporter.section("shared-memory leak", sep="=", red=True)
        terminalreporter.write_line(f"the suite left {len(leaked)} segment(s) in /dev/shm: {', '.join(leaked)}")
    temp = config.stash.get(_LEAKED_TEMP, [])
    if temp:
        terminalreporter.section("temporary file leak", sep="=", red=True)
        terminalreporter.write_line(
            f"the suite left {len(temp)} entr(y/ies) in {tempfile.gettempdir()}: {', '.join(temp)}"
        )
    processes = config.stash.get(_LEAKED_PROCESSES, [])
    if processes:
        terminalreporter.section("process leak", sep="=", red=True)
        terminalreporter.write_line(f"the suite left {len(processes)} process(es) running:")
        for line in processes:
            terminalreporter.write_line(f"  {line}")


_BEFORE = pytest.StashKey[set[str]]()
_LEAKED = pytest.StashKey[list[str]]()
_LEAKED_PROCESSES = pytest.StashKey[list[str]]()
_BEFORE_TEMP = pytest.StashKey[set[str]]()
_LEAKED_TEMP = pytest.StashKey[list[str]]()
