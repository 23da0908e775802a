"""The conformance kit against every built-in queue type that this installation can provide.

One ``QueueConformance`` subclass per built-in type, built from the registry, so a
backend is judged by ``make test`` as soon as its module imports (shm and sage
included); a type whose backend is unavailable shows up as one skipped test that
says why. The types whose kit needs a service run it where that service lives:
rpc in tests/rpc (server in another process, and across a network namespace), the
Ray types in tests/ray (one Ray instance per session, one xdist group).
"""

from __future__ import annotations

import pytest

from conformance import QueueConformance
from conformance.target import TargetError, builtin_types, registered_target


def _kit_class(queue_type: str) -> type:
    name = f"TestKit_{queue_type}"
    try:
        target = registered_target(queue_type)
    except TargetError as exc:
        reason = str(exc)

        def test_backend_available(self: object) -> None:
            pytest.skip(reason)

        return type(name, (), {"test_backend_available": test_backend_available})
    return type(name, (QueueConformance,), {"factory": target.factory, "__module__": __name__})


KIT_RUNS_ELSEWHERE = {
    "rpc": "tests/rpc/test_rpc_kit.py",
    "ray_queue": "tests/ray/test_ray_kit.py",
    "ray_actor": "tests/ray/test_ray_kit.py",
}

for _queue_type in builtin_types():
    if _queue_type in KIT_RUNS_ELSEWHERE:
        continue
    globals()[f"TestKit_{_queue_type}"] = _kit_class(_queue_type)


def test_every_builtin_type_has_its_kit_run_somewhere() -> None:
    from pathlib import Path

    root = Path(__file__).parent
    for queue_type in builtin_types():
        where = KIT_RUNS_ELSEWHERE.get(queue_type)
        if where is None:
            assert f"TestKit_{queue_type}" in globals()
        else:
            text = (root.parent / where).read_text(encoding="utf-8")
            assert "QueueConformance" in text, f"{where} runs no kit for {queue_type}"
