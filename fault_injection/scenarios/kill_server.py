"""kill-server: SIGKILL a durable rpc server under load, restart it on the same port and data directory.

The scenario brings its own server (:meth:`KillServer.setup`): a child process (``sage-queue serve``
through ``RPCQueueServer.spawn``) with a fresh key and ``--data-dir`` in a temporary directory,
first on a free port, then restarted on that same port; descriptors say ``durable=true`` (so a
non-durable server is refused, RPC11). Each fault: SIGKILL at a random moment of the traffic,
down for 0-300 ms, restart. Clients retransmit to the new instance (RPC9), which answers from
the records it committed before dying (RPC14).

The promise judged (rpc, stress/checker.py): no acknowledged put lost, no acknowledged get
delivered again, nothing twice, per-producer order (RPC14, RPC18). A restart slower than a
timed call's grace (timeout + 2 s, RPC9) makes calls give up with QueueConnectionError: the
worker logs them failed (a put indeterminate, a get that took nothing: E16) and goes on.
"""

from __future__ import annotations

import os
import signal
import tempfile
import time
from contextlib import ExitStack
from typing import Optional

from stress.runner import FaultContext, Scenario, Service, Target

from . import scenario

UP_SECONDS = (0.3, 1.0)
"""Traffic between two kills."""
DOWN_SECONDS = (0.0, 0.3)
"""How long the server stays dead before the restart starts (a restart itself takes a few hundred ms)."""


class DurableServer:
    """A durable server in a child process, on one port and one directory for its whole life: kill, restart."""

    def __init__(self, key_file: str, data_dir: Optional[str]) -> None:
        from sage_queue.backends.rpc.server import RPCQueueServer

        self._spawn = RPCQueueServer.spawn
        self.key_file, self.data_dir = key_file, data_dir
        self.process = self._spawn(key_file=key_file, data_dir=data_dir)
        self.host, self.port = self.process.address
        self.restarts = 0
        self.restart_seconds: list[float] = []

    def kill(self) -> None:
        """SIGKILL (no cleanup at all) and reap."""
        os.kill(self.process.pid, signal.SIGKILL)
        self.process.kill()

    def restart(self) -> None:
        """Start a new server on the same port and directory; returns once it listens."""
        start = time.monotonic()
        self.process = self._spawn(self.host, self.port, key_file=self.key_file, data_dir=self.data_dir)
        self.restart_seconds.append(time.monotonic() - start)
        self.restarts += 1

    def stop(self) -> None:
        self.process.stop()


@scenario
class KillServer(Scenario):
    name = "kill-server"
    description = "SIGKILL a durable rpc server under load, restart it on the same port and --data-dir"
    faults = 3
    soak_faults = 200
    modes = ("descriptor",)
    types = ("rpc",)
    down_seconds = DOWN_SECONDS
    """Range of the time the server stays dead (an instance may widen it: past a call's grace of 2.5 s, calls
    give up while it is down; a get that gave up takes nothing, RPC17-RPC18, which tests/rpc/test_rpc_faults.py
    checks with a longer outage)."""
    durable = True
    """False: a server without ``--data-dir`` (RPC11: a restart is a new, empty instance), which must lose
    items: how the tests show that this scenario's verdict can fail."""

    def applies_to(self, target: Target) -> bool:
        return target.mode == "descriptor" and target.name == "rpc"

    def setup(self, target: Target, stack: ExitStack) -> Optional[Service]:
        from sage_queue.backends.rpc.wire import generate_key_file

        tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="sageq-killserver-"))
        key_file = os.path.join(tmp, "rpc.key")
        generate_key_file(key_file)
        server = DurableServer(key_file, os.path.join(tmp, "data") if self.durable else None)
        stack.callback(server.stop)
        metadata = {"host": server.host, "port": server.port, "key_file": key_file, "durable": self.durable}
        return Service(metadata, {"server": server})

    def inject(self, ctx: FaultContext) -> None:
        server: DurableServer = ctx.service.control["server"]
        ctx.wait_ready(ctx.workers())
        while ctx.faults_done < ctx.faults:
            ctx.sleep(ctx.rng.uniform(*UP_SECONDS))
            down = ctx.rng.uniform(*self.down_seconds)
            server.kill()
            ctx.sleep(down)
            server.restart()
            ctx.count_fault(f"SIGKILL server, down {down:.2f} s + restart {server.restart_seconds[-1]:.2f} s")
