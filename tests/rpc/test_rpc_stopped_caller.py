"""A *caller* stopped (SIGSTOP, a debugger, a machine thrashing) inside a timed call, then resumed.

The server answered in time; the answer waits in the caller's socket. On resume the call must
take that answer (an item, or Empty), not report the server as unreachable: RPC9's
QueueConnectionError is for a server that is silent, and a stopped caller's server was not.
Found by attacking: a consumer stopped for 10 s inside ``get(timeout=1.0)`` raised
"rpc server ... did not answer within 30 s ... it is down" on resume, its item waiting in the socket.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import uuid

import pytest

from conformance._children import child_command, child_env
from sage_queue import QueueDescriptor, resolve_descriptor
from sage_queue.backends.rpc.server import ServerProcess


def _parked(q: object, before: int, timeout: float = 30.0) -> None:
    """Wait until the server counts one more waiting get than ``before`` (the consumer is parked in it)."""
    end = time.monotonic() + timeout
    while q.stats().waits <= before:  # type: ignore[attr-defined]
        assert time.monotonic() < end, "the consumer's get never parked in the server"
        time.sleep(0.02)


@pytest.mark.timeout(90)
@pytest.mark.spec("RPC9")
@pytest.mark.parametrize("item_arrives", [True, False], ids=["item-while-stopped", "nothing-while-stopped"])
def test_a_caller_stopped_past_its_timeout_takes_the_answer_waiting_in_its_socket(
    rpc_server: ServerProcess, rpc_key_file: str, item_arrives: bool
) -> None:
    host, port = rpc_server.address
    desc = QueueDescriptor.create(
        "rpc", f"stopped-{uuid.uuid4().hex[:8]}", 0, host=host, port=port, key_file=rpc_key_file
    )
    q = resolve_descriptor(desc)
    child = subprocess.Popen(
        child_command("timed_get", desc.to_json(), "1.0"), stdout=subprocess.PIPE, text=True, env=child_env()
    )
    try:
        waits = q.stats().waits or 0
        assert child.stdout is not None and child.stdout.readline().strip() == "ready"
        _parked(q, waits)
        os.kill(child.pid, signal.SIGSTOP)
        if item_arrives:
            q.put("for-the-stopped-consumer")  # handed to its parked get; the answer waits in its socket
        time.sleep(4.0)  # past its timeout (1 s) and the 2 s grace of RPC9, while stopped
        os.kill(child.pid, signal.SIGCONT)
        out, _ = child.communicate(timeout=30)
        outcome = json.loads(out.strip().splitlines()[-1])
        if item_arrives:
            assert outcome == ["item", "for-the-stopped-consumer"]
        else:
            assert outcome[0] == "Empty", outcome
        assert q.qsize() == 0  # nothing put back twice, nothing left behind
    finally:
        if child.poll() is None:
            os.kill(child.pid, signal.SIGCONT)
            child.kill()
            child.wait(10)
        q.destroy()
