"""Scenario 1: a queue created in one process, used from another that gets only its JSON descriptor.

    python examples/scenario1_cross_process.py            # sage (or shm where sage is unavailable)
    python examples/scenario1_cross_process.py shm

Process A creates two queues and starts process B with their descriptors as JSON text on
the command line; B resolves them, echoes every item back and closes (never destroys) its
handles. A destroys the queues at the end, whatever happened.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

from sage_queue import QueueDescriptor, resolve_descriptor
from sage_queue.job import choose_queue_type

STOP = "__stop__"


def process_b(inbox_json: str, outbox_json: str) -> None:
    inbox = resolve_descriptor(QueueDescriptor.from_json(inbox_json))
    outbox = resolve_descriptor(QueueDescriptor.from_json(outbox_json))
    try:
        while (item := inbox.get()) != STOP:
            outbox.put({"echo": item, "by": os.getpid()})
    finally:
        inbox.close()
        outbox.close()


def process_a(queue_type: str) -> None:
    inbox = QueueDescriptor.create(queue_type, maxsize=16)
    outbox = QueueDescriptor.create(queue_type, maxsize=16)
    qin, qout = resolve_descriptor(inbox), resolve_descriptor(outbox)  # creates them: A owns them
    try:
        child = subprocess.Popen([sys.executable, __file__, "--child", inbox.to_json(), outbox.to_json()])
        try:
            items = [{"n": n, "data": bytes([n]) * n} for n in range(10)]
            for item in items:
                qin.put(item)
            replies = [qout.get(timeout=60) for _ in items]
            qin.put(STOP)
            assert child.wait(timeout=60) == 0
        finally:
            if child.poll() is None:
                child.kill()
                child.wait()
        assert [r["echo"] for r in replies] == items
        print(
            json.dumps(
                {
                    "queue_type": queue_type,
                    "items": len(replies),
                    "child_pid": replies[0]["by"],
                    "parent_pid": os.getpid(),
                }
            )
        )
    finally:
        qin.destroy()
        qout.destroy()


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        process_b(sys.argv[2], sys.argv[3])
    else:
        process_a(sys.argv[1] if len(sys.argv) > 1 else choose_queue_type("process", "process"))
