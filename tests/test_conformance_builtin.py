"""The conformance kit against every built-in queue type that this installation can provide.

One ``QueueConformance`` subclass per built-in type, built from the registry, so a
backend is judged by ``make test`` as soon as its module imports (shm and sage
included); a type whose backend is unavailable shows up as one skipped test that
says why.
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


for _queue_type in builtin_types():
    globals()[f"TestKit_{_queue_type}"] = _kit_class(_queue_type)
