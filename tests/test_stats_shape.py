"""One ``stats()`` shape for every backend (spec Q37): the kit's check, and that it can fail.

The kit test ``test_stats_shape`` runs on every built-in backend in tests/test_conformance_builtin.py
(and on rpc and Ray under tests/rpc and tests/ray); here it is run against stubs that each break
the shape one way, through the kit's own command line, and must fail every one of them.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from sage_queue import QueueDescriptor, QueueStats, resolve_descriptor
from sage_queue.backends.local import LocalQueueStub, destroy_local_queue

ROOT = Path(__file__).resolve().parents[1]


class _Tweaked(LocalQueueStub):
    """The local backend with its stats() record changed by :meth:`tweak`."""

    def _stats(self) -> QueueStats:
        self._calls = getattr(self, "_calls", 0) + 1
        return self.tweak(super()._stats(), self._calls)

    def tweak(self, s: QueueStats, call: int) -> QueueStats:
        raise NotImplementedError


class NegativeErrors(_Tweaked):
    def tweak(self, s: QueueStats, call: int) -> QueueStats:
        return dataclasses.replace(s, errors=-1)


class FloatDepth(_Tweaked):
    def tweak(self, s: QueueStats, call: int) -> QueueStats:
        return dataclasses.replace(s, depth=float(s.depth))  # type: ignore[arg-type]


class BoolWaits(_Tweaked):
    def tweak(self, s: QueueStats, call: int) -> QueueStats:
        return dataclasses.replace(s, waits=False)


class UnknownThenKnown(_Tweaked):
    """bytes_in is None in the first snapshot, a number later: an unknown is not a number."""

    def tweak(self, s: QueueStats, call: int) -> QueueStats:
        return dataclasses.replace(s, bytes_in=None if call == 1 else 10 * s.puts)


class WaitsGoDown(_Tweaked):
    def tweak(self, s: QueueStats, call: int) -> QueueStats:
        return dataclasses.replace(s, waits=100 - call)


class BytesThatDoNotGrow(_Tweaked):
    def tweak(self, s: QueueStats, call: int) -> QueueStats:
        return dataclasses.replace(s, bytes_in=7, bytes_out=7)


class BadScope(_Tweaked):
    def tweak(self, s: QueueStats, call: int) -> QueueStats:
        return dataclasses.replace(s, scope="process")


def _factory(cls: type) -> Callable[[int], Any]:
    made: list[Any] = []

    def make(maxsize: int) -> Any:
        handle = cls(QueueDescriptor.create_local_queue(maxsize=maxsize))
        made.append(handle)
        return handle

    def cleanup() -> None:
        while made:
            destroy_local_queue(made.pop().descriptor.queue_id)

    make.capabilities = LocalQueueStub.capabilities  # type: ignore[attr-defined]
    make.cleanup = cleanup  # type: ignore[attr-defined]
    return make


BROKEN = {
    "negative_errors": (NegativeErrors, "errors is -1"),
    "float_depth": (FloatDepth, "depth is 0.0"),
    "bool_waits": (BoolWaits, "waits is False"),
    "unknown_then_known": (UnknownThenKnown, "bytes_in is None in some snapshots"),
    "waits_go_down": (WaitsGoDown, "waits went down"),
    "bytes_that_do_not_grow": (BytesThatDoNotGrow, "left bytes_in at 7"),
    "bad_scope": (BadScope, "'process'"),
}
for _name, (_cls, _) in BROKEN.items():
    globals()[f"make_{_name}"] = _factory(_cls)
make_local = _factory(LocalQueueStub)


def _kit(target: str, tmp_path: Path) -> tuple[subprocess.CompletedProcess[str], dict[str, Any]]:
    report = tmp_path / "report.json"
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "tests"), env.get("PYTHONPATH", "")])
    env.pop("PYTEST_XDIST_WORKER", None)
    env.pop("PYTEST_CURRENT_TEST", None)
    done = subprocess.run(
        [sys.executable, "-m", "conformance", target, "-k", "test_stats", "--report", str(report)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=100,
    )
    return done, json.loads(report.read_text()) if report.exists() else {}


def _outcomes(report: dict[str, Any]) -> dict[str, str]:
    return {r["test"].split("[")[0]: r["outcome"] for t in report["targets"] for r in t["results"]}


@pytest.mark.spec("Q37")
@pytest.mark.timeout(110)
@pytest.mark.parametrize("name", sorted(BROKEN))
def test_the_kit_fails_a_stats_record_of_the_wrong_shape(name: str, tmp_path: Path) -> None:
    done, report = _kit(f"test_stats_shape:make_{name}", tmp_path)
    assert done.returncode == 1, f"the kit let {name} through:\n{done.stdout[-3000:]}\n{done.stderr[-2000:]}"
    assert _outcomes(report)["test_stats_shape"] == "fail", done.stdout[-3000:]
    assert BROKEN[name][1] in done.stdout, f"the failure does not say what is wrong:\n{done.stdout[-3000:]}"


@pytest.mark.spec("Q37")
@pytest.mark.timeout(110)
def test_the_kit_passes_the_local_backend_with_errors_known_to_be_zero(tmp_path: Path) -> None:
    done, report = _kit("test_stats_shape:make_local", tmp_path)
    assert done.returncode == 0, done.stdout[-3000:]
    assert _outcomes(report) == {"test_stats": "pass", "test_stats_shape": "pass"}
    q = resolve_descriptor(QueueDescriptor.create_local_queue())
    try:
        q.put(1)
        assert q.stats().errors == 0  # a local queue serialises nothing: no put or get fails otherwise
    finally:
        q.destroy()
