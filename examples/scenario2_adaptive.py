"""Scenario 2: let the library pick the queue type from where the two ends run, and say why.

    python examples/scenario2_adaptive.py

The code after the choice is the same whatever was chosen: that is the point of descriptors.
"""

from __future__ import annotations

from sage_queue import QueueDescriptor, resolve_descriptor
from sage_queue.job import choose_queue_type
from sage_queue.registry import unavailable_reason

PLACEMENTS = [
    ("thread", "thread"),
    ("thread", "process"),
    ("process", "process"),
    ("ray", "process"),
    ("process", "host:gpu-node-7"),
]

if __name__ == "__main__":
    for producer, consumer in PLACEMENTS:
        choice = choose_queue_type(producer, consumer, explain=True)
        print(f"{producer:>8} -> {consumer:<16} {choice.queue_type:<10} {choice.reason}")

    # Use a choice that needs nothing but this host.
    queue_type = choose_queue_type("thread", "process")
    assert unavailable_reason(queue_type) is None, unavailable_reason(queue_type)
    q = resolve_descriptor(QueueDescriptor.create(queue_type, maxsize=100))
    try:
        data = [None, 1, "text ✓", b"\x00raw", {"nested": [1, (2, 3)]}]
        for item in data:
            q.put(item)
        assert [q.get(timeout=30) for _ in data] == data
        print(f"round trip through {queue_type}: {len(data)} items ok")
    finally:
        q.destroy()
