"""Helpers shared by the tests in tests/ray/ (imported as a top-level module: this directory has no
``__init__.py``, since a package named ``ray`` would shadow Ray itself)."""

from __future__ import annotations

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
