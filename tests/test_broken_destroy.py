"""A queue marked broken (E15) can still be destroyed through a handle: that is the remedy E15 names."""

from __future__ import annotations

import mmap
import os
import uuid

import pytest

from sage_queue import QUEUE_STUB_MAPPING, QueueBroken, QueueDescriptor, QueueDestroyed, resolve_descriptor
from sage_queue._segment import segment_path


def _corrupt(kind: str, name: str) -> None:
    """Write out-of-range values where the backend must notice them on its next operation."""
    path = segment_path(kind, name)
    fd = os.open(path, os.O_RDWR)
    try:
        with mmap.mmap(fd, 0) as buf:
            if kind == "shm":
                from sage_queue.backends.shm.layout import BROKEN, STATE_OFFSET

                buf[STATE_OFFSET : STATE_OFFSET + 4] = BROKEN.to_bytes(4, "little")
            else:
                from sage_queue import _sage_core  # type: ignore[attr-defined]

                off = _sage_core.HEAD_OFFSET
                buf[off : off + 16] = b"\xff" * 16
    finally:
        os.close(fd)


@pytest.mark.spec("E15")
@pytest.mark.parametrize("kind", ["shm", "sage"])
def test_a_broken_queue_can_be_destroyed(kind: str) -> None:
    if not QUEUE_STUB_MAPPING.available(kind):
        pytest.skip(f"{kind} backend unavailable here")
    name = f"t-broken-{uuid.uuid4().hex[:8]}"
    desc = QueueDescriptor.create(kind, name=name, maxsize=4)
    q = resolve_descriptor(desc)
    other = resolve_descriptor(desc)
    try:
        q.put("a")
        _corrupt(kind, name)
        with pytest.raises(QueueBroken):
            q.get(timeout=1)
        with pytest.raises(QueueBroken):  # every handle sees it, not only the one that found it
            other.put("b", timeout=1)
        q.destroy()
        assert not os.path.exists(segment_path(kind, name))
        assert q.closed
        with pytest.raises(QueueDestroyed):
            q.get_nowait()
    finally:
        other.close()
        if os.path.exists(segment_path(kind, name)):
            os.unlink(segment_path(kind, name))
