"""One Ray instance for every test in tests/ray/, the xdist group that keeps them on one worker,
and the leak guard on this library's named actors.

* ``ray_address`` (session): a local Ray with 2 CPUs, started once (~3 s here) as this library
  starts its own (``sage_queue.backends._ray.start_local``: on 127.0.0.1 only, RAY16), shut down
  at the end. Every test in this directory is marked ``xdist_group("ray")``, so under
  ``--dist loadgroup`` one worker runs them all and starts one Ray.
* leak guard: at the end of the session, any live actor named ``sageq:...`` (this library's
  prefix, spec RAY2, RAY12) in any namespace fails the run (the session fixture's teardown raises,
  after killing them so that nothing outlives the run). ``ray_support.check_no_leaked_actors()`` is the guard;
  test_ray_backends.py shows that it fails on a leaked actor.
* ``made``: the handles a test opens with ``ray_support.open_handle``, destroyed at its end.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

ray = pytest.importorskip("ray", reason="ray is not installed (pip install sage-queue[ray])")

from ray_support import check_no_leaked_actors, destroy_at_end  # noqa: E402  (needs ray: after the importorskip)

from sage_queue.backends._ray import LOOPBACK_ENV, start_local  # noqa: E402

_HERE = Path(__file__).resolve().parent


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook, which turns the mark into the group (loadgroup)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if _HERE in Path(str(item.fspath)).resolve().parents:
            item.add_marker(pytest.mark.xdist_group("ray"))


@pytest.fixture(scope="session")
def ray_address() -> Iterator[str]:
    """The address of this session's Ray instance (started here, once)."""
    if ray.is_initialized():  # pragma: no cover - someone else's instance; we do not own it
        raise RuntimeError("Ray is already initialised in this test process; tests/ray starts its own")
    os.environ.pop("RAY_ADDRESS", None)
    # Ray workers (started by this process's raylet, with its environment) import the test modules'
    # remote functions by reference: this directory must be on their path, and tests/ (the job
    # tests' stages, tests/_job_stages.py).
    saved = {name: os.environ.get(name) for name in ("PYTHONPATH", LOOPBACK_ENV)}
    path = saved["PYTHONPATH"]
    os.environ["PYTHONPATH"] = os.pathsep.join([str(_HERE), str(_HERE.parent), *([path] if path else [])])
    # A new instance (never the latest `ray start` cluster on this shared machine), on 127.0.0.1 only:
    # start_local also leaves LOOPBACK_ENV=0 in this environment, without which the processes the tests
    # start could not join it by its address (Ray would rewrite 127.0.0.1 into the outward address).
    address = start_local(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        yield address
        check_no_leaked_actors()
    finally:
        ray.shutdown()
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@pytest.fixture
def made(ray_address: str) -> Iterator[list[Any]]:
    """Handles a test opens (``ray_support.open_handle``); each queue still alive at the end is destroyed."""
    yield from destroy_at_end()
