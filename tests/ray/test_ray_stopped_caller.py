"""A *caller* (not the actor) stopped inside a timed get, resumed past its timeout (spec Q38, RAY15).

The actor answered while the caller was stopped; the answer is in the caller's process, unread.
Before Q38, ray_queue's handle counted the stop as the actor's silence: on resume its get raised
QueueConnectionError ("did not answer ... stopped or overloaded") for an actor that had answered
at once. Whether Ray's I/O thread or the timed wait wins after SIGCONT is a race, so two consumers
are stopped at once and each must end normally; against the old code this test failed in each of
the 3 runs we made (4 consumers stopped 4 s: it passed, the I/O threads won). The kit's Q38 test
runs one such consumer on every backend.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import uuid
from typing import Any

import pytest
from ray_support import drain, open_handle

from conformance._children import child_command, child_env
from sage_queue import QueueDescriptor

CONSUMERS = 2


@pytest.mark.spec("Q38", "RAY15")
@pytest.mark.timeout(120)
@pytest.mark.parametrize("queue_type", ["ray_queue", "ray_actor"])
def test_consumers_stopped_past_their_timeout_take_the_answers_that_came(
    queue_type: str, ray_address: str, made: list[Any]
) -> None:
    desc = QueueDescriptor.create(queue_type, f"t_{uuid.uuid4().hex[:12]}", 0, address=ray_address)
    q = open_handle(made, desc)
    children = [
        subprocess.Popen(
            child_command("timed_get", desc.to_json(), "1.0"), stdout=subprocess.PIPE, text=True, env=child_env()
        )
        for _ in range(CONSUMERS)
    ]
    stopped: list[int] = []
    try:
        for child in children:
            assert child.stdout is not None and child.stdout.readline().strip() == "ready"
        time.sleep(0.5)  # each in its get (ray_queue: waiting in the actor in 0.2 s slices)
        for child in children:
            os.kill(child.pid, signal.SIGSTOP)
            stopped.append(child.pid)
        items = [f"item-{i}" for i in range(CONSUMERS // 2)]  # half the consumers get one, half get nothing
        for item in items:
            q.put(item)
        time.sleep(5.0)  # past the timeout (1 s) and the 2 s grace, all stopped
        for pid in stopped:
            os.kill(pid, signal.SIGCONT)
        stopped.clear()
        outcomes = [json.loads(child.communicate(timeout=30)[0].strip().splitlines()[-1]) for child in children]
    finally:
        for pid in stopped:
            os.kill(pid, signal.SIGCONT)
        for child in children:
            if child.poll() is None:
                child.kill()
                child.wait(10)
    errors = [o for o in outcomes if o[0] not in ("item", "Empty")]
    assert not errors, f"resumed gets raised for an actor that had answered: {errors}"
    got = [o[1] for o in outcomes if o[0] == "item"]
    left = drain(q)
    assert sorted(got + left) == sorted(items), f"got {got}, left in the queue {left}: lost or duplicated"
