"""Helpers shared by the tests in tests/ray/ (imported as a top-level module: this directory has no
``__init__.py``, since a package named ``ray`` would shadow Ray itself)."""

from __future__ import annotations

import time

import pytest
import ray


def leaked_actors() -> list[str]:
    """``namespace/name`` of every live actor of this library (prefix ``sageq:``) in the cluster."""
    from sage_queue.backends._ray import ACTOR_NAME_PREFIX

    found = ray.util.list_named_actors(all_namespaces=True)
    return sorted(f"{a['namespace']}/{a['name']}" for a in found if a["name"].startswith(ACTOR_NAME_PREFIX))


def kill_actors(names: list[str]) -> None:
    for full in names:
        namespace, name = full.split("/", 1)
        try:
            ray.kill(ray.get_actor(name, namespace=namespace), no_restart=True)
        except ValueError:  # gone meanwhile
            pass


def check_no_leaked_actors(grace: float = 3.0) -> None:
    """The leak guard: fail (pytest.fail) naming every ``sageq:`` actor still alive after ``grace``
    seconds (``ray.kill`` returns before the actor is gone), after killing them."""
    end = time.monotonic() + grace
    left = leaked_actors()
    while left and time.monotonic() < end:
        time.sleep(0.1)
        left = leaked_actors()
    kill_actors(left)
    if left:
        pytest.fail(f"leak guard: {len(left)} sage-queue actor(s) left alive by the tests: {left}")
